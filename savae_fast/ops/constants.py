"""Constants and argument groups shared by every backend (mirrors csrc/savae_math.h
and csrc/op_params.h; the symbols are defined in docs/math.md)."""

from __future__ import annotations

import enum
from typing import NamedTuple

CLIP_EPS = 1e-6  # |g| + 1e-6 in the clip factor, as torch.nn.utils.clip_grad_norm_


class FdMode(enum.IntEnum):
    """Decoder evaluation prepared by reverse_direction (FdMode in csrc/savae_math.h).

    ``EXACT``: at z itself (a double backward or a jvp supplies Hzz u); ``FORWARD``: one
    point z + r u with a scalar r; ``CENTRAL``: two points z +- r_b u_b with a step per
    example. ``eval_points`` is the number of points (the leading size of ``z_eval``).

    Example:
        >>> FdMode.CENTRAL.eval_points
        2
    """

    EXACT = 0  # at z itself (double backward supplies Hzz u)
    FORWARD = 1  # one point, z + r u, fixed scalar r
    CENTRAL = 2  # two points, z +- r_b u_b, per-example r_b

    @property
    def eval_points(self) -> int:
        return 2 if self is FdMode.CENTRAL else 1


# Plain ints of the modes, for kernels that specialise on them (Triton constexprs).
FD_EXACT = int(FdMode.EXACT)
FD_FORWARD = int(FdMode.FORWARD)
FD_CENTRAL = int(FdMode.CENTRAL)

BACKENDS = ("auto", "cpp", "triton", "torch")


class StepScalars(NamedTuple):
    """The inner optimiser's hyper-parameters as the operators take them (StepScalars
    in csrc/op_params.h); each operator's schema takes the subset below, in this order.

    Args:
        scale: s of the inner objective L = s * sum_b [NLL_b + beta KL_b].
        kl_weight: beta.
        lr_mu, lr_logvar: the inner learning rates.
        momentum: the heavy-ball momentum m.
        max_grad_norm: the clip norm M (<= 0: no clipping).

    Example:
        >>> StepScalars(0.25, 1.0, 1.0, 1.0, 0.5, 5.0).for_reverse_update()
        (0.25, 1.0, 0.5)
    """

    scale: float  # s of the inner objective L = s * sum_b [NLL_b + beta KL_b]
    kl_weight: float  # beta
    lr_mu: float
    lr_logvar: float
    momentum: float
    max_grad_norm: float  # <= 0: no clipping

    def for_forward_step(self) -> tuple:
        return tuple(self)

    def for_reverse_direction(self) -> tuple:
        return self.scale, self.kl_weight, self.lr_mu, self.lr_logvar, self.max_grad_norm

    def for_reverse_update(self) -> tuple:
        return self.scale, self.kl_weight, self.momentum
