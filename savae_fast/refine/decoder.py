"""The decoder evaluations of refine: dNLL/dz and dNLL/dtheta at a point, and the
exact second-order terms by double backward."""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from savae_fast.refine.cudnn import TwiceDifferentiable
from savae_fast.refine.precision import full_fp32


def no_graph_error() -> RuntimeError:
    return RuntimeError(
        "refine: nll_fn's output has no autograd graph back to z, so dNLL/dz cannot be computed: nll_fn runs "
        "under torch.no_grad() or torch.inference_mode(), detaches z, or does not depend on z. Let nll_fn "
        "compute with autograd (refine itself may be called under no_grad or inference_mode)")


def check_nll(nll, batch: int, stacked: tuple | None = None) -> None:
    """``stacked``: (points, examples) of a stacked call (refine(stack_points=...))."""
    if not isinstance(nll, Tensor):
        raise TypeError(f"refine: nll_fn must return a Tensor of per-example NLL, got {type(nll).__name__}")
    if nll.shape != (batch,):
        if stacked is not None:
            n, b = stacked
            raise ValueError(
                f"refine: argument 'nll_fn' returned shape {tuple(nll.shape)} for a stacked z of shape [{batch}, D]: "
                f"with stack_points, nll_fn gets the {n} difference points of each of the {b} examples as one batch, "
                f"rows point-major (row j * {b} + b is example b at point j), and must return {batch} values, e.g. "
                "lambda z: decoder.nll(savae_fast.nn.repeat_rows(x, z), z)")
        raise ValueError(
            f"refine: nll_fn must return per-example negative log-likelihoods of shape [{batch}], "
            f"got shape {tuple(nll.shape)} (do not reduce over the batch)"
        )
    if not nll.is_floating_point():
        raise TypeError(f"refine: nll_fn must return a floating-point tensor, got {nll.dtype}")


# The grad-mode switch of torch.enable_grad without its Python context manager:
# decoder_grads runs 2K to 3K times per refine call, next to the decoder passes.
_set_grad_enabled = torch._C._set_grad_enabled


# torch.autograd.grad less its Python argument handling, which costs about 8 us of host
# time per decoder pass (a small-decoder training step makes 2K + 1 = 41 passes): the
# engine call it ends in, for a loss and inputs of the plain Tensor / Parameter types.
# Tensor subclasses (they may override autograd through __torch_function__) take the
# public call, and so does every call after the engine's signature ever differs.
_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)
_PLAIN = (Tensor, torch.nn.Parameter)
_engine_usable = _ENGINE is not None


def gradients(loss: Tensor, inputs: Sequence[Tensor]) -> tuple:
    """torch.autograd.grad(loss, inputs, allow_unused=True) for a scalar ``loss``."""
    global _engine_usable
    if _engine_usable and type(loss) is Tensor and all(type(t) in _PLAIN for t in inputs):
        try:
            return _ENGINE.run_backward((loss,), (torch.ones_like(loss),), False, False, tuple(inputs), True, False)
        except TypeError:
            _engine_usable = False
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def decoder_grads(nll_fn: Callable, z: Tensor, params: Sequence[Tensor], weight: Tensor | None = None,
                  stacked: tuple | None = None):
    """dL/dz and dL/dtheta of L = sum_b w_b NLL_b(z_b) (w = 1 when ``weight`` is None).
    ``stacked``: (points, examples) when ``z`` holds several points of each example (stack_points).

    Returns (grad_z, param_grads) with None for parameters the loss does not use.
    """
    if torch.is_inference_mode_enabled():  # the gradient needs autograd: leave inference mode here
        with torch.inference_mode(False):
            return decoder_grads(nll_fn, z.clone(), params, weight, stacked)
    batch = z.shape[0]
    grad_was_enabled = torch.is_grad_enabled()
    _set_grad_enabled(True)
    try:
        z = z.detach().requires_grad_(True)
        nll = nll_fn(z.clone())  # a tensor the decoder may write into (z itself is a leaf)
        check_nll(nll, batch, stacked)
        loss = nll.sum() if weight is None else (nll * weight.to(nll.dtype)).sum()
        if not loss.requires_grad:
            raise no_graph_error()
        grads = gradients(loss, (z, *params))
    finally:
        _set_grad_enabled(grad_was_enabled)
    if grads[0] is None:  # the NLL reaches the parameters but not z
        raise no_graph_error()
    return grads[0], list(grads[1:])


def decoder_hvp(nll_fn: Callable, z: Tensor, u: Tensor, params: Sequence[Tensor], evaluations: TwiceDifferentiable):
    """Exact (Hzz u, d/dtheta (g_z . u)) by double backward through the decoder
    (``evaluations`` runs the decoder without cuDNN where its RNNs would forbid that)."""
    batch = z.shape[0]
    grad_was_enabled = torch.is_grad_enabled()
    _set_grad_enabled(True)
    try:
        z = z.detach().requires_grad_(True)
        nll = evaluations.evaluate(lambda: nll_fn(z.clone()))  # (z.clone(): see decoder_grads)
        check_nll(nll, batch)
        if not nll.requires_grad:
            raise no_graph_error()
        advice = ("Use hvp='fd_central' or hvp='fd_forward', or make the decoder twice differentiable "
                  "(once_differentiable functions are not; cuDNN RNNs are run without cuDNN for this)")
        try:
            (grad_z,) = torch.autograd.grad(nll.sum(), z, create_graph=True, allow_unused=True)
            if grad_z is None or not grad_z.requires_grad:
                # the decoder ignores z, or its z-gradient depends on neither z nor a tensor that requires
                # grad (linear in z with fixed weights): no second-order terms. (A once_differentiable
                # backward gives a graph that raises; a backward of a custom Function built from
                # non-differentiable operations is caught by ExactHvp's cross-check.)
                return torch.zeros_like(z), [None] * len(params)
            if evaluations.went_through_once_differentiable(grad_z):
                raise RuntimeError("the decoder's gradient w.r.t. z went through a once_differentiable backward")
            grads = torch.autograd.grad(grad_z, (z, *params), grad_outputs=u, allow_unused=True)
        except RuntimeError as exc:
            raise RuntimeError(
                f"refine(hvp='exact') differentiates the decoder twice, and this decoder does not support "
                f"double backward. {advice} (original error: {exc})"
            ) from exc
    finally:
        _set_grad_enabled(grad_was_enabled)
    hzz_u = grads[0] if grads[0] is not None else torch.zeros_like(z)
    return hzz_u, list(grads[1:])


# Operators of CUDA decoders without a forward-mode derivative (torch 2.11, H100), and what to do.
_NO_FORWARD_AD_ON_CUDA = {
    "_thnn_fused": " (on CUDA, PyTorch's own LSTM/GRU cells, used where cuDNN is not, have none: nn.LSTM and "
                   "nn.GRU decoders on GPUs need hvp='exact')",
    "native_dropout_backward": " (on CUDA, the backward of training-mode dropout has none: a decoder with "
                               "active dropout on a GPU needs hvp='exact', or eval mode)",
}


def decoder_jvp(nll_fn: Callable, z: Tensor, u: Tensor, params: Sequence[Tensor], evaluations: TwiceDifferentiable):
    """Exact (Hzz u, d/dtheta (g_z . u)) by forward-over-reverse differentiation: the decoder's
    gradient computed on the dual number z + u dz carries them as the tangents of g_z and
    g_theta. About twice the cost of one gradient, and no second-order graph is kept."""
    batch = z.shape[0]

    def evaluate():
        with fwAD.dual_level():
            z_dual = fwAD.make_dual(z.detach().requires_grad_(True), u)
            nll = nll_fn(z_dual.clone())  # (see decoder_grads)
            check_nll(nll, batch)
            if not nll.requires_grad:
                raise no_graph_error()
            grads = torch.autograd.grad(nll.sum(), (z_dual, *params), allow_unused=True)
            return [None if g is None else fwAD.unpack_dual(g).tangent for g in grads]

    grad_was_enabled = torch.is_grad_enabled()
    _set_grad_enabled(True)
    try:
        tangents = evaluations.evaluate_forward_ad(evaluate)
    except (RuntimeError, NotImplementedError) as exc:
        if "no autograd graph back to z" in str(exc):
            raise
        where = next((hint for op, hint in _NO_FORWARD_AD_ON_CUDA.items() if op in str(exc)), "")
        raise RuntimeError(
            "refine(hvp='jvp') needs forward-mode derivatives of every operation in the decoder (and of "
            f"their backward), and this decoder has one without{where}: use hvp='exact' (double backward) or a "
            f"finite difference (original error: {exc})") from exc
    finally:
        _set_grad_enabled(grad_was_enabled)
    hzz_u = tangents[0] if tangents[0] is not None else torch.zeros_like(z)
    return hzz_u, tangents[1:]


def decoder_precision_scope(full_fp32_requested: bool, device: torch.device):
    """Where refine's decoder evaluations run: in full float32 for fp32_precision="ieee"."""
    return full_fp32(device.type) if full_fp32_requested else contextlib.nullcontext()
