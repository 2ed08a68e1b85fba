"""A whole training step (encoder, refine, final ELBO, backward) replayed as one CUDA graph.

Small decoders on GPUs are launch-bound: an SA-VAE step makes 2K + 1 decoder passes,
each of many small kernels, plus the refinement's own, and the host spends longer
launching them than the GPU computing them. Captured once and replayed, the step costs
what the GPU work costs. ``GraphedStep`` does the capture the way PyTorch documents it
for whole networks: warm-up iterations on a side stream, then ``torch.cuda.graph``
around the loss and its backward, with the inputs copied into static tensors at each
call.

When it applies: static shapes (a text model needs fixed-length batches: bucket by
length and keep one ``GraphedStep`` per length, or pad to one length), no host
synchronisation inside the step (no ``.item()``, printing, data-dependent shapes or
Python control flow on tensor values), and refine called with
``preserve_rng_state=False`` and ``on_nonfinite="ignore"`` (the default RNG capture
and the non-finite checks read from the GPU; the refinement's noise draws and a
decoder's dropout stay random, drawn afresh at every replay by PyTorch's graph-safe
generator, so replay with ``preserve_rng_state=False`` is right for decoders without
dropout; a decoder with dropout needs ``preserve_rng_state=True`` and cannot be captured).
The optimiser step stays outside the graph: call ``optimizer.step()`` after each call.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from savae_fast.refine.validation import collect_params


class GraphedStep:
    """``step = GraphedStep(loss_fn, example_inputs, params)``, then ``loss = step(*inputs)``.

    Args:
        loss_fn: ``loss_fn(*inputs) -> scalar Tensor``: one training step's loss (encoder,
            ``savae_fast.refine``, final ELBO) from the given input tensors; its backward is
            captured with it.
        example_inputs: tensors of the shapes, dtypes and device every later call will pass
            (a batch of data; their values are used for the warm-up and capture).
        params: the parameters whose gradients the step produces (the model's).
        warmup: eager iterations on a side stream before the capture (allocators and
            library handles settle; at least 1).
        fallback: where the step cannot be captured (tensors not on one CUDA device, or a
            capture error such as a host synchronisation), warn once with the reason and
            run eagerly (``True``, default) or raise ``RuntimeError`` (``False``).

    Each call copies ``inputs`` into the captured input tensors, replays the forward and
    backward, and leaves the gradients in ``p.grad`` of every parameter, overwritten and
    not accumulated (as after ``zero_grad(set_to_none=True)`` and ``loss.backward()``);
    it returns the loss as a new tensor. Construction runs ``warmup + 1`` steps and
    clears the parameters' ``.grad``. Every call must pass tensors of the example
    inputs' shapes, dtypes and device (also when running eagerly, so that a CPU dry run
    catches what a GPU capture would refuse). ``captured`` says which mode runs.

    Returns:
        Called, the step's loss (a new scalar tensor); the gradients are in ``p.grad``.

    Raises:
        TypeError: ``loss_fn`` not callable, a non-tensor example input, ``fallback`` not a
            bool; at call time, inputs of other shapes, dtypes or device than the examples.
        ValueError: ``warmup`` < 1, no parameter that requires grad.
        RuntimeError: the step cannot be captured and ``fallback=False`` (the reason named).

    Example:
        >>> import torch, savae_fast as sf
        >>> enc, dec = torch.nn.Linear(6, 8), torch.nn.Linear(4, 6)
        >>> def loss_fn(x):
        ...     mu, logvar = enc(x).chunk(2, dim=1)
        ...     nll = lambda z: ((dec(z) - x) ** 2).sum(1)
        ...     mu, logvar = sf.refine(mu, logvar, nll, dec.parameters(), steps=3)
        ...     return nll(mu).mean()
        >>> x = torch.randn(16, 6)
        >>> step = sf.GraphedStep(loss_fn, (x,), [*enc.parameters(), *dec.parameters()])
        >>> loss = step(x)  # replays one CUDA graph on a GPU; runs eagerly here, with one warning
        >>> dec.weight.grad.shape
        torch.Size([6, 4])
    """

    def __init__(self, loss_fn: Callable[..., Tensor], example_inputs: Sequence[Tensor],
                 params: Iterable[Tensor], *, warmup: int = 3, fallback: bool = True):
        if not callable(loss_fn):
            raise TypeError(f"GraphedStep: argument 'loss_fn' must be callable, got {type(loss_fn).__name__}")
        if isinstance(example_inputs, Tensor):
            example_inputs = (example_inputs,)
        self.example = tuple(example_inputs)
        for i, t in enumerate(self.example):
            if not isinstance(t, Tensor):
                raise TypeError(f"GraphedStep: argument 'example_inputs'[{i}] must be a Tensor, got "
                                f"{type(t).__name__} (pass non-tensor settings through loss_fn's closure)")
        self.params = _trained_params(params)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"GraphedStep: argument 'warmup' must be an int >= 1, got {warmup!r}")
        if not isinstance(fallback, bool):
            raise TypeError("GraphedStep: argument 'fallback' must be a bool")
        self.loss_fn, self.warmup, self.fallback = loss_fn, warmup, fallback
        self.captured = False
        self.reason = None  # why the step runs eagerly
        self._graph = None
        why = _not_capturable(self.example, self.params)
        if why is None:
            self._capture()
        else:
            self._run_eagerly(why)

    # ------------------------------------------------------------------ capture
    def _capture(self) -> None:
        self.device = self.params[0].device  # _not_capturable checked: everything is on it
        with torch.cuda.device(self.device):
            self._capture_on_device()

    def _capture_on_device(self) -> None:
        self._static_inputs = tuple(t.detach().clone() for t in self.example)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # errors here are loss_fn's own: they propagate
            for _ in range(self.warmup):
                self._eager_step(self._static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        try:
            for p in self.params:  # the captured backward allocates the gradients in the graph's pool
                p.grad = None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = self.loss_fn(*self._static_inputs)
                _check_loss(loss)
                loss.backward()
        except Exception as exc:  # noqa: BLE001 - reported with the reason below
            for p in self.params:
                p.grad = None
            self._run_eagerly(_capture_failure(exc), exc)
            return
        self._graph, self._static_loss = graph, loss.detach()
        self._static_grads = [p.grad for p in self.params]
        self.captured = True

    def _run_eagerly(self, why: str, cause: BaseException | None = None) -> None:
        if not self.fallback:
            raise RuntimeError(f"GraphedStep: the step cannot be captured as a CUDA graph: {why}") from cause
        self.reason = why
        warnings.warn(f"GraphedStep: running the step eagerly (no CUDA graph): {why}", RuntimeWarning, stacklevel=3)

    def _eager_step(self, inputs) -> Tensor:
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(*inputs)
        _check_loss(loss)
        loss.backward()
        return loss.detach()

    # --------------------------------------------------------------------- call
    def __call__(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.example):
            raise TypeError(f"GraphedStep: expected {len(self.example)} input tensors (as the example inputs), "
                            f"got {len(inputs)}")
        for i, (t, ref) in enumerate(zip(inputs, self.example)):
            if not isinstance(t, Tensor):
                raise TypeError(f"GraphedStep: input {i} must be a Tensor, got {type(t).__name__}")
            if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(
                    f"GraphedStep: input {i} is {_describe(t)} but the step was captured for {_describe(ref)}; "
                    "a CUDA graph replays fixed shapes (make one GraphedStep per shape, e.g. per sentence length)")
        if not self.captured:
            return self._eager_step(inputs)
        with torch.cuda.device(self.device):
            for static, t in zip(self._static_inputs, inputs):
                static.copy_(t, non_blocking=True)
            self._graph.replay()
        for p, g in zip(self.params, self._static_grads):
            p.grad = g  # back in place after a zero_grad(set_to_none=True)
        return self._static_loss.clone()


def _trained_params(params) -> tuple[Tensor, ...]:
    params = collect_params(params, who="GraphedStep")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"GraphedStep: argument 'params'[{i}] does not require grad (pass the parameters "
                             "the step trains)")
    if not params:
        raise ValueError("GraphedStep: argument 'params' is empty")
    return params


def _not_capturable(inputs, params) -> str | None:
    devices = {t.device for t in (*inputs, *params)}
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if any(d.type != "cuda" for d in devices):
        return f"every input and parameter must be on one CUDA device, found {sorted(map(str, devices))}"
    if len(devices) > 1:
        return f"inputs and parameters are on several devices {sorted(map(str, devices))}"
    return None


def _check_loss(loss) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise TypeError("GraphedStep: loss_fn must return a scalar Tensor that requires grad, got "
                        + (f"shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}" if isinstance(loss, Tensor)
                           else type(loss).__name__))


def _capture_failure(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    text = str(exc)
    if "preserve_rng_state" in text:
        return msg  # refine's own message says what to pass
    if "capture" in text.lower():  # "operation not permitted when stream is capturing", cudaErrorStreamCapture*
        return (f"{msg} -- the step synchronises with the host during capture: call refine with "
                "preserve_rng_state=False and on_nonfinite='ignore', and avoid .item(), printing tensors, "
                "data-dependent shapes and Python branches on tensor values inside loss_fn")
    return msg


def _describe(t: Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
