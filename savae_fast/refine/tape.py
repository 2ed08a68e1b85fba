"""What the forward pass of refine records for its reverse pass."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from savae_fast.ops.torch_impl import accumulate_
from savae_fast.refine.nonfinite import all_finite
from savae_fast.refine.probe import DecoderState
from savae_fast.refine.rng import RngState


def accumulation_dtype(p: Tensor) -> torch.dtype:
    """Parameter-gradient sums of float16/bfloat16 parameters are kept in float32."""
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


@dataclass
class Tape:
    """Per forward step k: lambda_k = (mu_k, logvar_k) before the step, the decoder's
    dNLL/dz at z_k, the clip norms |g_mu|, |g_logvar| ([2]) and the RNG state the
    decoder saw (all [B, D] but the norms; ``rng`` is None when the decoder draws no
    random numbers)."""

    mu: list[Tensor] = field(default_factory=list)
    logvar: list[Tensor] = field(default_factory=list)
    grad_z: list[Tensor] = field(default_factory=list)
    grad_norms: list[Tensor] = field(default_factory=list)
    rng: list[RngState] | None = field(default_factory=list)
    # fd_forward: sum over the steps of dNLL/dtheta at z_k, one buffer per parameter
    # (float32 for float16/bfloat16 parameters). A plain sum: compensated summation
    # (twice the memory) measured 4.0e-5 instead of 5.1e-5 relative gradient error on
    # the small LSTM benchmark, where the difference quotient itself dominates.
    param_grad_sum: list[Tensor] | None = None
    casts_param_grads: bool = False  # some parameter is float16/bfloat16 (its sum is float32)
    coupled: bool = False  # the decoder couples the examples: difference steps shared by the batch
    state: DecoderState | None = None  # tensors the decoder writes in place, per step (refine/probe.py)
    stack_points: int = 0  # the most difference points per decoder call in the backward (0 / 1: one)
    read: list = field(default_factory=list)  # tensors the decoder read and their versions (refine/probe.py)

    @classmethod
    def for_params(cls, params, sum_param_grads: bool) -> "Tape":
        sums = [torch.zeros_like(p, dtype=accumulation_dtype(p), memory_format=torch.contiguous_format)
                for p in params] if sum_param_grads else None
        return cls(param_grad_sum=sums, casts_param_grads=sums is not None and any(
            s.dtype != p.dtype for s, p in zip(sums, params)))

    def record_step(self, mu: Tensor, logvar: Tensor, grad_z: Tensor, grad_norms: Tensor) -> None:
        self.mu.append(mu)
        self.logvar.append(logvar)
        self.grad_z.append(grad_z)
        self.grad_norms.append(grad_norms)

    def accumulate_param_grads(self, grads) -> None:
        """param_grad_sum += grads; None entries (parameters the loss does not use) skipped.
        PyTorch's own multi-tensor add: one call per step for every backend, cheaper on
        the host than an operator of ours (measured 3.7 vs 9 us for 9 small tensors on CPU)."""
        if self.casts_param_grads:
            grads = [g if g is None or g.dtype == b.dtype else g.to(b.dtype)
                     for g, b in zip(grads, self.param_grad_sum)]
        if any(g is None for g in grads):
            accumulate_(self.param_grad_sum, grads)
        else:
            torch._foreach_add_(self.param_grad_sum, grads)

    def first_nonfinite_step(self) -> str:
        """Which forward step first produced a non-finite value (after a failed screen)."""
        for k in range(len(self.grad_z)):
            if not all_finite(self.grad_z[k]):
                return f"the decoder's gradient dNLL/dz at inner step {k} is not finite"
            for name, norm in zip(("mu", "logvar"), self.grad_norms[k].unbind(0)):
                if not all_finite(norm):
                    return (f"the norm of the inner objective's gradient w.r.t. {name} at inner step {k} is not "
                            f"finite (it overflows {norm.dtype} for gradients above about "
                            f"{torch.finfo(norm.dtype).max ** 0.5 / max(self.grad_z[k].numel(), 1) ** 0.5:.1e} "
                            "per element: a logvar that large needs float64)")
            if k + 1 < len(self.mu) and not all_finite(self.mu[k + 1], self.logvar[k + 1]):
                return f"the variational parameters after inner step {k} are not finite"
        return "the variational parameters after the last inner step are not finite"
