"""Ground truth: the authors' inner optimiser unrolled with create_graph=True.

Written directly in lambda-space with plain autograd (no closed-form
derivatives, no fused kernels), so autograd differentiates the whole K-step
map exactly, clipping included. Memory and time grow with K (every step's
graph is kept): this is what a generic differentiable-optimisation library
does, and what the tests compare :func:`savae_fast.refine` against.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
from torch import Tensor

from savae_fast.gaussian import gaussian_kl
from savae_fast.refine.cudnn import TwiceDifferentiable
from savae_fast.refine.stabilize import RefineStats
from savae_fast.refine.validation import (check_stabilizers, check_state, collect_params, noise_or_draw,
                                          optimiser_config)


def unrolled(
    mu: Tensor,
    logvar: Tensor,
    nll_fn: Callable[[Tensor], Tensor],
    params: Iterable[Tensor] = (),
    *,
    noise: Tensor | None = None,
    backward_clip: float | None = None,
    backward_clip_scope: str = "example",
    backward_clip_mode: str = "stop",
    backward_steps: int | None = None,
    stats: RefineStats | None = None,
    **options,
) -> tuple[Tensor, Tensor]:
    """Same forward as :func:`savae_fast.refine`, differentiated by autograd through every step.

    The ground truth of the package's tests and benchmarks: the K inner steps are built as
    one autograd graph (second order, ``create_graph=True``), so its gradients are exact to
    rounding, at the memory and time cost of unrolling.

    refine's stabilisers are written here in plain autograd, independently of refine's reverse
    pass: the optimiser's state S_k = (mu_k, logvar_k, p_mu_{k-1}, p_logvar_{k-1}) is one tensor
    per step whose gradient hook measures and clips it (``backward_clip``), and the steps before
    the last ``backward_steps`` are run without a graph, their result joined to lambda_0 by the
    identity (straight through).

    Args:
        mu, logvar: ``[B, D]`` initial variational parameters.
        nll_fn: ``z [B, D] -> [B]`` per-example negative log-likelihoods (twice differentiable).
        params: accepted for signature compatibility; autograd reaches every tensor ``nll_fn``
            uses regardless.
        noise: ``[steps, B, D]`` standard-normal draws (drawn from mu's device's default
            generator otherwise).
        backward_clip, backward_clip_scope, backward_clip_mode, backward_steps, stats: as for
            :func:`savae_fast.refine`.
        **options: the inner optimiser's (``steps``, ``lr``, ``momentum``, ``max_grad_norm``,
            ``kl_weight``, ``reduction``; defaults as refine's).

    Returns:
        ``(mu_K, logvar_K)``, differentiable w.r.t. ``mu``, ``logvar`` and everything ``nll_fn``
        uses.

    Raises:
        TypeError, ValueError: bad tensors or hyper-parameters, as for refine (named).

    Example:
        >>> import torch
        >>> from savae_fast.reference import unrolled
        >>> dec = torch.nn.Linear(2, 3).double()
        >>> mu = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
        >>> mu_k, lv_k = unrolled(mu, torch.zeros_like(mu), lambda z: (dec(z) ** 2).sum(1), steps=3)
        >>> mu_k.sum().backward()
        >>> mu.grad.shape
        torch.Size([4, 2])
    """
    check_state(mu, logvar)
    collect_params(params)
    cfg = optimiser_config(mu, options, "unrolled")
    clip, reversed_steps = check_stabilizers(cfg.steps, backward_clip, backward_clip_scope, backward_steps,
                                             backward_clip_mode)
    if cfg.steps == 0:
        return mu, logvar
    noise = noise_or_draw(noise, cfg.steps, mu)
    evaluations = TwiceDifferentiable(mu.device)  # cuDNN RNNs have no double backward
    first = cfg.steps - reversed_steps  # the first step differentiated through
    watch = clip > 0 or stats is not None
    hooks = (_StateHooks(clip, backward_clip_scope == "example", backward_clip_mode == "stop", cfg.steps - first,
                         stats) if watch else None)
    with torch.enable_grad():
        # The inner gradients are taken w.r.t. lambda_0 = (mu, logvar) as tensors of their own
        # (copies in the graph), not the caller's: mu and logvar may be one tensor, nll_fn may
        # close over mu (its dependence is the decoder's, not the inner objective's), and a hook
        # on a non-leaf mu must fire in the caller's backward only. Without requires_grad a copy
        # that requires it (the decoder parameters may still need the graph).
        mu0 = mu.clone() if mu.requires_grad else mu.detach().clone().requires_grad_(True)
        logvar0 = logvar.clone() if logvar.requires_grad else logvar.detach().clone().requires_grad_(True)
        mu, logvar = mu0, logvar0
        p_mu = torch.zeros_like(mu)
        p_logvar = torch.zeros_like(logvar)
        for k in range(cfg.steps + 1):
            graph = k >= first
            if k == first:
                if first > 0:  # truncation: lambda_first = lambda_0 + (what the earlier steps did), detached
                    mu = mu0 + (mu - mu0).detach()
                    logvar = logvar0 + (logvar - logvar0).detach()
                    p_mu, p_logvar = p_mu.detach(), p_logvar.detach()
                if hooks is not None:
                    mu, logvar, p_mu, p_logvar = hooks.state(k, mu, logvar, p_mu, p_logvar)
            if k == cfg.steps:
                break
            if not graph:
                mu, logvar = mu.detach().requires_grad_(True), logvar.detach().requires_grad_(True)
            z = mu + torch.exp(0.5 * logvar) * noise[k]
            nll = evaluations.evaluate(functools.partial(nll_fn, z))
            loss = cfg.scale * (nll + cfg.kl_weight * gaussian_kl(mu, logvar)).sum()
            g_mu, g_logvar = torch.autograd.grad(loss, (mu, logvar), create_graph=graph)
            if cfg.max_grad_norm > 0:
                g_mu = g_mu * torch.clamp(cfg.max_grad_norm / (g_mu.norm() + 1e-6), max=1.0)
                g_logvar = g_logvar * torch.clamp(cfg.max_grad_norm / (g_logvar.norm() + 1e-6), max=1.0)
            p_mu = cfg.momentum * p_mu - g_mu
            p_logvar = cfg.momentum * p_logvar - g_logvar
            mu = mu + cfg.lr_mu * p_mu
            logvar = logvar + cfg.lr_logvar * p_logvar
            if not graph:
                mu, logvar, p_mu, p_logvar = mu.detach(), logvar.detach(), p_mu.detach(), p_logvar.detach()
            elif hooks is not None:
                mu, logvar, p_mu, p_logvar = hooks.state(k + 1, mu, logvar, p_mu, p_logvar)
    return mu, logvar


class _StateHooks:
    """Gradient hooks on the packed optimiser state S_k = [mu_k, logvar_k, p_mu_{k-1}, p_logvar_{k-1}]:
    autograd calls the hook of S_k with dF/dS_k (every use of the step's tensors goes through
    S_k's slices), from S_K down; the hook records the norms of its lambda part and returns the
    whole of it scaled by the clip's factor."""

    def __init__(self, clip: float, per_example: bool, stop: bool, reversed_steps: int, stats: RefineStats | None):
        self.clip, self.per_example, self.stop, self.stats = clip, per_example, stop, stats
        self.aside = None  # stop: the lambda part of the rows stopped, added to dF/dS_first
        self.norms = []  # [B] row norms of dF/dlambda_k as autograd gives it (before the clip), k = K, K-1, ...
        self.after = []  # the same after the clip
        self.factors = []
        self.reversed_steps = reversed_steps

    def state(self, k, mu, logvar, p_mu, p_logvar):
        d = mu.shape[1]
        packed = torch.cat([mu, logvar, p_mu, p_logvar], dim=1)
        packed.register_hook(self.hook)
        return packed[:, :d], packed[:, d:2 * d], packed[:, 2 * d:3 * d], packed[:, 3 * d:]

    def hook(self, grad: Tensor) -> Tensor:
        rows = grad[:, : grad.shape[1] // 2].double().norm(dim=1)  # |dF/dlambda_k| per example
        self.norms.append(rows)
        if len(self.norms) == 1:  # dF/dS_K: the incoming gradient (the momentum part is 0)
            self.incoming = rows
            self.after.append(rows)
            self._fill()
            return grad
        if self.clip > 0:
            if self.per_example:
                limit = self.clip * self.incoming
                factor = torch.where(rows > limit, limit / rows, torch.ones_like(rows))
            else:
                limit = self.clip * self.incoming.square().sum().sqrt()
                total = rows.square().sum().sqrt()
                factor = (limit / total if total > limit else torch.ones((), dtype=rows.dtype)).expand_as(rows)
            self.factors.append(factor)
            if self.stop:  # the clipped lambda part of a row past the bound is set aside, the row stops
                over = (factor < 1).to(grad.dtype).unsqueeze(1)
                half = grad.shape[1] // 2
                aside = grad[:, :half] * factor.to(grad.dtype).unsqueeze(1) * over
                self.aside = aside if self.aside is None else self.aside + aside
                factor = torch.where(factor < 1, torch.zeros_like(factor), factor)
            grad = grad * factor.to(grad.dtype).unsqueeze(1)
        self.after.append(rows * (factor if self.clip > 0 else 1))
        self._fill()
        if self.aside is not None and len(self.norms) == self.reversed_steps + 1:  # the first state's gradient
            grad = torch.cat([grad[:, : self.aside.shape[1]] + self.aside, grad[:, self.aside.shape[1]:]], dim=1)
        return grad

    def _fill(self) -> None:
        """The statistics of the steps seen so far (the last call leaves those of the whole pass)."""
        if self.stats is None:
            return
        def ratio(new, old):  # 1 where a row had no gradient (a stopped row)
            return torch.where(old > 0, new / old, torch.ones_like(new))

        steps = [ratio(self.norms[i], self.after[i - 1]) for i in range(1, len(self.norms))]
        batch = [ratio(self.norms[i].square().sum().sqrt(), self.after[i - 1].square().sum().sqrt())
                 for i in range(1, len(self.norms))]
        one = torch.ones_like(self.norms[0])
        self.stats.gain = torch.stack(steps).prod(0) if steps else one
        self.stats.max_step_gain = torch.stack(steps).amax(0) if steps else one * 0
        self.stats.batch_gain = torch.stack(batch).prod() if batch else one.sum() / one.numel()
        self.stats.batch_max_step_gain = torch.stack(batch).amax() if batch else one.sum() * 0
        self.stats.clip_factor = torch.stack(self.factors).prod(0) if self.factors else (one if self.clip > 0 else None)
        self.stats.steps = len(steps)
        if len(self.norms) == self.reversed_steps + 1:
            self.stats.backwards += 1
