"""Decoder layers for refine's stacked evaluations (``refine(..., stack_points=...)``).

With ``stack_points`` a reverse step of the difference modes evaluates the decoder at all its
points (z + r u, z - r u, ...) in one call of ``nll_fn`` on ``z`` of shape ``[n * B, D]``,
rows point-major: row ``j * B + b`` is example b at point j. A difference quotient needs the
same random numbers at every point of one example, so dropout inside such a call must draw
one mask per example and apply it to each of the example's n copies:
:class:`Dropout` does that inside refine's stacked calls and is exactly ``nn.Dropout``
everywhere else. refine refuses a stacked decoder that draws random numbers any other way.

:func:`repeat_rows` gives a decoder's per-example data (tokens, images, an encoded state)
the rows of a stacked ``z``: ``lambda z: decoder.nll(repeat_rows(x, z), z)``.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Dropout", "repeat_rows", "stacked_copies"]

_local = threading.local()


@contextlib.contextmanager
def stacked_call(copies: int, batch: int):
    """Inside: the decoder is being evaluated at ``copies`` points of ``batch`` examples each
    (set by refine around its stacked decoder calls)."""
    previous = getattr(_local, "stack", None)
    _local.stack = (copies, batch)
    try:
        yield
    finally:
        _local.stack = previous


def stacked_copies() -> tuple[int, int] | None:
    """The stacked decoder call running in this thread, if any.

    Returns:
        ``(points per example, examples)`` inside one of refine's stacked calls of ``nll_fn``,
        else ``None`` (for a decoder that shapes its per-example state itself).

    Example:
        >>> stacked_copies() is None  # outside refine
        True
    """
    return getattr(_local, "stack", None)


def in_replayable_draw() -> bool:
    """Whether the random numbers being drawn now come from a :class:`Dropout` (refine's probe
    asks: those are the same at every point of a stacked call)."""
    return getattr(_local, "drawing", 0) > 0


@contextlib.contextmanager
def _replayable_draw():
    _local.drawing = getattr(_local, "drawing", 0) + 1
    try:
        yield
    finally:
        _local.drawing -= 1


def repeat_rows(data: Tensor, z: Tensor, dim: int = 0) -> Tensor:
    """``data`` (B rows along ``dim``) repeated to the rows of ``z`` (n * B, point-major).

    Args:
        data: the decoder's per-example data: tokens, images, an encoded state.
        z: the latent rows of this call: B (unstacked) or n * B (a stacked call).
        dim: the dimension of the examples in ``data``.

    Returns:
        ``data`` itself when ``z`` has B rows, else ``data`` repeated n times along ``dim``
        (row ``j * B + b`` is example b).

    Raises:
        ValueError: ``z``'s rows are not a multiple of the data's B (both named).

    Example:
        >>> x = torch.tensor([[1, 2], [3, 4]])
        >>> repeat_rows(x, torch.zeros(4, 8))
        tensor([[1, 2],
                [3, 4],
                [1, 2],
                [3, 4]])
    """
    rows, batch = z.shape[0], data.shape[dim]
    if rows == batch:
        return data
    if batch == 0 or rows % batch:
        raise ValueError(f"repeat_rows: z has {rows} rows, not a multiple of the data's {batch} (stacked calls "
                         "give z n * B rows)")
    reps = [1] * data.dim()
    reps[dim] = rows // batch
    return data.repeat(*reps)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that inside refine's stacked decoder calls draws one mask per example
    (for the first B rows along ``batch_dim``, the draw an unstacked call of the same B examples
    makes) and applies it to all n copies of the example; elsewhere, and on an input of B rows
    (not stacked yet), exactly ``nn.Dropout``.

    Args:
        p: the probability of an element to be zeroed, as ``nn.Dropout``.
        inplace: as ``nn.Dropout`` (not in stacked calls, which return a new tensor).
        batch_dim: the dimension of the examples in this layer's input (0 for batch-first).

    Returns:
        Called, ``x`` with dropout applied (a new tensor in stacked calls).

    Raises:
        ValueError: in a stacked call, an input whose size along ``batch_dim`` is neither B nor
            n * B (set ``batch_dim``).

    Example:
        >>> drop = Dropout(0.5)  # in place of nn.Dropout(0.5) in a decoder
        >>> drop(torch.ones(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, batch_dim: int = 0):
        super().__init__(p, inplace)
        self.batch_dim = batch_dim

    def forward(self, x: Tensor) -> Tensor:
        with _replayable_draw():
            stack = stacked_copies()
            if stack is None or not self.training or self.p == 0:
                return F.dropout(x, self.p, self.training, self.inplace)
            copies, batch = stack
            rows = x.shape[self.batch_dim] if x.dim() > self.batch_dim else -1
            if rows == batch:  # not stacked yet (a per-example state the decoder repeats after this layer)
                return F.dropout(x, self.p, True, self.inplace)
            if rows != copies * batch:
                raise ValueError(
                    f"savae_fast.nn.Dropout: in a stacked call of {copies} points x {batch} examples its input "
                    f"must have {batch} or {copies * batch} rows along batch_dim={self.batch_dim}, got shape "
                    f"{tuple(x.shape)} (set batch_dim to the dimension of the examples)")
            first = x.narrow(self.batch_dim, 0, batch)
            mask = F.dropout(torch.ones_like(first), self.p, True)
            reps = [1] * x.dim()
            reps[self.batch_dim] = copies
            return x * mask.repeat(*reps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_dim={self.batch_dim}"
