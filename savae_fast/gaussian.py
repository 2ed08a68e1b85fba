"""The diagonal Gaussian of the variational posterior and the standard-normal prior:
sampling, KL divergences and log-densities, per example (summed over the latent
dimension). One definition used by refine's references, the models' objectives and
the evaluation; the fused kernels implement the same formulas (docs/math.md)."""

from __future__ import annotations

import math

from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


def sample(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = mu + exp(logvar / 2) * eps."""
    return mu + (0.5 * logvar).exp() * eps


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per example.

    Args:
        mu, logvar: ``[..., D]`` means and log-variances.

    Returns:
        ``[...]``: the KL summed over the last dimension.

    Example:
        >>> float(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max())  # the prior itself
        0.0
        >>> gaussian_kl(torch.ones(1, 2), torch.zeros(1, 2))
        tensor([1.])
    """
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)


def gaussian_kl_between(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) per example, [B]."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(dim=-1)


def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(dim=-1)


def standard_normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(dim=-1)
