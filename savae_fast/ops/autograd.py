"""Autograd-key kernel of savae_fast::accumulate_, the one in-place operator.

It has no derivative: under grad mode, adding into a tensor that requires grad
(or adding one that does) would silently leave autograd's record wrong, so it is
refused as PyTorch refuses in-place ops on leaves; under torch.no_grad() it is
allowed (as optimisers update parameters). Imported only when the compiled
extension (which defines the schema) is loaded."""

from __future__ import annotations

import torch

_accumulate = torch.ops.savae_fast.accumulate_.default
_below_autograd = torch._C._AutoDispatchBelowAutograd


def _check_no_grad_needed(total, values) -> None:
    for name, tensors in (("total", total), ("values", values)):
        for i, t in enumerate(tensors):
            if t is not None and t.requires_grad:
                what = "a leaf tensor that requires grad" if t.is_leaf else "a tensor that requires grad"
                raise RuntimeError(
                    f"savae_fast::accumulate_: '{name}'[{i}] is {what}; the in-place sum has no derivative. "
                    "Call it under torch.no_grad() (or pass detached tensors)")


@torch.library.impl("savae_fast::accumulate_", "Autograd")
def _accumulate_autograd(total, values):
    if torch.is_grad_enabled():
        _check_no_grad_needed(total, values)
    with _below_autograd():
        return _accumulate(total, values)
