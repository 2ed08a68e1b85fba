"""Cached Triton launches (savae_fast.ops.triton_launch) against Triton's own launch path.

No GPU needed: a fake driver and recording compiled kernels (tests/fake_triton_driver.py)
sit below JITFunction.run, so each cached launch can be compared with the launch Triton
makes for the same call, and each kernel choice with the one Triton's ``warmup`` returns.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from savae_fast.ops import triton_launch  # noqa: E402
from savae_fast.ops.triton_launch import CachedKernel, cache_supported  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import fake_triton_driver as fake  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_supported_triton = pytest.mark.skipif(
    not cache_supported(), reason=f"cached launches are off for Triton {triton.__version__}")


def _toy(x_ptr, y_ptr, n, scale: tl.float64, FLAG: tl.constexpr, BLOCK: tl.constexpr = 128):
    pass  # never compiled: the fake driver records launches


@pytest.fixture
def toy_kernel(monkeypatch):
    """(CachedKernel of a fresh JITFunction, launch log)."""
    from triton.runtime.jit import JITFunction

    fn = JITFunction(_toy)
    log = []
    fake.install(monkeypatch, [fn], log)
    monkeypatch.setattr(triton_launch, "_ENABLED", True)
    return CachedKernel(fn), log


@pytest.fixture
def toy(toy_kernel, monkeypatch):
    """(the kernel, launch log, [(its launch, Triton's launch of the same call)])."""
    kernel, log = toy_kernel
    pairs = []
    fake.pair_launches(monkeypatch, log, pairs)
    return kernel, log, pairs


def test_supported_releases():
    assert cache_supported("3.4.0") and cache_supported("3.6.0") and cache_supported("3.8.1+git0a1b2c")
    for version in ("3.3.1", "3.9.0", "4.0.0", "2.3.1", "nightly", ""):
        assert not cache_supported(version), version


def test_set_enabled_switches_and_reports():
    before = triton_launch.enabled()
    try:
        assert triton_launch.set_enabled(False) == before and not triton_launch.enabled()
        assert triton_launch.set_enabled(True) is False
        assert triton_launch.enabled() == cache_supported()  # never on for an unchecked release
    finally:
        triton_launch.set_enabled(before)


def test_interpreted_kernels_are_launched_by_triton():
    from savae_fast.ops import triton_impl

    kernels = [getattr(triton_impl, n) for n in dir(triton_impl) if n.endswith("_kernel")]
    assert kernels and all(isinstance(k, CachedKernel) for k in kernels)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert not any(k.cacheable for k in kernels)


@pytest.mark.slow
@needs_supported_triton
def test_real_kernels_launch_as_triton_does():
    """Every launch of every operator path (one program / two-stage / row groups, clip
    off / inactive / active, fd modes, optional inputs, both dtypes), run twice: each
    launch equals Triton's own for the same call, and only Triton's compilations missed."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SAVAE_FAST_TRITON_LAUNCH")}
    package_root = Path(triton_launch.__file__).resolve().parents[2]  # the savae_fast imported here
    env["PYTHONPATH"] = os.pathsep.join([str(package_root), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "fake_triton_driver.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["mismatches"] == []
    assert report["kernels"] == sorted(report["all_kernels"])
    assert report["cached"] == report["launches"] - report["compiled"] > 0, report


@needs_supported_triton
def test_cache_key_picks_the_kernel_triton_picks(toy, seed):
    """Random calls over everything Triton specialises on (dtype, 16-byte alignment, int
    width, int == 1, int % 16, constexprs, num_warps) and what it does not (float values):
    every launch uses the compiled kernel Triton's warmup returns for the call, with the
    arguments Triton passes; calls equal to an earlier one in all those respects are cached."""
    kernel, log, pairs = toy
    rng = random.Random(seed)
    f32, f64 = torch.zeros(64), torch.zeros(64, dtype=torch.float64)
    tensors = [f32, f32[4:], f32[1:], f64, f64[2:], f64[1:]]  # aligned; aligned view; unaligned
    ints = [0, 1, 2, 3, 16, 48, -16, 2**31 - 16, 2**31, 2**40 + 1]
    seen = set()
    for _ in range(300):
        x, y, n = rng.choice(tensors), rng.choice(tensors), rng.choice(ints)
        scale, flag, warps = rng.choice([0.5, 3.0]), rng.choice([True, False]), rng.choice([4, 8])
        kernel[(3, 2)](x, y, n, scale, FLAG=flag, num_warps=warps)
        ours, theirs = pairs[-1]
        assert fake.mismatch(ours, theirs) is None, fake.mismatch(ours, theirs)
        assert ours.kernel is _kernel_triton_picks(kernel, x, y, n, scale, flag, warps)
        aligned = x.data_ptr() % 16 == 0 and y.data_ptr() % 16 == 0
        key = (x.dtype, y.dtype, n == 1, n % 16 == 0, -2**31 <= n < 2**31, flag, warps)
        assert fake.cached(ours) == (aligned and key in seen), (key, aligned)
        if aligned:
            seen.add(key)
    assert sum(fake.cached(ours) for ours, _ in pairs) > 30


def _kernel_triton_picks(kernel, x, y, n, scale, flag, warps):
    """The compiled kernel Triton's own path uses for this call (warmup: no launch)."""
    return kernel.fn.warmup(x, y, n, scale, grid=(3, 2), FLAG=flag, num_warps=warps)


def _hook_chain_add(monkeypatch, name, hook):
    from triton import knobs

    chain = getattr(knobs.runtime, name)
    if hasattr(chain, "calls"):  # HookChain (recent releases): a new list, the old one restored
        monkeypatch.setattr(chain, "calls", [hook])
    else:
        monkeypatch.setattr(knobs.runtime, name, hook)


@needs_supported_triton
@pytest.mark.parametrize("reason", ["enter_hook", "exit_hook", "pre_run_hook", "disabled", "other_device",
                                    "not_a_tensor"])
def test_calls_outside_the_cache_go_through_triton(toy, monkeypatch, reason):
    kernel, log, pairs = toy
    x, y = torch.zeros(32), torch.zeros(32)
    launch = lambda: kernel[(1,)](x, y, 32, 1.0, FLAG=True)  # noqa: E731
    launch()
    launch()
    assert fake.cached(pairs[-1][0])  # the same call is cached ...
    if reason in ("enter_hook", "exit_hook"):
        _hook_chain_add(monkeypatch, f"launch_{reason.split('_')[0]}_hook", lambda *a: None)
    elif reason == "pre_run_hook":
        kernel.fn.add_pre_run_hook(lambda *a, **kw: None)
    elif reason == "disabled":
        monkeypatch.setattr(triton_launch, "_ENABLED", False)
    elif reason == "other_device":  # the tensors are not on the current device
        monkeypatch.setattr(fake.FakeDriver, "get_current_device", lambda self: 0)
    elif reason == "not_a_tensor":  # an object with data_ptr (Triton takes it; the cache does not)
        x = type("Pointer", (), {"data_ptr": lambda self: 4096, "dtype": torch.float32})()
    launch()
    ours, theirs = pairs[-1]
    assert not fake.cached(ours) and fake.mismatch(ours, theirs) is None  # ... but not here


@needs_supported_triton
def test_a_launcher_refusing_the_cached_call_falls_back_to_triton(toy_kernel):
    """A launcher that rejects the cached call's arguments (a Triton release that takes them
    otherwise) raises before launching: the call is launched once, by Triton, with a warning,
    and the kernel stays on Triton's path."""
    kernel, log = toy_kernel
    x, y = torch.zeros(32), torch.zeros(32)
    kernel[(1,)](x, y, 32, 1.0, FLAG=True)  # Triton's path: compiles, fills the cache
    compiled = log[-1].kernel
    run = compiled.run

    def strict_run(*launch_args):
        if not any(isinstance(a, torch.Tensor) for a in launch_args):
            raise TypeError("pointer arguments must be tensors")
        run(*launch_args)

    compiled.run = strict_run
    with pytest.warns(RuntimeWarning, match="refused a cached launch"):
        kernel[(1,)](x, y, 32, 1.0, FLAG=True)
    assert len(log) == 2 and not fake.cached(log[-1]) and not kernel.cacheable
    kernel[(1,)](x, y, 32, 1.0, FLAG=True)
    assert len(log) == 3 and not fake.cached(log[-1])


def test_layout_the_cache_cannot_launch():
    """Constexpr parameters before runtime ones: the launch order would differ, so Triton's path."""
    from triton.runtime.jit import JITFunction

    def constexpr_first(BLOCK: tl.constexpr, x_ptr, n):
        pass

    assert not CachedKernel(JITFunction(constexpr_first)).cacheable
    assert CachedKernel(JITFunction(_toy)).cacheable


@needs_supported_triton
def test_int_keys_cover_triton_specialisation():
    """The ints of one cache key get one specialisation from Triton's own function."""
    from triton.compiler import make_backend

    native_specialize_impl = getattr(triton.runtime.jit, "native_specialize_impl", None)
    if native_specialize_impl is None:
        pytest.skip("this Triton release specialises in Python")

    backend = make_backend(fake.FakeDriver().get_current_target())
    values = sorted({v for base in (0, 1, 16, 2**31, 2**32, 2**63, 2**64 - 32) for d in range(-40, 40)
                     if 0 <= (v := base + d) < 2**64 or -2**63 <= v < 0})
    by_key = {}
    for v in values:
        spec = native_specialize_impl(backend, v, False, True, True)
        by_key.setdefault(triton_launch._int_key(v), set()).add(spec)
    assert len(by_key) >= 6
    for key, specs in by_key.items():
        assert len(specs) == 1, (key, specs)


@needs_supported_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("shape", [(3, 5), (700, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_launches_on_a_gpu_give_triton_launches_bits(shape, dtype, monkeypatch):
    """On a GPU, through Triton's real launcher: each operator's outputs from cached
    launches are bitwise those of Triton's own launches (the kernels are deterministic)."""
    from savae_fast.ops import triton_impl
    from savae_fast.ops.constants import FD_CENTRAL
    from savae_fast.testing import forward_step_args, reverse_direction_args, reverse_update_args

    calls = [
        (triton_impl.forward_step, forward_step_args(shape, dtype, "active", device="cuda")),
        (triton_impl.reverse_direction, reverse_direction_args(shape, dtype, "active", FD_CENTRAL, device="cuda")),
        (triton_impl.reverse_update, reverse_update_args(shape, dtype, device="cuda")),
    ]
    for op, args in calls:
        monkeypatch.setattr(triton_launch, "_ENABLED", False)
        expected = op(*args)
        monkeypatch.setattr(triton_launch, "_ENABLED", True)
        op(*args)  # fills the cache where Triton's path was not cached yet
        got = op(*args)
        for e, g in zip(expected, got):
            assert torch.equal(e, g), op.__name__
    kernels = [getattr(triton_impl, n) for n in dir(triton_impl) if n.endswith("_kernel")]
    assert any(k.compiled for k in kernels)
