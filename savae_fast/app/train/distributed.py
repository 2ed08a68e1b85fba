"""Data-parallel training under torchrun: the process group, each process's share of a
batch, and an objective whose random draws are the global batch's."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from savae_fast.app.train.config import TrainConfig
from savae_fast.app.train.objectives import Objective


class Distributed:
    """torchrun environment (RANK / WORLD_SIZE / LOCAL_RANK); one process otherwise."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.group = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if self.enabled:
            self.group = dist.group.WORLD

    def shard(self, batch: torch.Tensor) -> slice:
        """This process's contiguous share of a global batch (equal shares)."""
        per = batch.shape[0] // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def sum(self, values: list[float], device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


class ShardedObjective(Objective):
    """Objective whose random draws are slices of the global batch's draws, so that a
    data-parallel run computes what one process computes on the whole batch."""

    def __init__(self, model, cfg: TrainConfig, d: Distributed):
        super().__init__(model, cfg, d.group)
        self.d = d
        self.global_batch = 0
        self.local = slice(None)

    def draw_eps(self, mu: Tensor) -> Tensor:
        return torch.randn((self.global_batch, mu.shape[1]), device=mu.device, dtype=mu.dtype)[self.local]

    def refine_noise(self) -> Tensor:
        return torch.randn((self.cfg.svi_steps, self.global_batch, self.cfg.latent_dim),
                           device=self.device)[:, self.local]

    def forward(self, x, beta, global_batch: int, local: slice):
        self.global_batch, self.local = global_batch, local
        return super().forward(x, beta)

    @property
    def device(self):
        return next(self.model.parameters()).device
