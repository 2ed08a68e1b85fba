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
from savae_fast.refine.validation import check_state, collect_params, noise_or_draw, optimiser_config


def unrolled(
    mu: Tensor,
    logvar: Tensor,
    nll_fn: Callable[[Tensor], Tensor],
    params: Iterable[Tensor] = (),
    *,
    noise: Tensor | None = None,
    **options,
) -> tuple[Tensor, Tensor]:
    """Same forward as :func:`savae_fast.refine`, differentiated by autograd through every step.

    The ground truth of the package's tests and benchmarks: the K inner steps are built as
    one autograd graph (second order, ``create_graph=True``), so its gradients are exact to
    rounding, at the memory and time cost of unrolling.

    Args:
        mu, logvar: ``[B, D]`` initial variational parameters.
        nll_fn: ``z [B, D] -> [B]`` per-example negative log-likelihoods (twice differentiable).
        params: accepted for signature compatibility; autograd reaches every tensor ``nll_fn``
            uses regardless.
        noise: ``[steps, B, D]`` standard-normal draws (drawn from mu's device's default
            generator otherwise).
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
    if cfg.steps == 0:
        return mu, logvar
    noise = noise_or_draw(noise, cfg.steps, mu)
    evaluations = TwiceDifferentiable(mu.device)  # cuDNN RNNs have no double backward
    with torch.enable_grad():
        # The inner gradients are taken w.r.t. lambda_0 = (mu, logvar) as tensors of their own
        # (copies in the graph), not the caller's: mu and logvar may be one tensor, nll_fn may
        # close over mu (its dependence is the decoder's, not the inner objective's), and a hook
        # on a non-leaf mu must fire in the caller's backward only. Without requires_grad a copy
        # that requires it (the decoder parameters may still need the graph).
        mu = mu.clone() if mu.requires_grad else mu.detach().clone().requires_grad_(True)
        logvar = logvar.clone() if logvar.requires_grad else logvar.detach().clone().requires_grad_(True)
        p_mu = torch.zeros_like(mu)
        p_logvar = torch.zeros_like(logvar)
        for k in range(cfg.steps):
            z = mu + torch.exp(0.5 * logvar) * noise[k]
            nll = evaluations.evaluate(functools.partial(nll_fn, z))
            loss = cfg.scale * (nll + cfg.kl_weight * gaussian_kl(mu, logvar)).sum()
            g_mu, g_logvar = torch.autograd.grad(loss, (mu, logvar), create_graph=True)
            if cfg.max_grad_norm > 0:
                g_mu = g_mu * torch.clamp(cfg.max_grad_norm / (g_mu.norm() + 1e-6), max=1.0)
                g_logvar = g_logvar * torch.clamp(cfg.max_grad_norm / (g_logvar.norm() + 1e-6), max=1.0)
            p_mu = cfg.momentum * p_mu - g_mu
            p_logvar = cfg.momentum * p_logvar - g_logvar
            mu = mu + cfg.lr_mu * p_mu
            logvar = logvar + cfg.lr_logvar * p_logvar
    return mu, logvar
