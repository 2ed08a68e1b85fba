"""The precision the decoder really computes in, and full-float32 decoder evaluations.

A float32 decoder does not always compute in float32: on CUDA, cuDNN convolutions
and RNNs use TF32 by default (10-bit mantissa) and cuBLAS matmuls may (PyTorch's
``fp32_precision`` / ``allow_tf32`` settings); on CPU, oneDNN can be told to use
TF32 or bfloat16. The finite-difference steps must follow the precision the
decoder's gradient is rounded to, and a user who wants float32 accuracy needs the
refinement's own decoder evaluations in full float32 whatever the global settings.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch
from torch import Tensor

# Precision keys of the default finite-difference steps (refine.api.DEFAULT_FD_EPS).
TF32 = "tf32"

# The settings (torch >= 2.9: torch.backends.<leaf>.fp32_precision) per device type,
# each with its parent: the backend's own switch (cudnn.enabled, mkldnn.enabled) and
# the setting a leaf inherits while it is "none" (then the root, torch.backends).
_SETTINGS = {
    "cuda": (("cuda.matmul", None), ("cudnn.conv", "cudnn"), ("cudnn.rnn", "cudnn")),
    "cpu": (("mkldnn.matmul", "mkldnn"), ("mkldnn.conv", "mkldnn"), ("mkldnn.rnn", "mkldnn")),
}


def _backend(path: str):
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _has_fp32_precision_api() -> bool:
    return isinstance(getattr(torch.backends, "fp32_precision", None), str)


def _resolved(leaf: str, parent: str | None) -> str:
    """The precision of a setting: the first of it and its parents that is not "none"."""
    for path in (leaf, parent, None):
        obj = _backend(path) if path else torch.backends
        value = getattr(obj, "fp32_precision", "none") if obj is not None else "none"
        if value != "none":
            return value
    return "ieee"


def reduced_fp32_settings(device_type: str) -> dict[str, str]:
    """The settings under which float32 matmuls, convolutions or RNNs on this device type
    compute at reduced precision, as {setting: "tf32" | "bf16"} (empty: full float32)."""
    out = {}
    if _has_fp32_precision_api():
        for leaf, parent in _SETTINGS.get(device_type, ()):
            if _backend(leaf) is None or (parent and not getattr(_backend(parent), "enabled", True)):
                continue
            value = _resolved(leaf, parent)
            if value != "ieee":
                out[f"torch.backends.{leaf}.fp32_precision"] = value
        return out
    if device_type == "cuda":  # torch < 2.9: the allow_tf32 flags
        if torch.backends.cuda.matmul.allow_tf32:
            out["torch.backends.cuda.matmul.allow_tf32"] = TF32
        if torch.backends.cudnn.enabled and torch.backends.cudnn.allow_tf32:
            out["torch.backends.cudnn.allow_tf32"] = TF32
    return out


def decoder_precision(mu: Tensor, full_fp32: bool = False, reduced: dict | None = None) -> torch.dtype | str:
    """The precision the decoder computes in: the autocast dtype when refine is called
    inside an autocast region for mu's device; "tf32" (or bfloat16) for float32 state on
    a device whose float32 matmuls/convolutions/RNNs are set to reduced precision (unless
    ``full_fp32``: refine switches that off around its decoder evaluations); else mu's dtype.
    ``reduced``: reduced_fp32_settings(mu's device type) when the caller has read them already."""
    device_type = mu.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            low = torch.get_autocast_dtype(device_type)
            if low in (torch.bfloat16, torch.float16):
                return low
    except (RuntimeError, TypeError):  # device type without autocast support
        pass
    if mu.dtype == torch.float32 and not full_fp32:
        reduced = set((reduced_fp32_settings(device_type) if reduced is None else reduced).values())
        if "bf16" in reduced:
            return torch.bfloat16
        if reduced:
            return TF32
    return mu.dtype


@contextlib.contextmanager
def full_fp32(device_type: str):
    """Float32 matmuls, convolutions and RNNs of this device type in full float32 inside the
    block; the previous settings are restored on exit, exceptions included. The settings are
    process-wide: other threads computing at the same time see them too."""
    saved = []
    try:
        if _has_fp32_precision_api():
            for leaf, parent in _SETTINGS.get(device_type, ()):
                obj = _backend(leaf)
                if obj is not None and _resolved(leaf, parent) != "ieee":
                    saved.append((obj, "fp32_precision", obj.fp32_precision))
                    obj.fp32_precision = "ieee"
        elif device_type == "cuda":
            for obj in (torch.backends.cuda.matmul, torch.backends.cudnn):
                if obj.allow_tf32:
                    saved.append((obj, "allow_tf32", True))
                    obj.allow_tf32 = False
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


_warned = False
_warn_lock = threading.Lock()


def warn_reduced_precision(device_type: str, settings: dict[str, str]) -> None:
    """Once per process: the decoder's reduced float32 precision limits refine's accuracy."""
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    names = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    warnings.warn(
        f"refine: float32 decoder computations on {device_type} run at reduced precision ({names}), "
        "which limits the float32 gradient through the refinement to a relative accuracy of about 5e-2 "
        "(fd_forward), 5e-3 (fd_central) or 1e-3 (exact) instead of 1e-4 to 1e-7; the difference steps are "
        "chosen for it. "
        "Pass fp32_precision='ieee' to run refine's decoder evaluations in full float32 (or set those "
        "flags to 'ieee' yourself).",
        UserWarning,
        stacklevel=3,
    )


_warned_low_precision = False


def warn_low_precision_differences(cfg) -> None:
    """Once per process: hvp="fd_forward" with the decoder under bfloat16 / float16 autocast."""
    global _warned_low_precision
    if cfg.precision not in (torch.bfloat16, torch.float16) or cfg.hvp.name != "fd_forward":
        return
    with _warn_lock:
        if _warned_low_precision:
            return
        _warned_low_precision = True
    name = "bfloat16" if cfg.precision == torch.bfloat16 else "float16"
    warnings.warn(
        f"refine: hvp='fd_forward' with the decoder under {name} autocast: its one-sided quotient of a gradient "
        f"rounded to {name} loses most of its digits (small LSTM decoder under bfloat16 autocast, CPU, the "
        "refinement part of the gradient: 1.1e-1 relative error at B 32, 6e-1 at B 4, against 1.5e-2 for "
        "bfloat16 unrolled autograd). hvp='fd_central' (2e-3), 'fd_richardson' (1e-4) or 'exact' (3e-5) stay "
        "accurate there.",
        UserWarning,
        stacklevel=3,
    )
