"""Capture and replay of the default generators around decoder evaluations.

The decoder evaluations of the reverse pass must see the random numbers
(dropout masks) of the forward step they differentiate, or the difference
quotients are noise. As torch.utils.checkpoint does, we save the CPU
generator and the generator of the tensors' CUDA device before each forward
step's decoder call and restore it for the reverse-pass calls; the caller's
generator state is put back afterwards.

Those generators are process-wide: restoring an old state rewinds them for
every thread. So the first inner step (or, where other threads make it
ambiguous, the second) finds out whether the decoder draws random numbers at
all, and a decoder that does not (eval mode, no dropout) gets no capture and no
replay: the generators are then never set.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SEEDED = torch.Tag.nondeterministic_seeded
_dropout_arguments: dict = {}


class RngState:
    """Default-generator state of the CPU and (optionally) one CUDA device."""

    __slots__ = ("cpu", "cuda", "cuda_index")

    def __init__(self, device: torch.device):
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "refine: preserve_rng_state=True saves the CUDA generator state of every step, which "
                "cannot be done during CUDA graph capture. Capture with preserve_rng_state=False, "
                "on_nonfinite='ignore' and a deterministic decoder (no dropout, or eval mode), or use "
                "savae_fast.RefineGraph for forward-only refinement."
            )
        self.cpu = torch.get_rng_state()
        if device.type == "cuda":
            self.cuda_index = device.index if device.index is not None else torch.cuda.current_device()
            self.cuda = torch.cuda.get_rng_state(self.cuda_index)
        else:
            self.cuda_index = None
            self.cuda = None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_index)

    def is_current(self) -> bool:
        """Whether the generators are still in this state (nothing was drawn since)."""
        if not torch.equal(self.cpu, torch.get_rng_state()):
            return False
        return self.cuda is None or torch.equal(self.cuda, torch.cuda.get_rng_state(self.cuda_index))


def _dropout_argument_positions(func):
    """(index of the dropout probability, index of ``train``) for operators that take both
    (RNNs, dropout): tagged as seeded, they draw only with a probability > 0 in training."""
    if func not in _dropout_arguments:
        names = [a.name for a in func._schema.arguments]
        prob = next((i for i, n in enumerate(names) if n in ("dropout", "p")), None)
        _dropout_arguments[func] = (prob, names.index("train")) if prob is not None and "train" in names else None
    return _dropout_arguments[func]


def _is_random_call(func, args, kwargs) -> bool:
    if _SEEDED not in func.tags:
        return False
    positions = _dropout_argument_positions(func)
    if positions is None or kwargs or len(args) <= max(positions):
        return True  # in doubt, random
    prob, train = args[positions[0]], args[positions[1]]
    return train is not False and prob > 0


class RandomOpProbe(TorchDispatchMode):
    """Notes whether any operator run in this thread inside the block draws random
    numbers (PyTorch tags them ``nondeterministic_seeded``). Dispatch modes are
    per thread, so other threads' draws are not seen."""

    def __init__(self):
        super().__init__()
        self.found = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.found and _is_random_call(func, args, kwargs):
            self.found = True
        return func(*args, **(kwargs or {}))


class RandomnessCheck:
    """``nll_fn`` for one decoder call that also finds out whether the call draws from the
    default generators, given their state ``before`` it: ``found`` is True, False, or None
    when it cannot tell.

    A generator that did not move says no (one state read), whatever else runs. One that
    moved says yes when no other Python thread is alive; otherwise the move may be another
    thread's doing and ``found`` is None: the caller asks again at its next decoder call
    with ``probe=True``, which runs the call under RandomOpProbe (a Python hook per
    operator, this call only)."""

    __slots__ = ("nll_fn", "before", "probe", "found")

    def __init__(self, nll_fn: Callable, before: RngState, probe: bool = False):
        self.nll_fn, self.before, self.probe, self.found = nll_fn, before, probe, None

    def __call__(self, z):
        if self.probe:
            with RandomOpProbe() as probe:
                out = self.nll_fn(z)
            self.found = probe.found
            return out
        out = self.nll_fn(z)
        if self.before.is_current():
            self.found = False
        elif threading.active_count() == 1:
            self.found = True
        return out
