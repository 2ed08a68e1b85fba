"""Op-level benchmarks: each fused operator vs the eager PyTorch op sequence
computing the same thing (savae_fast.ops.torch_impl) and vs torch.compile of
that sequence, from B*D = 32*32 to 2^22 elements; time, achieved bandwidth
(the operator's unique bytes read + written / time) and, on GPU, the fraction
of the measured device-to-device copy bandwidth."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

import savae_fast as sf
from savae_fast.ops import torch_impl
from savae_fast.ops.constants import FD_CENTRAL
from benchmarks import harness

SIZES = [(32, 32), (256, 64), (1024, 256), (4096, 1024)]  # up to 2^22 elements
QUICK_SIZES = [(32, 32), (1024, 256)]

# Unique [B, D] tensors read and written by each operator (its minimal memory traffic).
STREAMS = {"forward_step": (7, 5), "reverse_direction": (8, 7), "reverse_update": (10, 4)}


def op_args(name: str, b: int, d: int, device: str, dtype=torch.float32):
    """Arguments of one call of operator ``name`` on [b, d] float tensors (fixed seed)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    t = lambda s=1.0: (s * torch.randn(b, d, generator=g)).to(device=device, dtype=dtype)  # noqa: E731
    mu, lv, pm, pl, eps, gz, en = t(0.5), t(0.3), t(0.1), t(0.1), t(), t(), t()
    if name == "forward_step":
        return (mu, lv, pm, pl, eps, gz, en, 1 / b, 1.0, 1.0, 1.0, 0.5, 5.0)
    norms = torch_impl.forward_step(mu, lv, pm, pl, eps, gz, None, 1 / b, 1.0, 1.0, 1.0, 0.5, 5.0)[5]
    if name == "reverse_direction":
        return (t(), t(), pm, pl, mu, lv, eps, gz, norms, 1 / b, 1.0, 1.0, 1.0, 5.0, FD_CENTRAL, 2e-3)
    return (t(), t(), pm, pl, t(), t(), lv, eps, gz, t(), t(), 500.0, 1 / b, 1.0, 0.5)


def copy_bandwidth(device: str, n: int = 1 << 24) -> float:
    """Bytes/s of dst.copy_(src) (read + write), float32, host-timed with synchronisation."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = harness.interleaved({"copy": lambda: dst.copy_(src)}, rounds=20, device=device, warmup=3)["copy"]
    return 2 * n * 4 / min(times)


def event_seconds(fn, rounds: int) -> float:
    """Median seconds of one call between two CUDA events (its span on the device timeline)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    spans = []
    for _ in range(rounds):
        start.record()
        fn()
        end.record()
        end.synchronize()
        spans.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(spans)


def copy_bandwidth_events(n: int = 1 << 24) -> float:
    """Bytes/s of a float32 device-to-device copy (read + write), timed with CUDA events."""
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n * 4 / event_seconds(lambda: dst.copy_(src), 20)


def bench_ops(device: str, sizes=SIZES, rounds: int = 20, compile_: bool = True,
              ops=("forward_step", "reverse_direction", "reverse_update")) -> dict:
    out = {"device": device, "rows": []}
    copy_bw = copy_bandwidth(device) if device == "cuda" else None
    copy_bw_events = copy_bandwidth_events() if device == "cuda" else None
    out["copy_bytes_per_s"] = copy_bw
    out["copy_bytes_per_s_events"] = copy_bw_events
    compiled = {}
    for name in ops:
        if compile_:
            compiled[name] = torch.compile(getattr(torch_impl, name), dynamic=True)
        for b, d in sizes:
            args = op_args(name, b, d, device)
            cands = {"eager torch ops": lambda f=getattr(torch_impl, name): f(*args)}
            if sf.ops.available(device):
                cands["fused cpp" if device == "cpu" else "fused cuda"] = (
                    lambda f=getattr(torch.ops.savae_fast, name).default: f(*args))
            if device == "cuda" and sf.ops.triton_available(device):
                from savae_fast.ops import triton_impl

                cands["fused triton"] = lambda f=getattr(triton_impl, name): f(*args)
            if compile_:
                cands["torch.compile"] = lambda f=compiled[name]: f(*args)
            times = harness.interleaved(cands, rounds, device, warmup=2)
            reads, writes = STREAMS[name]
            nbytes = (reads + writes) * b * d * 4
            for cand, samples in times.items():
                s = harness.summary(samples)
                row = {"op": name, "batch": b, "latent": d, "elements": b * d, "candidate": cand,
                       "median_us": s["median_s"] * 1e6, "min_us": s["min_s"] * 1e6,
                       "bytes_per_s": nbytes / s["min_s"], "gb_per_s": nbytes / s["min_s"] / 1e9,
                       "speedup_vs_eager": harness.ratio(times, "eager torch ops", cand)["median_of_ratios"]}
                if compile_ and cand != "torch.compile":
                    row["speedup_vs_compile"] = harness.ratio(times, "torch.compile", cand)["median_of_ratios"]
                if copy_bw:
                    row["fraction_of_copy_bw"] = row["bytes_per_s"] / copy_bw
                    # the device's own time (no host overhead): what the kernels achieve
                    row["events_us"] = event_seconds(cands[cand], rounds) * 1e6
                    row["fraction_of_copy_bw_events"] = nbytes / (row["events_us"] * 1e-6) / copy_bw_events
                out["rows"].append(row)
    return out


def ops_table(result: dict) -> str:
    return harness.markdown_table(result["rows"], [
        ("op", "op", ""), ("B x D", "elements", "{:,}"), ("candidate", "candidate", ""),
        ("median (us)", "median_us", "{:.1f}"), ("GB/s", "gb_per_s", "{:.1f}"),
        ("speed-up vs eager", "speedup_vs_eager", "{:.2f}x"), ("vs torch.compile", "speedup_vs_compile", "{:.2f}x"),
        ("of copy bw", "fraction_of_copy_bw", "{:.0%}"), ("CUDA events (us)", "events_us", "{:.1f}"),
        ("of copy bw, events", "fraction_of_copy_bw_events", "{:.0%}")])


# ------------------------------------------------------------------ launch latency (CUDA)
LATENCY_SIZES = [(32, 32), (64, 64), (256, 64)]  # 1,024 to 16,384 elements: launch-bound


def _issue_seconds(fn, repeats: int, burst: int = 100, sync=lambda: None) -> float:
    """Median host seconds per call over ``burst`` back-to-back calls and one ``sync``."""
    per_call = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(burst):
            fn()
        sync()
        per_call.append((time.perf_counter() - t0) / burst)
    return statistics.median(per_call)


def _latency(fn, rounds: int, burst: int = 100) -> dict:
    """Per call, in microseconds: ``host_sync`` (host clock around one call with a device
    synchronisation before and after: what a caller waiting on the result sees),
    ``host_issue`` (host clock over ``burst`` back-to-back calls and one synchronisation:
    the issue rate, max(host work, device work)), ``events`` (CUDA events around one call:
    its span on the device timeline, launch gaps included) and ``graph`` (``burst`` calls
    captured in one CUDA graph, timed by events over a replay: the device work alone)."""
    sync = torch.cuda.synchronize
    for _ in range(3):
        fn()
    host_sync = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        host_sync.append(time.perf_counter() - t0)
    repeats = max(3, rounds // 4)
    out = {"host_sync_us": statistics.median(host_sync) * 1e6,
           "host_issue_us": _issue_seconds(fn, repeats, burst, sync) * 1e6,
           "events_us": event_seconds(fn, rounds) * 1e6, "graph_us": None}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(burst):
                fn()
        out["graph_us"] = event_seconds(graph.replay, repeats) / burst * 1e6
    except RuntimeError as exc:  # a candidate that cannot be captured: reported, not fatal
        out["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def bench_latency(device: str = "cuda", sizes=LATENCY_SIZES, rounds: int = 50,
                  ops=("forward_step", "reverse_direction", "reverse_update")) -> dict:
    """Launch latency of each fused operator (both CUDA reduction paths where they differ),
    the eager op sequence, and two references of what any PyTorch op costs here: one
    ``torch.add`` and one ``torch.empty``."""
    from savae_fast.ops import extension

    if device != "cuda":
        raise ValueError("bench_latency measures CUDA launches")
    rows = []
    x = torch.randn(32, 32, device=device)
    for ref, fn in (("torch.add (one kernel)", lambda: torch.add(x, x)),
                    ("torch.empty (no kernel)", lambda: torch.empty(32, 32, device=device))):
        rows.append({"op": "reference", "elements": x.numel(), "candidate": ref, **_latency(fn, rounds)})
    limit = extension.cuda_single_block_max_elements()
    if sf.ops.available("cpu"):  # what the operator call costs this host without CUDA (4 x 4 CPU tensors)
        for name in ops:
            args = op_args(name, 4, 4, "cpu")
            op = getattr(torch.ops.savae_fast, name).default
            issue = _issue_seconds(lambda: op(*args), max(3, rounds // 4))
            rows.append({"op": name, "elements": 16, "candidate": "fused cpp on CPU tensors (dispatch and checks)",
                         "host_sync_us": None, "host_issue_us": issue * 1e6, "events_us": None, "graph_us": None})
    for name in ops:
        for b, d in sizes:
            args = op_args(name, b, d, device)
            # candidate -> (the setting it runs under, the call)
            cands = {"eager torch ops": (contextlib.nullcontext, lambda f=getattr(torch_impl, name): f(*args))}
            if sf.ops.available(device):
                op = getattr(torch.ops.savae_fast, name).default
                if name == "reverse_update" or limit is None:
                    cands["fused cuda"] = (contextlib.nullcontext, lambda f=op: f(*args))
                else:  # the same operator through each reduction path
                    cands["fused cuda, one block"] = (lambda: _single_block_limit(1 << 40), lambda f=op: f(*args))
                    cands["fused cuda, two launches"] = (lambda: _single_block_limit(0), lambda f=op: f(*args))
            if sf.ops.triton_available(device):
                from savae_fast.ops import triton_impl, triton_launch

                triton_op = getattr(triton_impl, name)
                cands["fused triton"] = (contextlib.nullcontext, lambda f=triton_op: f(*args))
                if triton_launch.enabled():  # the same calls without the launch cache
                    cands["fused triton, Triton's own launch"] = (lambda: _triton_launch_cache(False),
                                                                  lambda f=triton_op: f(*args))
            for cand, (setting, fn) in cands.items():
                with setting():
                    rows.append({"op": name, "elements": b * d, "candidate": cand, **_latency(fn, rounds)})
    return {"device": device, "default_single_block_max_elements": limit, "rows": rows}


@contextlib.contextmanager
def _single_block_limit(elements: int):
    from savae_fast.ops import extension

    before = extension.cuda_single_block_max_elements()
    extension.set_cuda_single_block_max_elements(elements)
    try:
        yield
    finally:
        extension.set_cuda_single_block_max_elements(before)


@contextlib.contextmanager
def _triton_launch_cache(on: bool):
    from savae_fast.ops import triton_launch

    before = triton_launch.set_enabled(on)
    try:
        yield
    finally:
        triton_launch.set_enabled(before)


def latency_table(result: dict) -> str:
    return harness.markdown_table(result["rows"], [
        ("op", "op", ""), ("B x D", "elements", "{:,}"), ("candidate", "candidate", ""),
        ("host, sync (us)", "host_sync_us", "{:.1f}"), ("host issue (us)", "host_issue_us", "{:.1f}"),
        ("events (us)", "events_us", "{:.1f}"), ("in a graph (us)", "graph_us", "{:.1f}")])
