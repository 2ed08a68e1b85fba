"""Triton's launch path without a GPU, for testing savae_fast.ops.triton_launch.

A fake active driver (current device -1, where CPU tensors live, so they count as
"on the current device"), and compiled kernels that record each launch instead of
running: ``JITFunction.run`` (binder, cache key, compiled-kernel lookup, the launch
call) runs unchanged above them. Every ``CachedKernel`` launch is paired with the
launch Triton's own path makes for the same call, so the two can be compared.

Run as a script (no TRITON_INTERPRET), it drives the real kernels of
``savae_fast.ops.triton_impl`` through every operator path twice and prints a JSON
report of the paired launches; with ``--time`` it prints each operator's host time
through Triton's run and through the cache (launches recorded, not issued).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

DEVICE = -1  # torch.Tensor.get_device() of a CPU tensor


class FakeDriver:
    def get_current_device(self):
        return DEVICE

    def get_current_stream(self, device=None):
        return 1234

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


@dataclasses.dataclass
class Launch:
    kernel: Any
    grid: tuple
    stream: Any
    function: Any
    packed_metadata: Any
    hooks: tuple
    args: tuple


class FakeCompiled:
    """Stands for a CompiledKernel: the attributes and the run call JITFunction.run uses."""

    def __init__(self, log: list, name: str):
        self.log, self.name = log, name
        self.function = object()
        self.packed_metadata = ("packed", name)

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
        self.log.append(Launch(self, (gx, gy, gz), stream, function, packed_metadata, (enter_hook, exit_hook), args))


def install(monkeypatch, jit_fns, log: list) -> None:
    """The fake driver, and compilation of each JITFunction in ``jit_fns`` replaced by a
    recording FakeCompiled (stored in Triton's own kernel cache, as a compiled one is)."""
    from triton.runtime import driver

    monkeypatch.setattr(driver, "_active", FakeDriver())
    for fn in jit_fns:
        def _do_compile(key, signature, device, constexprs, options, attrs, warmup, fn=fn):
            kernel = FakeCompiled(log, fn.__name__)
            fn.device_caches[device][0][key] = kernel
            return kernel

        monkeypatch.setattr(fn, "_do_compile", _do_compile, raising=False)


def pair_launches(monkeypatch, log: list, pairs: list) -> None:
    """After each CachedKernel launch, launch the same call through JITFunction.run and
    append (this launch, Triton's launch) to ``pairs``."""
    from savae_fast.ops.triton_launch import CachedKernel

    launch = CachedKernel.launch

    def paired(self, grid, args, meta):
        before = len(log)
        launch(self, grid, args, meta)
        self.fn[grid](*args, **meta)
        assert len(log) == before + 2, "a launch was not recorded"
        pairs.append((log[-2], log[-1]))

    monkeypatch.setattr(CachedKernel, "launch", paired)


def mismatch(ours: Launch, triton: Launch) -> str | None:
    """How ``ours`` differs from the launch Triton made for the same call, or None."""
    if ours.kernel is not triton.kernel:
        return f"compiled kernel {ours.kernel.name} vs {triton.kernel.name}"
    for field in ("grid", "stream"):
        if getattr(ours, field) != getattr(triton, field):
            return f"{field} {getattr(ours, field)} vs {getattr(triton, field)}"
    if ours.function is not triton.function or ours.packed_metadata is not triton.packed_metadata:
        return "function / metadata"
    if len(ours.args) != len(triton.args):
        return f"{len(ours.args)} arguments vs {len(triton.args)}"
    for i, (a, b) in enumerate(zip(ours.args, triton.args)):
        expected = b.data_ptr() if isinstance(b, torch.Tensor) else b
        if isinstance(a, torch.Tensor):
            a = a.data_ptr()
        if a != expected or type(a) is not type(expected):
            return f"argument {i}: {a!r} vs {expected!r}"
    return None


def cached(launch: Launch) -> bool:
    """Launched by the cache: device addresses (ints) instead of tensors, no hooks."""
    return launch.hooks == (None, None) and not any(isinstance(a, torch.Tensor) for a in launch.args)


def _real_kernels_report() -> dict:
    import pytest

    from savae_fast.ops import triton_impl
    from savae_fast.ops.constants import FD_CENTRAL, FD_EXACT, FD_FORWARD
    from savae_fast.testing import forward_step_args, reverse_direction_args, reverse_update_args

    mp = pytest.MonkeyPatch()
    log, pairs = [], []
    names = sorted(n for n in dir(triton_impl) if n.endswith("_kernel"))
    install(mp, [getattr(triton_impl, n).fn for n in names], log)
    pair_launches(mp, log, pairs)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for shape in ((3, 5), (40, 130), (700, 300)):  # one program; two-stage; several row groups
            triton_impl.sample(*(torch.randn(shape, dtype=dtype) for _ in range(3)))
            for clip in ("off", "inactive", "active"):
                for with_next in (True, False):
                    triton_impl.forward_step(*forward_step_args(shape, dtype, clip, with_next))
                for mode in (FD_EXACT, FD_FORWARD, FD_CENTRAL):
                    triton_impl.reverse_direction(*reverse_direction_args(shape, dtype, clip, mode))
            for with_b in (True, False):
                triton_impl.reverse_update(*reverse_update_args(shape, dtype, with_b))
    mp.undo()
    return {
        "launches": len(pairs),
        "cached": sum(cached(ours) for ours, _ in pairs),
        "mismatches": [f"{ours.kernel.name}: {m}" for ours, theirs in pairs if (m := mismatch(ours, theirs))],
        "kernels": sorted({ours.kernel.name for ours, _ in pairs}),
        "all_kernels": [getattr(triton_impl, n).fn.__name__ for n in names],
        "compiled": len({id(theirs.kernel) for _, theirs in pairs}),
    }


def _host_times(rounds: int = 5, calls: int = 2000) -> str:
    """Host time per operator call (B x D 512, float32) through Triton's run and through the
    cache, launches recorded instead of issued: min over ``rounds`` of the mean of ``calls``."""
    import time

    import pytest

    from savae_fast.ops import triton_impl, triton_launch
    from savae_fast.ops.constants import FD_CENTRAL
    from savae_fast.testing import forward_step_args, reverse_direction_args, reverse_update_args

    mp = pytest.MonkeyPatch()
    log: list = []
    install(mp, [getattr(triton_impl, n).fn for n in dir(triton_impl) if n.endswith("_kernel")], log)
    torch.manual_seed(0)
    shape = (32, 16)
    cases = {
        "forward_step": (triton_impl.forward_step, forward_step_args(shape, torch.float32, "inactive")),
        "reverse_direction": (triton_impl.reverse_direction,
                              reverse_direction_args(shape, torch.float32, "inactive", FD_CENTRAL)),
        "reverse_update": (triton_impl.reverse_update, reverse_update_args(shape, torch.float32)),
    }

    def per_call(op, args) -> float:
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                op(*args)
            best = min(best, (time.perf_counter() - start) / calls)
            log.clear()
        return best * 1e6

    import triton

    lines = [f"Triton {triton.__version__}, torch {torch.__version__}, B x D 512, float32, launches recorded",
             "| operator | Triton's run (us) | cached (us) |", "|---|---|---|"]
    for name, (op, args) in cases.items():
        times = []
        for on in (False, True):
            triton_launch.set_enabled(on)
            op(*args)  # compiles (records) and fills the cache
            times.append(per_call(op, args))
        lines.append(f"| {name} | {times[0]:.1f} | {times[1]:.1f} |")
    mp.undo()
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] == ["--time"]:
        print(_host_times())
    else:
        print(json.dumps(_real_kernels_report()))
