"""Fake (meta) kernels of the savae_fast:: operators, so that they trace
under torch.compile / FakeTensor without running. Imported only when the
compiled extension (which defines the schemas) is loaded."""

from __future__ import annotations

import torch

from savae_fast.ops.constants import FdMode


def _same_device(op: str, **tensors) -> None:
    """The compiled kernels' device check, for calls that reach these kernels: tracing
    (fake tensors share a device, so this passes) and real calls mixing meta tensors with
    others, which the dispatcher sends here and which would otherwise return garbage."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t is not None and t.device != first.device:
            raise RuntimeError(f"savae_fast::{op}: argument '{name}' is on {t.device} but '{first_name}' is on "
                               f"{first.device}")


@torch.library.register_fake("savae_fast::sample")
def _sample_fake(mu, logvar, eps):
    _same_device("sample", mu=mu, logvar=logvar, eps=eps)
    return torch.empty_like(mu)


@torch.library.register_fake("savae_fast::forward_step")
def _forward_step_fake(mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next, scale, kl_weight, lr_mu,
                       lr_logvar, momentum, max_grad_norm):
    _same_device("forward_step", mu=mu, logvar=logvar, p_mu=p_mu, p_logvar=p_logvar, eps=eps, grad_z=grad_z,
                 eps_next=eps_next)
    z_next = torch.empty_like(mu) if eps_next is not None else mu.new_empty((0,))
    return (torch.empty_like(mu), torch.empty_like(mu), torch.empty_like(mu), torch.empty_like(mu), z_next,
            mu.new_empty((2,)))


@torch.library.register_fake("savae_fast::reverse_direction")
def _reverse_direction_fake(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z, grad_norms,
                            scale, kl_weight, lr_mu, lr_logvar, max_grad_norm, fd_mode, fd_step):
    _same_device("reverse_direction", lbar_mu=lbar_mu, lbar_logvar=lbar_logvar, pbar_mu=pbar_mu,
                 pbar_logvar=pbar_logvar, mu=mu, logvar=logvar, eps=eps, grad_z=grad_z, grad_norms=grad_norms)
    n_eval = FdMode(fd_mode).eval_points
    batch, latent = mu.shape
    return (torch.empty_like(mu), torch.empty_like(mu), torch.empty_like(mu), torch.empty_like(mu),
            torch.empty_like(mu), mu.new_empty((n_eval, batch, latent)), mu.new_empty((batch,)))


@torch.library.register_fake("savae_fast::reverse_update")
def _reverse_update_fake(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, v_mu, v_logvar, logvar, eps, grad_z,
                         hvp_a, hvp_b, hvp_scale, scale, kl_weight, momentum):
    _same_device("reverse_update", lbar_mu=lbar_mu, lbar_logvar=lbar_logvar, pbar_mu=pbar_mu,
                 pbar_logvar=pbar_logvar, v_mu=v_mu, v_logvar=v_logvar, logvar=logvar, eps=eps, grad_z=grad_z,
                 hvp_a=hvp_a, hvp_b=hvp_b)
    return (torch.empty_like(lbar_mu), torch.empty_like(lbar_mu), torch.empty_like(lbar_mu),
            torch.empty_like(lbar_mu))


@torch.library.register_fake("savae_fast::accumulate_")
def _accumulate_fake(total, values):
    if len(total) != len(values):
        raise RuntimeError(f"savae_fast::accumulate_: 'total' has {len(total)} tensors but 'values' has "
                           f"{len(values)}")
    for i, (t, v) in enumerate(zip(total, values)):
        if v is not None and (v.device != t.device or v.shape != t.shape or v.dtype != t.dtype):
            raise RuntimeError(f"savae_fast::accumulate_: 'values'[{i}] ({tuple(v.shape)}, {v.dtype}, {v.device}) "
                               f"does not match 'total'[{i}] ({tuple(t.shape)}, {t.dtype}, {t.device})")
    return None
