"""Capture and replay of the default generators around decoder evaluations.

The decoder evaluations of the reverse pass must see the random numbers
(dropout masks) of the forward step they differentiate, or the difference
quotients are noise. As torch.utils.checkpoint does, we save the CPU
generator and the generator of the tensors' CUDA device before each forward
step's decoder call and restore it for the reverse-pass calls; the caller's
generator state is put back afterwards.

Those generators are process-wide: restoring an old state rewinds them for
every thread. So refine finds out whether the decoder draws random numbers at
all (the probe of its first call, refine/probe.py, and whether the generators
moved during the later ones), and a decoder that does not (eval mode, no
dropout) gets no replay: the generators are then never set.
"""

from __future__ import annotations

import torch


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
