"""Data-parallel refinement: every process refines its share of the global batch
exactly as one process would refine the whole batch.

Three quantities of the inner optimiser couple the examples of a batch: the
clip norms of g_mu and g_logvar, the clip-Jacobian dot products, and the
normalisation of fd_forward's incoming gradient. With a process group, they
are summed over the processes (all_reduce). The fused kernels compute those
reductions internally, so while clipping is active the clip-coupled steps use
the pure-PyTorch formulas split at the reduction points.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from savae_fast.ops import Backend, torch_impl


def check_process_group(group) -> None:
    """None, or a ProcessGroup of an initialised torch.distributed (anything else would
    silently refine as one process)."""
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("refine: argument 'process_group' was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first, or pass process_group=None)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"refine: argument 'process_group' must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(group).__name__}")


def world_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def global_batch(batch: int, group) -> int:
    if world_size(group) == 1:
        return batch
    return int(all_reduce_sum(torch.tensor([batch], dtype=torch.float64), group).item())


def clip_coupled_backend(be: Backend, group) -> Backend:
    """``be`` with forward_step and reverse_direction using global clip norms and dots."""

    def forward_step(mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next, scale, kl_weight, lr_mu, lr_logvar,
                     momentum, max_grad_norm):
        sq = torch_impl.grad_sq_norms(mu, logvar, eps, grad_z, scale, kl_weight)
        norms = all_reduce_sum(sq, group).sqrt()
        return torch_impl.forward_step(mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next, scale, kl_weight, lr_mu,
                                       lr_logvar, momentum, max_grad_norm, norms=norms)

    def reverse_direction(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z, grad_norms, scale,
                          kl_weight, lr_mu, lr_logvar, max_grad_norm, fd_mode, fd_step):
        dots = all_reduce_sum(torch_impl.clip_dots(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps,
                                                   grad_z, scale, kl_weight, lr_mu, lr_logvar), group)
        return torch_impl.reverse_direction(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z,
                                            grad_norms, scale, kl_weight, lr_mu, lr_logvar, max_grad_norm, fd_mode,
                                            fd_step, dots=dots)

    return be._replace(name=be.name + "+dist", forward_step=forward_step, reverse_direction=reverse_direction)
