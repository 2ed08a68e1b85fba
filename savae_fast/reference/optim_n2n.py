"""The SA-VAE authors' algorithm as published (harvardnlp/sa-vae, optim_n2n.py).

Re-implemented from the paper and the published algorithm, behind the same
call signature as :func:`savae_fast.refine`, so that benchmarks can compare
time, memory and gradient error. Faithful in the parts that matter for those
comparisons:

* forward: inner loss in lambda-space, one decoder forward/backward per step
  with the parameter gradients of every step stored (K x |theta| values);
  the clipped lambda-gradients are stored as the finite-difference base;
* backward: one-sided difference in lambda-space along the momentum adjoint
  (no clip Jacobian), step ``eps`` (1e-5), and the authors' heuristics:
  the perturbed gradients are clipped jointly, the parameter term and the
  lambda adjoint are clipped to ``max_grad_norm`` in every reverse step.

One deliberate difference: the published code reseeds the global generator
per step; here each step's generator state is saved and replayed, which gives
the decoder the same random numbers in the backward (the purpose of the
reseeding) and makes the three implementations compute the same function.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from savae_fast.gaussian import gaussian_kl
from savae_fast.refine.rng import RngState
from savae_fast.refine.validation import check_state, collect_params, noise_or_draw, optimiser_config


def _clip_(tensors, max_norm: float) -> None:
    """In-place joint clip of a list of tensors (the published clip_grad_norm)."""
    total = sum(t.norm() ** 2 for t in tensors) ** 0.5
    coef = max_norm / (total + 1e-6)
    if coef < 1:  # a host sync on GPU, as published
        for t in tensors:
            t.mul_(coef)


class _OptimN2N(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, nll_fn, eps, noise, heuristics, mu, logvar, *params):
        diff_params = [p for p in params if p.requires_grad]
        steps = cfg.steps
        # K stored copies of every parameter gradient, as published.
        param_grads = [torch.zeros((steps, *p.shape), dtype=p.dtype, device=p.device) for p in diff_params]
        lam_cache = [torch.zeros((steps, *mu.shape), dtype=mu.dtype, device=mu.device) for _ in range(2)]
        grad_cache = [torch.zeros_like(c) for c in lam_cache]
        rng = []
        mom = [torch.zeros_like(mu), torch.zeros_like(logvar)]
        lam = [mu.detach(), logvar.detach()]
        lrs = (cfg.lr_mu, cfg.lr_logvar)
        for k in range(steps):
            rng.append(RngState(mu.device))
            with torch.enable_grad():
                x = [t.detach().requires_grad_(True) for t in lam]
                loss = _inner_loss(cfg, nll_fn, x, noise[k])
                grads = torch.autograd.grad(loss, (*x, *diff_params), allow_unused=True)
            g_lam = [g.detach().clone() for g in grads[:2]]
            if cfg.max_grad_norm > 0:
                _clip_([g_lam[0]], cfg.max_grad_norm)
                _clip_([g_lam[1]], cfg.max_grad_norm)
            for store, g in zip(param_grads, grads[2:]):
                if g is not None:
                    store[k].copy_(g)
            for i in range(2):
                lam_cache[i][k].copy_(lam[i])
                grad_cache[i][k].copy_(g_lam[i])
                mom[i] = cfg.momentum * mom[i] - g_lam[i] if k > 0 else -g_lam[i]
            lam = [lam[i] + lrs[i] * mom[i] for i in range(2)]
        ctx.cfg, ctx.nll_fn, ctx.eps, ctx.noise, ctx.heuristics = cfg, nll_fn, eps, noise, heuristics
        ctx.state = (param_grads, lam_cache, grad_cache, rng, diff_params)
        ctx.param_requires_grad = [p.requires_grad for p in params]
        return lam[0], lam[1]

    @staticmethod
    def backward(ctx, grad_mu, grad_logvar):
        cfg, nll_fn, r, noise = ctx.cfg, ctx.nll_fn, ctx.eps, ctx.noise
        clip_perturbed, clip_reverse = ctx.heuristics
        param_grads, lam_cache, grad_cache, rng, params = ctx.state
        lbar = [grad_mu if grad_mu is not None else torch.zeros_like(lam_cache[0][0]),
                grad_logvar if grad_logvar is not None else torch.zeros_like(lam_cache[1][0])]
        pbar = [torch.zeros_like(lbar[0]), torch.zeros_like(lbar[1])]
        theta_bar = [torch.zeros_like(p) for p in params]
        lrs = (cfg.lr_mu, cfg.lr_logvar)
        caller = RngState(lbar[0].device)
        try:
            for k in reversed(range(cfg.steps)):
                pbar = [pbar[i] + lrs[i] * lbar[i] for i in range(2)]
                rng[k].restore()
                with torch.enable_grad():
                    x = [(lam_cache[i][k] + r * pbar[i]).requires_grad_(True) for i in range(2)]
                    loss = _inner_loss(cfg, nll_fn, x, noise[k])
                    grads = torch.autograd.grad(loss, (*x, *params), allow_unused=True)
                grads = [g.detach() if g is not None else torch.zeros_like(t)
                         for g, t in zip(grads, (*x, *params))]
                if cfg.max_grad_norm > 0 and clip_perturbed:
                    _clip_(grads, cfg.max_grad_norm)
                h_theta = [(g - store[k]) / r for g, store in zip(grads[2:], param_grads)]
                if cfg.max_grad_norm > 0 and clip_reverse and h_theta:
                    _clip_(h_theta, cfg.max_grad_norm)
                for tb, h in zip(theta_bar, h_theta):
                    tb.sub_(h)
                h_lam = [(grads[i] - grad_cache[i][k]) / r for i in range(2)]
                lbar = [lbar[i] - h_lam[i] for i in range(2)]
                if cfg.max_grad_norm > 0 and clip_reverse:
                    _clip_(lbar, cfg.max_grad_norm)
                pbar = [p * cfg.momentum for p in pbar]
        finally:
            caller.restore()
        it = iter(theta_bar)
        out = [next(it) if needs else None for needs in ctx.param_requires_grad]
        return (None, None, None, None, None, lbar[0], lbar[1], *out)


def _inner_loss(cfg, nll_fn, lam, eps):
    mu, logvar = lam
    z = mu + torch.exp(0.5 * logvar) * eps
    return cfg.scale * (nll_fn(z) + cfg.kl_weight * gaussian_kl(mu, logvar)).sum()


def optim_n2n(
    mu: Tensor,
    logvar: Tensor,
    nll_fn: Callable[[Tensor], Tensor],
    params: Iterable[Tensor] = (),
    *,
    eps: float = 1e-5,
    noise: Tensor | None = None,
    clip_perturbed: bool = True,
    clip_reverse: bool = True,
    **options,
) -> tuple[Tensor, Tensor]:
    """The authors' refinement: same forward as :func:`savae_fast.refine`, their backward
    (lambda-space finite differences with step ``eps``).

    The published algorithm (harvardnlp/sa-vae ``OptimN2N``), for comparison and for
    reproducing the paper: one-sided differences in lambda = (mu, logvar) with the absolute
    step ``eps``, and their clipping of the joint backward vector at ``max_grad_norm`` every
    step (which makes its gradient wrong where that clip is active: docs/accuracy.md).

    Args:
        mu, logvar: ``[B, D]`` initial variational parameters.
        nll_fn: ``z [B, D] -> [B]`` per-example negative log-likelihoods.
        params: the decoder parameters that get gradients (their ``update_params``).
        eps: the authors' absolute difference step (> 0; not refine's relative ``fd_eps``).
        noise: ``[steps, B, D]`` standard-normal draws (drawn otherwise).
        clip_perturbed: the published joint clip (to ``max_grad_norm``) of the gradients w.r.t. lambda
            and theta at the perturbed point, before the difference is taken (the stored base gradients
            are not clipped jointly). Where it is active the quotient is replaced by a large term along
            the inner gradient, which the clips below cut to norm ``max_grad_norm``. False: off (an
            ablation, not the published algorithm).
        clip_reverse: the published clips of the parameter term and of the lambda adjoint to
            ``max_grad_norm`` in every reverse step. False: off (an ablation).
        **options: the inner optimiser's, as :func:`savae_fast.reference.unrolled`.

    Returns:
        ``(mu_K, logvar_K)``, differentiable w.r.t. ``mu``, ``logvar`` and ``params``.

    Raises:
        TypeError, ValueError: bad tensors or hyper-parameters, ``eps`` <= 0 (named).

    Example:
        >>> import torch
        >>> from savae_fast.reference import optim_n2n
        >>> dec = torch.nn.Linear(2, 3)
        >>> mu = torch.zeros(4, 2, requires_grad=True)
        >>> mu_k, lv_k = optim_n2n(mu, torch.zeros_like(mu), lambda z: (dec(z) ** 2).sum(1), dec.parameters(),
        ...                        steps=3)
        >>> mu_k.sum().backward()
        >>> dec.weight.grad.shape
        torch.Size([3, 2])
    """
    check_state(mu, logvar)
    params = collect_params(params)
    cfg = optimiser_config(mu, options, "optim_n2n")
    if not eps > 0:
        raise ValueError(f"optim_n2n: argument 'eps' must be > 0, got {eps!r}")
    if cfg.steps == 0:
        return mu, logvar
    noise = noise_or_draw(noise, cfg.steps, mu)
    heuristics = (bool(clip_perturbed), bool(clip_reverse))
    return _OptimN2N.apply(cfg, nll_fn, float(eps), noise, heuristics, mu, logvar, *params)
