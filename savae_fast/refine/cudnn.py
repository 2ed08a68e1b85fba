"""Decoder evaluations that are differentiated twice, with cuDNN RNNs in the decoder.

cuDNN's RNN kernels have no double backward ("Double backwards is not supported for
CuDNN RNNs"), so ``hvp="exact"`` and ``reference.unrolled`` cannot differentiate an
``nn.LSTM`` decoder twice on a GPU. PyTorch's own (non-cuDNN) RNN implementation can:
an evaluation whose autograd graph contains a cuDNN RNN node is run again with cuDNN
disabled, and so is every later evaluation of the same refinement. Only those
evaluations lose cuDNN (convolutions included, for their duration); decoders without
RNNs, CPU tensors and first-order evaluations are untouched.

The non-cuDNN LSTM draws no random numbers of its own, so dropout applied by the
decoder (``nn.Dropout``) replays as usual; the inter-layer dropout of a multi-layer
``nn.LSTM(dropout=p)`` is drawn differently by cuDNN and by PyTorch's implementation.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from savae_fast.refine.rng import RngState


def may_use_cudnn_rnn(device: torch.device) -> bool:
    return device.type == "cuda" and torch.backends.cudnn.enabled


def _graph_has(output: Tensor, node_name_prefix: str) -> bool:
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith(node_name_prefix):
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def has_cudnn_rnn(output: Tensor) -> bool:
    """Whether the autograd graph that produced ``output`` contains a cuDNN RNN node."""
    return _graph_has(output, "CudnnRnn")


def has_once_differentiable(grad: Tensor) -> bool:
    """Whether a gradient computed with create_graph=True went through a backward marked
    @once_differentiable: its graph then holds an error node that autograd reaches only
    on paths to the inputs, so differentiating it again can silently give zeros."""
    return _graph_has(grad, "Error")


@contextlib.contextmanager
def cudnn_disabled():
    """cuDNN off inside the block (only the ``enabled`` flag; restored on exit, exceptions included)."""
    before = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = before


class TwiceDifferentiable:
    """Runs the decoder evaluations of one refinement (or reference) call that will be
    differentiated twice: ``evaluate(fn)`` returns ``fn()``, rerun without cuDNN (the
    random-number state replayed) when its graph has a cuDNN RNN, and every later
    evaluation then runs without cuDNN directly."""

    __slots__ = ("device", "without_cudnn", "checked_once_differentiable")

    def __init__(self, device: torch.device):
        self.device = device
        self.without_cudnn = False
        self.checked_once_differentiable = False

    def went_through_once_differentiable(self, grad: Tensor) -> bool:
        """has_once_differentiable for the first evaluation of the call only: the decoder is
        the same in every evaluation, and the graph walk is Python work per node."""
        if self.checked_once_differentiable:
            return False
        found = has_once_differentiable(grad)
        self.checked_once_differentiable = not found
        return found

    def evaluate(self, fn: Callable[[], Tensor]) -> Tensor:
        if self.without_cudnn:
            with cudnn_disabled():
                return fn()
        if not may_use_cudnn_rnn(self.device):
            return fn()
        # (no generator state can be read during CUDA graph capture, where refine
        # requires a deterministic decoder anyway)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        rng = None if capturing else RngState(self.device)
        out = fn()
        if not (isinstance(out, Tensor) and has_cudnn_rnn(out)):
            return out
        self.without_cudnn = True
        del out
        if rng is not None:
            rng.restore()
        with cudnn_disabled():
            return fn()

    def evaluate_forward_ad(self, fn: Callable[[], object]):
        """``fn()`` for an evaluation with forward-mode tangents (hvp="jvp"). The RNN kernels of
        cuDNN (GPU) and oneDNN (float32 on CPU) have no forward-mode derivative and raise; the
        evaluation then runs again with both off (the random-number state replayed), and so
        do the later ones. Any other error propagates."""
        if self.without_cudnn:
            with vendor_rnn_disabled():
                return fn()
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        rng = None if capturing else RngState(self.device)
        try:
            return fn()
        except (RuntimeError, NotImplementedError) as exc:
            if not _is_missing_forward_derivative(exc):
                raise
            self.without_cudnn = True
            if rng is not None:
                rng.restore()
        with vendor_rnn_disabled():
            return fn()


def _is_missing_forward_derivative(exc: BaseException) -> bool:
    # PyTorch: "Trying to use forward AD with <op> that does not support it", and for custom
    # Functions "You must implement the jvp function ... to use it with forward mode AD".
    msg = str(exc)
    return "forward AD" in msg or "forward mode AD" in msg


@contextlib.contextmanager
def vendor_rnn_disabled():
    """cuDNN and oneDNN (mkldnn) off inside the block: PyTorch's own RNN implementation, which
    has forward-mode derivatives (restored on exit, exceptions included)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with cudnn_disabled():
            yield
    finally:
        torch.backends.mkldnn.enabled = before
