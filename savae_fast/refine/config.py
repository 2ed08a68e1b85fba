"""The validated hyper-parameters of one refine call and the policy for non-finite values."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from savae_fast.ops.constants import StepScalars

if TYPE_CHECKING:
    from savae_fast.refine.hvp import HvpMethod


class NonFinite(enum.Enum):
    """What refine does about NaN/Inf in the decoder's derivatives or the variational state."""

    RAISE = "raise"  # FloatingPointError naming the inner step (one host read per pass)
    ZERO = "zero"  # non-finite decoder derivatives count as zero
    IGNORE = "ignore"  # no checks (CUDA-graph capture)


@dataclass(frozen=True)
class RefineConfig:
    """Validated hyper-parameters of one refine call (built by validation.make_config)."""

    steps: int
    lr_mu: float
    lr_logvar: float
    momentum: float
    max_grad_norm: float
    kl_weight: float
    scale: float  # s in L = s * sum_b [NLL_b + beta KL_b]
    hvp: HvpMethod
    fd_eps: float
    preserve_rng_state: bool
    process_group: object = None  # data parallel: batch-coupled reductions summed over its processes
    global_batch: int = 0  # examples over all processes (0: this batch only)
    on_nonfinite: NonFinite = NonFinite.RAISE
    full_fp32: bool = False  # decoder evaluations with TF32 switched off (fp32_precision="ieee")
    fd_tol: float = 0.0  # fd_adaptive: per-example truncation estimate that makes a step be halved
    check_decoder: bool = True  # probe the first decoder call (refine/probe.py); cross-check exact terms
    batch_coupled: bool | None = None  # the decoder couples the examples (None: found by the probe)
    check_fd_eps: float = 0.0  # the central step of the cross-check of exact second-order terms
    precision: object = None  # what the decoder computes in: a dtype or "tf32" (precision.decoder_precision)
    stack_points: int = 0  # the most difference points per decoder call (0: one per call, unstacked)
    backward_clip: float = 0.0  # the largest growth of the backpropagated vector over its incoming norm (0: off)
    backward_clip_scope: str = "example"  # clip each example's vector ("example") or the batch's ("batch")
    backward_clip_mode: str = "stop"  # past the bound: "stop" propagating (truncation there) or "scale" down
    backward_steps: int = 0  # reverse steps taken: the last ones of the K inner steps (truncation; = steps: all)

    @property
    def scalars(self) -> StepScalars:
        return StepScalars(self.scale, self.kl_weight, self.lr_mu, self.lr_logvar, self.momentum, self.max_grad_norm)
