"""Which device the application runs on."""

from __future__ import annotations

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
