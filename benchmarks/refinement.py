"""Refinement-level benchmarks: one SA-VAE training step (refine forward + final
ELBO + backward) for every method, against the decoder floor.

The floor is what no implementation can avoid: (2K + 1) decoder forward +
backward passes (gradients w.r.t. z and every decoder parameter), measured in
the same interleaved run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable

import torch

import savae_fast as sf
from savae_fast.gaussian import gaussian_kl
from savae_fast.reference import optim_n2n, unrolled
from savae_fast.testing import Problem, relative_error, training_step
from benchmarks import harness
from benchmarks.configs import DecoderConfig, make_problem


def _refine(hvp: str, backend: str = "auto", **options) -> Callable:
    # The rows of each hvp mode measure the exact gradient's computation (its error against float64
    # unrolled autograd, its cost): without refine's default stabiliser, which on an exploding
    # decoder changes the gradient on purpose; "refine defaults" measures the stabiliser's cost.
    options.setdefault("backward_clip", None)

    def run(*args, **kw):
        return sf.refine(*args, hvp=hvp, backend=backend, **options, **kw)

    return run


METHODS: dict[str, Callable] = {
    "refine defaults (fd_forward, backward_clip=1 stop)": lambda *a, **k: sf.refine(*a, **k),
    "refine fd_forward": _refine("fd_forward"),
    "refine fd_central": _refine("fd_central"),
    "refine fd_richardson": _refine("fd_richardson"),
    "refine fd_adaptive": _refine("fd_adaptive"),
    # a reverse step's points in one decoder call and one backward (stack_points)
    "refine fd_central, stacked": _refine("fd_central", stack_points=True),
    "refine fd_richardson, stacked": _refine("fd_richardson", stack_points=True),
    "refine fd_adaptive, stacked": _refine("fd_adaptive", stack_points=True),
    "refine exact": _refine("exact"),
    "refine jvp": _refine("jvp"),
    "refine fd_forward (torch ops)": _refine("fd_forward", backend="torch"),
    "optim_n2n (authors)": optim_n2n,
    "unrolled (autograd)": unrolled,
}

# On GPUs a float32 decoder computes in TF32 by default (cuDNN): refine's evaluations in
# full float32 are an option, measured next to the default.
CUDA_METHODS: dict[str, Callable] = {
    "refine fd_forward, fp32_precision='ieee'": _refine("fd_forward", fp32_precision="ieee"),
    "refine fd_central, fp32_precision='ieee'": _refine("fd_central", fp32_precision="ieee"),
    "refine fd_richardson, fp32_precision='ieee'": _refine("fd_richardson", fp32_precision="ieee"),
    "refine fd_adaptive, fp32_precision='ieee'": _refine("fd_adaptive", fp32_precision="ieee"),
    "refine exact, fp32_precision='ieee'": _refine("exact", fp32_precision="ieee"),
}

# Float64 unrolled autograd on a GPU (the accuracy reference) is slow for large decoders
# (over 400 s for the Omniglot PixelCNN at B 32): there the errors are measured on the
# first examples of the batch (same decoder, draws and steps).
CUDA_REFERENCE_BATCH = 8


def decoder_floor(p: Problem, steps: int | None = None, sum_param_grads: bool = False) -> None:
    """(2K + 1) decoder forward + backward passes, gradients w.r.t. z and all parameters.

    ``sum_param_grads``: each pass's parameter gradients also added into one buffer per
    parameter. The training step's parameter gradient is the sum over its passes, so every
    method (and ``.backward()`` into ``.grad``) does these 2K additions of |theta| values as
    well; on large decoders they are memory traffic the plain floor leaves out."""
    steps = p.noise.shape[0] if steps is None else steps
    params = p.params
    z = p.mu0
    sums = None
    for _ in range(2 * steps + 1):
        zz = z.detach().requires_grad_(True)
        grads = torch.autograd.grad(p.nll_fn(zz).sum(), [zz, *params])
        if not sum_param_grads:
            continue
        if sums is None:
            sums = list(grads[1:])
        else:
            torch._foreach_add_(sums, grads[1:])


FLOOR = "decoder floor (2K+1 passes)"
FLOOR_WITH_SUMS = "decoder floor + summing the passes' parameter gradients"


def first_examples(p: Problem, batch: int) -> Problem:
    """The problem restricted to its first ``batch`` examples."""
    return p if p.mu0.shape[0] <= batch else p.first_examples(batch)


def gradient_errors(p: Problem, methods: dict[str, Callable]) -> dict[str, float]:
    """Relative error of all gradients (mu0, logvar0, params together) vs float64 unrolled."""
    exact = training_step(unrolled, p.to(torch.float64))
    out = {}
    for name, method in methods.items():
        try:
            out[name] = relative_error(training_step(method, p), exact)
        except RuntimeError as exc:  # e.g. exact mode on a decoder without double backward
            out[name] = None
            print(f"  {name}: no gradient ({exc.__class__.__name__}: {str(exc)[:80]})")
    return out


def supported(method: str, cfg: DecoderConfig, device: str) -> bool:
    """Whether the method runs on this decoder: PyTorch's CUDA LSTM cell has no forward-mode
    derivative, so hvp='jvp' refuses recurrent decoders on GPUs (with an error naming 'exact')."""
    return not (method == "refine jvp" and device == "cuda" and cfg.kind in ("lstm", "trained"))


def applicable_methods(cfg: DecoderConfig, device: str, include_slow: bool = True) -> dict[str, Callable]:
    methods = {name: m for name, m in METHODS.items() if supported(name, cfg, device)}
    if device == "cuda":
        methods.update(CUDA_METHODS)
    if not include_slow:
        for name in ("unrolled (autograd)", "refine exact"):
            methods.pop(name, None)
    return methods


def bench_step(cfg: DecoderConfig, device: str, rounds: int, include_slow: bool = True) -> dict:
    """Time per training step of every method and the floor, interleaved; ratios and errors."""
    p = make_problem(cfg, device)
    methods = applicable_methods(cfg, device, include_slow)
    candidates = {FLOOR: lambda: decoder_floor(p), FLOOR_WITH_SUMS: lambda: decoder_floor(p, sum_param_grads=True)}
    candidates.update({name: (lambda m=m: training_step(m, p)) for name, m in methods.items()})
    times = harness.interleaved(candidates, rounds, device)
    error_batch = CUDA_REFERENCE_BATCH if device == "cuda" else cfg.batch
    errors = gradient_errors(first_examples(p, error_batch), methods)
    rows = []
    for name, samples in times.items():
        row = {"method": name, **harness.summary(samples)}
        if name != FLOOR:
            row["vs_floor"] = harness.ratio(times, name, FLOOR)
        if name in methods:
            row["speedup_vs_n2n"] = harness.ratio(times, "optim_n2n (authors)", name)
            row["grad_rel_error"] = errors.get(name)
        rows.append(row)
    return {"config": cfg.name, "device": device, "batch": cfg.batch, "latent": cfg.latent, "steps": cfg.steps,
            "error_batch": min(error_batch, cfg.batch), "decoder_params": p.num_params(), "rounds": rounds,
            "rows": rows}


def bench_stacked_passes(cfg: DecoderConfig, device: str, rounds: int, copies=(1, 2, 4)) -> dict:
    """One decoder pass (forward and backward, gradients w.r.t. z and every parameter) on z of
    n B rows (n points per example, as refine's stacked calls give it), interleaved: what
    stacking can save is what a pass over n B rows costs less than n passes over B."""
    p = make_problem(cfg, device)
    params = p.params

    def one_pass(z):
        zz = z.detach().requires_grad_(True)
        torch.autograd.grad(p.nll_fn(zz).sum(), [zz, *params])

    zs = {n: p.mu0.repeat(n, 1) + 1e-3 * torch.randn(n * p.mu0.shape[0], p.mu0.shape[1], device=p.mu0.device,
                                                     dtype=p.mu0.dtype) for n in copies}
    times = harness.interleaved({f"{n} B rows": (lambda z=zs[n]: one_pass(z)) for n in copies}, rounds, device)
    base = f"{copies[0]} B rows"
    rows = [{"rows": name, **harness.summary(samples), "vs_one": harness.ratio(times, name, base)}
            for name, samples in times.items()]
    return {"config": cfg.name, "device": device, "batch": cfg.batch, "rows": rows}


def stacked_passes_table(result: dict) -> str:
    rows = [{"rows": r["rows"], "ms": r["median_s"] * 1e3, "ratio": r["vs_one"]["median_of_ratios"]}
            for r in result["rows"]]
    return harness.markdown_table(rows, [("z rows (B = %d)" % result["batch"], "rows", ""),
                                         ("ms per pass", "ms", "{:.2f}"), ("/ B rows", "ratio", "{:.2f}")])


def bench_graphed_step(cfg: DecoderConfig, device: str, rounds: int, fallback: bool = False) -> dict:
    """CUDA: the training step with refine fd_forward and the decoder floor, each captured as
    one CUDA graph by sf.GraphedStep and timed by replay, next to the eager step and floor.
    The graphed floor is the 2K + 1 decoder passes' loss (gradients w.r.t. z and every
    parameter) in one backward. ``fallback=True`` lets GraphedStep run eagerly (CPU smoke test)."""
    p = make_problem(cfg, device)
    params = list(p.params)
    mu0 = p.mu0.clone().requires_grad_(True)
    logvar0 = p.logvar0.clone().requires_grad_(True)
    z_leaf = p.mu0.clone().requires_grad_(True)

    def step_loss(noise, final_eps):
        mu_k, logvar_k = sf.refine(mu0, logvar0, p.nll_fn, params, steps=noise.shape[0], noise=noise,
                                   preserve_rng_state=False, on_nonfinite="ignore")
        z = mu_k + torch.exp(0.5 * logvar_k) * final_eps
        kl = gaussian_kl(mu_k, logvar_k)
        return (p.nll_fn(z) + kl).mean()

    def floor_loss(noise, final_eps):
        return sum(p.nll_fn(z_leaf).sum() for _ in range(2 * p.noise.shape[0] + 1))

    inputs = (p.noise, p.final_eps)
    step = sf.GraphedStep(step_loss, inputs, [mu0, logvar0, *params], fallback=fallback)
    floor = sf.GraphedStep(floor_loss, inputs, [z_leaf, *params], fallback=fallback)
    candidates = {
        "decoder floor, one CUDA graph": lambda: floor(*inputs),
        "refine fd_forward step, one CUDA graph": lambda: step(*inputs),
        "decoder floor, eager": lambda: decoder_floor(p),
        "refine fd_forward step, eager": lambda: training_step(METHODS["refine fd_forward"], p),
    }
    times = harness.interleaved(candidates, rounds, device)
    rows = [{"method": name, **harness.summary(samples)} for name, samples in times.items()]
    for row, den in zip(rows, (None, "decoder floor, one CUDA graph", None, "decoder floor, eager")):
        if den is not None:
            row["vs_floor"] = harness.ratio(times, row["method"], den)
    rows[1]["speedup_vs_eager"] = harness.ratio(times, "refine fd_forward step, eager", rows[1]["method"])
    return {"config": cfg.name, "device": device, "rounds": rounds, "rows": rows}


def graphed_step_table(result: dict) -> str:
    rows = [{"method": r["method"], "ms": r["median_s"] * 1e3,
             "floor": r.get("vs_floor", {}).get("median_of_ratios"),
             "floor_ci": harness.interval_cell(r.get("vs_floor", {}).get("median_ci95")),
             "floor_min": r.get("vs_floor", {}).get("ratio_of_minima"),
             "eager": r.get("speedup_vs_eager", {}).get("median_of_ratios")} for r in result["rows"]]
    return harness.markdown_table(rows, [
        ("method", "method", ""), ("time / step (ms)", "ms", "{:.2f}"), ("/ its floor", "floor", "{:.3f}"),
        ("95% interval", "floor_ci", ""), ("/ its floor (minima)", "floor_min", "{:.3f}"),
        ("speed-up vs eager step", "eager", "{:.2f}x")])


def step_table(result: dict) -> str:
    rows = []
    floor_s = next(r["median_s"] for r in result["rows"] if r["method"] == FLOOR)
    for r in result["rows"]:
        rows.append({
            "method": r["method"], "ms": r["median_s"] * 1e3,
            # time over the floor per inner step: on a decoder with almost no work of its own
            # (tiny_lstm) the host time of the refinement's own calls per step
            "per_step_us": None if r["method"] == FLOOR else (r["median_s"] - floor_s) / result["steps"] * 1e6,
            "floor": r.get("vs_floor", {}).get("median_of_ratios"),
            "floor_ci": harness.interval_cell(r.get("vs_floor", {}).get("median_ci95")),
            "floor_min": r.get("vs_floor", {}).get("ratio_of_minima"),
            "n2n": r.get("speedup_vs_n2n", {}).get("median_of_ratios"),
            "err": r.get("grad_rel_error"),
        })
    return harness.markdown_table(rows, [
        ("method", "method", ""), ("time / step (ms)", "ms", "{:.2f}"), ("/ floor", "floor", "{:.3f}"),
        ("95% interval", "floor_ci", ""), ("/ floor (minima)", "floor_min", "{:.3f}"),
        ("over floor / inner step (us)", "per_step_us", "{:.0f}"), ("speed-up vs optim_n2n", "n2n", "{:.2f}x"),
        ("grad rel. error (fp32 vs fp64 exact)", "err", "{:.1e}"),
    ])


# ---------------------------------------------------------------------------------- scaling


def bench_scaling_k(cfg: DecoderConfig, device: str, ks: tuple, rounds: int) -> dict:
    p = make_problem(cfg, device, steps=max(ks))
    methods = {name: METHODS[name] for name in
               ("refine fd_forward", "refine fd_central", "optim_n2n (authors)", "unrolled (autograd)")}
    out = {"config": cfg.name, "device": device, "ks": list(ks), "series": {}}
    for k in ks:
        cands = {FLOOR: lambda k=k: decoder_floor(p, k)}
        cands.update({n: (lambda m=m, k=k: training_step(m, p, k)) for n, m in methods.items()})
        times = harness.interleaved(cands, rounds, device)
        for name, samples in times.items():
            out["series"].setdefault(name, []).append(harness.summary(samples)["median_s"])
    return out


def bench_scaling_batch(cfg: DecoderConfig, device: str, batches: tuple, rounds: int) -> dict:
    out = {"config": cfg.name, "device": device, "batches": list(batches), "series": {}}
    for b in batches:
        p = make_problem(cfg, device, batch=b)
        cands = {FLOOR: lambda: decoder_floor(p),
                 "refine fd_forward": lambda: training_step(METHODS["refine fd_forward"], p)}
        times = harness.interleaved(cands, rounds, device)
        for name, samples in times.items():
            out["series"].setdefault(name, []).append(harness.summary(samples)["median_s"])
    return out


# ----------------------------------------------------------------------------------- memory



def peak_memory(cfg_name: str, method: str, steps: int, device: str) -> dict:
    """Peak memory of one training step in a fresh process (CUDA allocator maximum, or the
    resident-set high-water mark on CPU)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Large blocks always mmap-ed (glibc): freed memory leaves the resident set at once, so
    # the high-water mark counts live tensors, not allocator fragmentation.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "memory_child.py"), root, cfg_name, method,
                          str(steps), device],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(cfg_name: str, device: str, ks: tuple = (20,), methods=None) -> dict:
    methods = methods or ["refine fd_forward", "refine fd_central", "refine fd_central, stacked",
                          "refine fd_richardson", "refine fd_richardson, stacked", "optim_n2n (authors)",
                          "unrolled (autograd)"]
    out = {"config": cfg_name, "device": device, "ks": list(ks), "rows": []}
    for k in ks:
        floor = peak_memory(cfg_name, "floor", k, device)
        theta_bytes = floor["params"] * 4
        for m in methods:
            r = peak_memory(cfg_name, m, k, device)
            extra = r["peak_bytes"] - floor["peak_bytes"]
            out["rows"].append({"method": m, "steps": k, "peak_mb": r["peak_bytes"] / 2**20,
                                "floor_peak_mb": floor["peak_bytes"] / 2**20, "extra_mb": extra / 2**20,
                                "extra_in_theta": extra / theta_bytes, "params": floor["params"]})
    return out
