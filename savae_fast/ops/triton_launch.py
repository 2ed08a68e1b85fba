"""Cached launches of Triton kernels: the host path of ``backend="triton"``.

``JITFunction.run`` re-derives a kernel's specialisation from every argument on
every call (the binder, the cache key, option handling, hooks), and Triton's
launcher then asks the CUDA driver about every tensor's pointer. For the small
tensors of an SA-VAE refinement that host work is most of an operator's cost.

:class:`CachedKernel` launches the compiled kernel that Triton's own ``run``
returned for the same specialisation, through the same ``CompiledKernel.run``
call that ``JITFunction.run`` makes, with tensors passed as their device
addresses. The cache key holds everything Triton specialises on, and more:

* each tensor's dtype (all addresses 16-byte aligned, else Triton's path);
* each int's width class (i32 / i64 / u64), whether it is 1 (Triton makes a
  constexpr of it) and whether it is a multiple of 16;
* the Python type of every other argument (floats and bools are never specialised);
* the compile-time keywords (constexprs, ``num_warps``), the device, Triton's
  debug / instrumentation settings.

So two calls with one key get the kernel Triton's ``run`` would pick (tested
with Triton's own ``warmup``, which returns that kernel without launching).
Anything outside that design goes through ``JITFunction.run`` unchanged: the
first call of each key (it compiles), the interpreter, launch or pre-run hooks
(profilers), tensors on another device than the current one or of a subclass,
and Triton releases whose launch call was not checked (``SUPPORTED_TRITON``).
A launcher that refuses a cached call's arguments (it raises before launching) puts
that kernel on Triton's path for good, with a warning.
``SAVAE_FAST_TRITON_LAUNCH=jit`` turns the cache off.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

try:
    import triton
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    JITFunction = None

# Releases whose JITFunction.run ends in
#   kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
#              launch_metadata, launch_enter_hook, launch_exit_hook, *bound_args.values())
# with launch_metadata None when no enter hook is set, constexpr values included among the
# arguments, Triton's settings in triton.knobs, and whose launchers take a Python int as a
# device address: [first, last] as (major, minor). PyTorch's Inductor launches its compiled
# Triton kernels with the same call. CI runs the tests on 3.6 and 3.8.
SUPPORTED_TRITON = ((3, 4), (3, 8))

_I32 = 1 << 31
_I64 = 1 << 63


def _version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def cache_supported(version: str | None = None) -> bool:
    """Whether cached launches are used with this Triton release (default: the installed one)."""
    if triton is None:
        return False
    v = _version(version if version is not None else triton.__version__)
    return SUPPORTED_TRITON[0] <= v <= SUPPORTED_TRITON[1]


def enabled() -> bool:
    """Cached launches are on (by default: a supported Triton and SAVAE_FAST_TRITON_LAUNCH
    is not ``jit``)."""
    return _ENABLED


def set_enabled(on: bool) -> bool:
    """Turn cached launches on (where the Triton release is supported) or off; returns the
    previous setting. For comparisons with Triton's own launch path."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(on) and cache_supported()
    return previous


_ENABLED = cache_supported() and os.environ.get("SAVAE_FAST_TRITON_LAUNCH", "cached") != "jit"


def _hook_set(hook: Any) -> bool:
    # None, or (recent releases) an empty HookChain: nothing to call around a launch
    return hook is not None and (type(hook).__name__ != "HookChain" or bool(hook.calls))


def _knobs_key() -> tuple | None:
    """Triton's global settings that enter its cache key; None when a hook is set
    (profilers and inspection hooks must see Triton's own launch)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return None
    runtime = knobs.runtime
    if (_hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)
            or getattr(runtime, "add_stages_inspection_hook", None) is not None):
        return None
    return runtime.debug, getattr(knobs.compilation, "instrumentation_mode", None)


def _int_key(v: int) -> tuple:
    width = 32 if -_I32 <= v < _I32 else 64 if -_I64 <= v < _I64 else 65
    return width, v == 1, v % 16 == 0


class CachedKernel:
    """A Triton kernel, launched as ``kernel[grid](*args, **meta)`` like the ``JITFunction``
    it wraps; positional arguments are the runtime parameters in order, ``meta`` the
    constexpr parameters (by name) and launch options such as ``num_warps``."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.compiled: dict[tuple, Any] = {}
        self.cacheable = JITFunction is not None and isinstance(fn, JITFunction)
        if self.cacheable:
            params = fn.params
            kinds = [p.is_constexpr for p in params]
            # runtime parameters first, constexprs after: the launch passes them in that order
            self.cacheable = kinds == sorted(kinds)
            self.n_runtime = kinds.count(False)
            self.constexprs = tuple((p.name, p.default) for p in params if p.is_constexpr)

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def cache_key(self, device: int, args: tuple, meta: dict) -> tuple[tuple, list] | None:
        """(the key, the launch arguments), or None where the call must go through Triton."""
        knobs = _knobs_key()
        if knobs is None or self.fn.pre_run_hooks or len(args) != self.n_runtime:
            return None
        key: list = [device, knobs, *meta.items()]
        values = []
        addresses = 0
        for a in args:
            t = type(a)
            if t is torch.Tensor:
                if a.get_device() != device:
                    return None  # Triton's launcher checks such pointers; let it
                p = a.data_ptr()
                addresses |= p
                key.append(a.dtype)
                values.append(p)
            elif t is int:
                key.append(_int_key(a))
                values.append(a)
            elif t is float or t is bool:
                key.append(t)
                values.append(a)
            else:
                return None
        if addresses % 16:
            return None  # a tensor not 16-byte aligned (a view): rare, Triton's path
        for name, default in self.constexprs:
            values.append(meta.get(name, default))
        return tuple(key), values

    def launch(self, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
        if not (_ENABLED and self.cacheable) or torch.compiler.is_compiling():
            self.fn[grid](*args, **meta)  # (torch.compile traces Triton's own launches)
            return
        active = _driver.active
        device = active.get_current_device()
        found = self.cache_key(device, args, meta)
        compiled = None if found is None else self.compiled.get(found[0])
        if compiled is None:
            kernel = self.fn[grid](*args, **meta)  # Triton's path: compiles on the first call
            if found is not None and kernel is not None:
                if hasattr(kernel, "result"):  # an asynchronous compilation's future
                    kernel = kernel.result()
                self.compiled[found[0]] = kernel
            return
        n = len(grid)
        try:
            compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                         active.get_current_stream(device), compiled.function, compiled.packed_metadata, None, None,
                         None, *found[1])
        except TypeError as exc:
            # A launcher that takes its arguments otherwise rejects them before launching:
            # this kernel goes through Triton's path from now on.
            self.cacheable = False
            warnings.warn(f"savae_fast: Triton {triton.__version__}'s launcher refused a cached launch of "
                          f"{getattr(self.fn, '__name__', self.fn)} ({exc}); using Triton's own launch path",
                          RuntimeWarning, stacklevel=3)
            self.fn[grid](*args, **meta)
