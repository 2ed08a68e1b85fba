"""Forward-only refinement captured in a CUDA graph (once per input shape).

The K-step SVI loop launches a few small kernels and one decoder
forward/backward per step; on a GPU the launch latency can dominate small
decoders. ``RefineGraph`` captures the whole loop (noise draws, decoder passes,
fused optimiser steps) once per (shape, dtype, device) and replays it.

When it applies: inference-time refinement, or any use that needs no gradient
through the refinement (the ``svi`` / ``vae+svi`` training rows, evaluation),
with a decoder that has static shapes, no host synchronisation and no
data-dependent Python control flow. ``nll_fn`` must read its data from tensors
whose storage stays fixed (update them in place with ``copy_`` between calls).
Dropout inside the graph draws fresh masks on every replay (graph-safe
Philox), as eager execution would.

For training *through* the refinement, capture the whole training step
yourself (``torch.cuda.graph``) around :func:`savae_fast.refine` with
``preserve_rng_state=False`` and a deterministic decoder: refine's forward and
backward perform no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from savae_fast.refine.api import refine
from savae_fast.refine.validation import DEFAULTS, check_noise, check_state, make_config


@dataclass
class _Captured:
    graph: object
    mu: Tensor
    logvar: Tensor
    noise: Tensor
    out_mu: Tensor
    out_logvar: Tensor


class RefineGraph:
    """Callable ``(mu, logvar, noise=None) -> (mu_K, logvar_K)``, no gradient through it.

    Forward-only refinement (evaluation, test-time SVI) captured in a CUDA graph: on CUDA
    tensors the loop is captured on first use of each shape, dtype and device and replayed
    afterwards; elsewhere it runs eagerly with the same results.

    Args:
        nll_fn: as for :func:`savae_fast.refine`; it must be capturable (no host
            synchronisation, fixed shapes) on CUDA.
        steps: inner steps K.
        warmup: eager runs on a side stream before each capture (at least 1).
        **refine_kwargs: those of :func:`savae_fast.refine` that apply to a forward-only
            loop: ``lr``, ``momentum``, ``max_grad_norm``, ``kl_weight``, ``reduction``,
            ``backend``, ``fp32_precision``.

    Calling it takes ``mu`` and ``logvar`` (``[B, D]``) and optional ``noise``
    (``[steps, B, D]``; drawn inside the graph otherwise) and returns new tensors
    ``(mu_K, logvar_K)``.

    Raises:
        TypeError: a keyword that does not apply to forward-only refinement (``hvp``,
            ``noise``, ...), or ``nll_fn`` not callable.
        ValueError: ``warmup`` < 1; at call time, the checks of :func:`savae_fast.refine`
            on ``mu``, ``logvar``, ``noise`` and the hyper-parameters.

    Example:
        >>> import torch, savae_fast as sf
        >>> dec = torch.nn.Linear(4, 6)
        >>> x = torch.randn(8, 6)
        >>> evaluate = sf.RefineGraph(lambda z: ((dec(z) - x) ** 2).sum(1), steps=20)
        >>> with torch.no_grad():
        ...     mu_k, logvar_k = evaluate(torch.zeros(8, 4), torch.zeros(8, 4))
        >>> mu_k.shape
        torch.Size([8, 4])
    """

    def __init__(self, nll_fn: Callable[[Tensor], Tensor], *, steps: int = DEFAULTS.steps, warmup: int = 3, **refine_kwargs):
        for bad in ("hvp", "fd_eps", "fd_tol", "preserve_rng_state", "noise", "on_nonfinite", "stack_points",
                    "batch_coupled", "check_decoder"):
            if bad in refine_kwargs:
                raise TypeError(f"RefineGraph: argument '{bad}' does not apply to forward-only refinement")
        if not callable(nll_fn):
            raise TypeError(f"RefineGraph: argument 'nll_fn' must be callable, got {type(nll_fn).__name__}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"RefineGraph: argument 'warmup' must be an int >= 1, got {warmup!r}")
        self.nll_fn = nll_fn
        self.steps = steps
        self.warmup = warmup
        self.kwargs = refine_kwargs
        self._graphs: dict[tuple, _Captured] = {}

    def _run(self, mu: Tensor, logvar: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return refine(mu, logvar, self.nll_fn, (), steps=self.steps, noise=noise, preserve_rng_state=False,
                          on_nonfinite="ignore" if mu.device.type == "cuda" else "raise", **self.kwargs)

    def __call__(self, mu: Tensor, logvar: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_state(mu, logvar)
        make_config(mu, steps=self.steps, hvp=DEFAULTS.hvp, fd_eps=None, preserve_rng_state=False,
                    **{k: self.kwargs.get(k, getattr(DEFAULTS, k))
                       for k in ("lr", "momentum", "max_grad_norm", "kl_weight", "reduction")})
        if noise is not None:
            noise = check_noise(noise, self.steps, mu)
        if mu.device.type != "cuda" or self.steps == 0:
            if noise is None and self.steps > 0:
                noise = torch.randn((self.steps, *mu.shape), dtype=mu.dtype, device=mu.device)
            return self._run(mu, logvar, noise)
        key = (tuple(mu.shape), mu.dtype, mu.device, noise is None)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(mu, logvar, draw_noise=noise is None)
        entry.mu.copy_(mu)
        entry.logvar.copy_(logvar)
        if noise is not None:
            entry.noise.copy_(noise)
        entry.graph.replay()
        return entry.out_mu.clone(), entry.out_logvar.clone()

    def _capture(self, mu: Tensor, logvar: Tensor, draw_noise: bool) -> _Captured:
        static_mu = mu.detach().clone().contiguous()
        static_logvar = logvar.detach().clone().contiguous()
        static_noise = torch.randn((self.steps, *mu.shape), dtype=mu.dtype, device=mu.device)

        def body():
            if draw_noise:
                static_noise.normal_()
            return self._run(static_mu, static_logvar, static_noise)

        side = torch.cuda.Stream(device=mu.device)
        side.wait_stream(torch.cuda.current_stream(mu.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, autotuning, lazy init)
            for _ in range(self.warmup):
                body()
        torch.cuda.current_stream(mu.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_mu, out_logvar = body()
        return _Captured(graph, static_mu, static_logvar, static_noise, out_mu, out_logvar)
