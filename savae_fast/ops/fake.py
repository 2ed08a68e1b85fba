"""Fake (meta) kernels of the savae_fast:: operators, so that they trace
under torch.compile / FakeTensor without running. Imported only when the
compiled extension (which defines the schemas) is loaded."""

from __future__ import annotations

import torch

from savae_fast.ops.constants import FdMode


@torch.library.register_fake("savae_fast::sample")
def _sample_fake(mu, logvar, eps):
    return torch.empty_like(mu)


@torch.library.register_fake("savae_fast::forward_step")
def _forward_step_fake(mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next, scale, kl_weight, lr_mu,
                       lr_logvar, momentum, max_grad_norm):
    z_next = torch.empty_like(mu) if eps_next is not None else mu.new_empty((0,))
    return (torch.empty_like(mu), torch.empty_like(mu), torch.empty_like(mu), torch.empty_like(mu), z_next,
            mu.new_empty((2,)))


@torch.library.register_fake("savae_fast::reverse_direction")
def _reverse_direction_fake(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z, grad_norms,
                            scale, kl_weight, lr_mu, lr_logvar, max_grad_norm, fd_mode, fd_step):
    n_eval = FdMode(fd_mode).eval_points
    batch, latent = mu.shape
    return (torch.empty_like(mu), torch.empty_like(mu), torch.empty_like(mu), torch.empty_like(mu),
            torch.empty_like(mu), mu.new_empty((n_eval, batch, latent)), mu.new_empty((batch,)))


@torch.library.register_fake("savae_fast::reverse_update")
def _reverse_update_fake(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, v_mu, v_logvar, logvar, eps, grad_z,
                         hvp_a, hvp_b, hvp_scale, scale, kl_weight, momentum):
    return (torch.empty_like(lbar_mu), torch.empty_like(lbar_mu), torch.empty_like(lbar_mu),
            torch.empty_like(lbar_mu))


@torch.library.register_fake("savae_fast::accumulate_")
def _accumulate_fake(total, values):
    return None
