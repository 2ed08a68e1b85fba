"""Loading of the compiled extension and probes for which kernels it has."""

from __future__ import annotations

import torch

OP_NAMES = ("sample", "forward_step", "reverse_direction", "reverse_update", "accumulate_")

try:  # importing _C registers the savae_fast:: operators and their CPU/CUDA kernels
    from savae_fast import _C  # type: ignore[attr-defined]

    EXTENSION_ERROR: Exception | None = None
except ImportError as exc:  # built without the extension (SAVAE_FAST_SKIP_EXT) or not built yet
    _C = None
    EXTENSION_ERROR = exc


def extension_loaded() -> bool:
    return _C is not None


def build_info() -> dict:
    """How the extension was built ({} when it is not available)."""
    return dict(_C.build_info()) if _C is not None else {}


_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether torch.ops.savae_fast.<op> has a compiled kernel for this device type."""
    if _C is None or device_type not in _DISPATCH_KEY:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"savae_fast::{op}", _DISPATCH_KEY[device_type])


# Fixed once the extension is imported; a plain dict lookup also traces under torch.compile.
_AVAILABLE = {dt: all(has_kernel(op, dt) for op in OP_NAMES) for dt in _DISPATCH_KEY}


def available(device: torch.device | str) -> bool:
    """Whether every compiled savae_fast kernel exists for ``device``."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _AVAILABLE.get(device_type, False)
