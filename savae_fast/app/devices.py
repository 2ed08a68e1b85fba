"""Which device the application runs on."""

from __future__ import annotations

import torch


def parse_device(name) -> torch.device:
    """The torch device ``name`` names (CPU or CUDA); ConfigError for anything else."""
    from savae_fast.app.errors import ConfigError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"device (--device) must be 'auto' or a torch device such as 'cpu' or 'cuda:0', "
                          f"got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: only 'cpu' and 'cuda' devices are supported")
    return device


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    from savae_fast.app.errors import ConfigError

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r} requested but no CUDA GPU is available (use --device cpu or auto)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r} requested but only {count} CUDA GPU(s) are visible")
    return device
