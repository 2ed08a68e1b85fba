"""Timing, machine identification and result files for the benchmark suite.

Speed claims are ratios of candidates measured side by side: every round runs
each candidate once, in a shuffled order, so drift and noise of the machine
affect all of them alike; a ratio is the median over rounds of the per-round
ratio, with a distribution-free 95% interval of that median (and the ratio of the
minima is reported beside it).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import time
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    info = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def machine_tag(info: dict) -> str:
    name = info.get("gpu") or info["cpu"]
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def git_commit() -> str:
    """The checkout's commit (+dirty); GIT_COMMIT overrides it where the copy's git data is
    absent or stale (benchmarks/gpu_check.sh on a device machine)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """(fn(), seconds of the call), the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def time_once(fn: Callable[[], object], device: str) -> float:
    return timed(fn, device)[1]


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, device: str = "cpu",
                warmup: int = 1, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``rounds`` times, in shuffled order each round."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        order = list(candidates)
        rng.shuffle(order)
        for name in order:
            times[name].append(time_once(candidates[name], device))
    return times


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: the order statistics
    (x_(j), x_(n+1-j)) with the largest j whose coverage 1 - 2 P(Bin(n, 1/2) < j) is at
    least ``confidence`` (10 rounds: 2nd and 9th of 10, 97.9%). None when even the
    extremes do not reach it (95%: fewer than 6 values)."""
    xs = sorted(values)
    n = len(xs)
    below, best = 0.0, None  # below: P(Bin(n, 1/2) < j)
    for j in range(1, n // 2 + 1):
        below += math.comb(n, j - 1) / 2**n
        if 1 - 2 * below < confidence:
            break
        best = j
    return None if best is None else (xs[best - 1], xs[n - best])


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict:
    """Per-round ratios num / den: their median with its 95% interval, and the ratio of minima."""
    paired = [a / b for a, b in zip(times[num], times[den])]
    return {
        "median_of_ratios": statistics.median(paired),
        "median_ci95": median_interval(paired),
        "ratio_of_minima": min(times[num]) / min(times[den]),
    }


def interval_cell(interval: tuple[float, float] | None, fmt: str = "{:.3f}") -> str | None:
    """'lo-hi' for a table cell (None: '-')."""
    return None if interval is None else f"{fmt.format(interval[0])}-{fmt.format(interval[1])}"


def summary(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [min(samples), statistics.median(samples),
                                                                      max(samples)]
    return {"median_s": statistics.median(samples), "min_s": min(samples), "p25_s": q[0], "p75_s": q[-1],
            "rounds": len(samples)}


def write_results(results: dict, out_dir: str = RESULTS_DIR) -> str:
    os.makedirs(out_dir, exist_ok=True)
    date = _dt.date.today().isoformat()
    path = os.path.join(out_dir, f"{machine_tag(results['machine'])}_{date}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows: dicts; columns: (header, key, format)."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (fmt.format(v) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])
