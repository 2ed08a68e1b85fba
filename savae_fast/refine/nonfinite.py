"""Screening for non-finite values (on_nonfinite="raise" / "zero") and the error that names the step."""

from __future__ import annotations

import torch
from torch import Tensor


def zero_nonfinite(t: Tensor | None) -> Tensor | None:
    return None if t is None else torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def all_finite(*tensors: Tensor | None) -> bool:
    """One host read for all the tensors. A sum is non-finite when any term is, so one
    reduction per tensor screens them; only a failed screen (or a sum of finite terms
    that overflowed) pays for the exact element-wise test."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float64) for t in tensors])).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def nonfinite_error(what: str) -> FloatingPointError:
    return FloatingPointError(
        f"refine: {what}. Check the decoder (and the scale of mu/logvar: logvar is used as "
        "exp(logvar/2)); pass on_nonfinite='zero' to treat non-finite decoder derivatives as zero, "
        "or on_nonfinite='ignore' to skip the checks")
