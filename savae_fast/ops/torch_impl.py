"""The savae_fast operators written with plain PyTorch ops.

Same signatures, formulas and outputs as the compiled kernels
(csrc/savae_math.h; symbols in docs/math.md); used as ``backend="torch"`` and as the per-op reference
in the tests. No host synchronisation: branches on tensor values use
``torch.where``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from savae_fast.ops.constants import CLIP_EPS, FD_CENTRAL, FD_EXACT, FD_FORWARD


def elbo_grad(grad_z: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor, scale: float, kl_weight: float):
    """Gradient of s * [NLL + beta * KL] w.r.t. (mu, logvar) given dNLL/dz."""
    sigma = torch.exp(0.5 * logvar)
    g_mu = scale * (grad_z + kl_weight * mu)
    g_logvar = scale * (0.5 * grad_z * eps * sigma + 0.5 * kl_weight * torch.expm1(logvar))
    return g_mu, g_logvar


def clip_coef(norms: Tensor, max_grad_norm: float) -> Tensor:
    """min(1, M / (|g| + 1e-6)) per entry of ``norms``; 1 when M <= 0."""
    if not max_grad_norm > 0:
        return torch.ones_like(norms)
    return torch.clamp(max_grad_norm / (norms + CLIP_EPS), max=1.0)


def sample(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    return mu + torch.exp(0.5 * logvar) * eps


def grad_sq_norms(mu, logvar, eps, grad_z, scale, kl_weight) -> Tensor:
    """[|g_mu|^2, |g_logvar|^2] over this batch (summed over processes for global clipping)."""
    g_mu, g_logvar = elbo_grad(grad_z, mu, logvar, eps, scale, kl_weight)
    return torch.stack([g_mu.square().sum(), g_logvar.square().sum()])


def forward_step(mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next, scale, kl_weight,
                 lr_mu, lr_logvar, momentum, max_grad_norm, norms=None):
    """``norms`` (optional): the clip norms to use instead of this batch's own (data parallel)."""
    g_mu, g_logvar = elbo_grad(grad_z, mu, logvar, eps, scale, kl_weight)
    if norms is None:  # in float64: float32 squares overflow above ~1e19 per element (logvar > ~44)
        norms = torch.stack([torch.linalg.vector_norm(g_mu, dtype=torch.float64),
                             torch.linalg.vector_norm(g_logvar, dtype=torch.float64)]).to(g_mu.dtype)
    c = clip_coef(norms, max_grad_norm)
    p_mu_n = momentum * p_mu - c[0] * g_mu
    p_logvar_n = momentum * p_logvar - c[1] * g_logvar
    mu_n = mu + lr_mu * p_mu_n
    logvar_n = logvar + lr_logvar * p_logvar_n
    z_next = sample(mu_n, logvar_n, eps_next) if eps_next is not None else mu.new_empty((0,))
    return mu_n, logvar_n, p_mu_n, p_logvar_n, z_next, norms


def clip_dots(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z, scale, kl_weight, lr_mu,
              lr_logvar) -> Tensor:
    """[g_mu . pbar_mu', g_logvar . pbar_logvar'] over this batch, pbar' = pbar + lr lbar
    (summed over processes for the clip Jacobian of a globally clipped step)."""
    g_mu, g_logvar = elbo_grad(grad_z, mu, logvar, eps, scale, kl_weight)
    return torch.stack([(g_mu * (pbar_mu + lr_mu * lbar_mu)).sum(),
                        (g_logvar * (pbar_logvar + lr_logvar * lbar_logvar)).sum()])


def reverse_direction(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z,
                      grad_norms, scale, kl_weight, lr_mu, lr_logvar, max_grad_norm, fd_mode, fd_step, dots=None):
    """``dots`` (optional): the clip-Jacobian dot products to use (data parallel)."""
    pbar_mu = pbar_mu + lr_mu * lbar_mu
    pbar_logvar = pbar_logvar + lr_logvar * lbar_logvar
    c = clip_coef(grad_norms, max_grad_norm)
    if max_grad_norm > 0:
        # Clip Jacobian J v = c v - kappa g (kappa = 0 where the clip was inactive).
        g_mu, g_logvar = elbo_grad(grad_z, mu, logvar, eps, scale, kl_weight)
        if dots is None:
            dots = torch.stack([(g_mu * pbar_mu).sum(), (g_logvar * pbar_logvar).sum()])
        # kappa = M dots / (n (n + 1e-6)^2), in factors that do not overflow (n^3 passes float32's
        # range at n ~ 7e12); zero where the clip is inactive or g = 0
        n, n_eps = grad_norms, grad_norms + CLIP_EPS
        active = (c < 1) & (n > 0)
        kappa = torch.where(active, (max_grad_norm / n_eps) * (dots / torch.where(active, n, 1)) / n_eps,
                            torch.zeros_like(n))
        v_mu = c[0] * pbar_mu - kappa[0] * g_mu
        v_logvar = c[1] * pbar_logvar - kappa[1] * g_logvar
    else:
        v_mu, v_logvar = pbar_mu, pbar_logvar
    sigma_eps = torch.exp(0.5 * logvar) * eps
    u = v_mu + 0.5 * sigma_eps * v_logvar
    z = mu + sigma_eps
    row_weight = torch.ones(z.shape[0], dtype=z.dtype, device=z.device)
    if fd_mode == FD_EXACT:
        z_eval = z.unsqueeze(0)
    elif fd_mode == FD_FORWARD:
        z_eval = (z + fd_step * u).unsqueeze(0)
    elif fd_mode == FD_CENTRAL:
        z_norm = torch.linalg.vector_norm(z, dim=1)
        u_norm = torch.linalg.vector_norm(u, dim=1)
        nonzero = u_norm > 0
        r = torch.where(nonzero, fd_step * (1 + z_norm) / torch.where(nonzero, u_norm, 1), 0)
        row_weight = torch.where(nonzero, 0.5 / torch.where(nonzero, r, 1), 0)
        du = r.unsqueeze(1) * u
        z_eval = torch.stack([z + du, z - du])
    else:
        raise ValueError(f"reverse_direction: argument 'fd_mode' must be 0, 1 or 2, got {fd_mode}")
    return pbar_mu, pbar_logvar, v_mu, v_logvar, u, z_eval, row_weight


def reverse_update(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, v_mu, v_logvar, logvar, eps, grad_z,
                   hvp_a, hvp_b, hvp_scale, scale, kl_weight, momentum):
    hzz_u = (hvp_a - hvp_b) * hvp_scale if hvp_b is not None else hvp_a * hvp_scale
    sigma_eps = torch.exp(0.5 * logvar) * eps
    hv_mu = scale * (hzz_u + kl_weight * v_mu)
    hv_logvar = scale * (0.5 * sigma_eps * hzz_u + 0.25 * sigma_eps * grad_z * v_logvar
                         + 0.5 * kl_weight * torch.exp(logvar) * v_logvar)
    return lbar_mu - hv_mu, lbar_logvar - hv_logvar, momentum * pbar_mu, momentum * pbar_logvar


def accumulate_(total, values) -> None:
    """In place total[i] += values[i] for the values given (one fused call for the list)."""
    pairs = [(t, v) for t, v in zip(total, values) if v is not None]
    if pairs:
        torch._foreach_add_([t for t, _ in pairs], [v for _, v in pairs])
