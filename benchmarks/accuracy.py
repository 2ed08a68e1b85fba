"""Gradient accuracy of every method against exact float64 unrolled autograd, over
batch sizes, step counts and random problems (the worst case is what users hit)."""

from __future__ import annotations

import statistics

import torch

from benchmarks import harness
from benchmarks.configs import CONFIGS, make_problem
from benchmarks.refinement import CUDA_METHODS, FLOOR, METHODS, decoder_floor, supported
from savae_fast.testing import relative_error, training_step
from savae_fast.reference import unrolled

ACCURACY_METHODS = ("refine fd_forward", "refine fd_central", "refine fd_richardson", "refine fd_adaptive",
                    "refine exact", "refine jvp", "optim_n2n (authors)")
REFERENCES = {"unrolled": "unrolled (autograd)", "optim_n2n": "optim_n2n (authors)"}


def _under_autocast(method, device: str, dtype):
    def call(*args, **kwargs):
        with torch.autocast(device, dtype=dtype):
            return method(*args, **kwargs)
    return call


def bench_accuracy(device: str, config: str = "small_lstm", shapes=((8, 10), (32, 20)), seeds: int = 5,
                   dtypes=(torch.float32, torch.float64), methods=ACCURACY_METHODS, first_seed: int = 0,
                   objective: str = "elbo", autocast=None) -> dict:
    """Worst and median error of each method over ``seeds`` problems per shape, and the
    median time of its float32 training step on those problems next to the decoder
    floor's (one call each per problem, after one warm-up call: a rough figure; the
    step section times the same steps in interleaved rounds). ``objective="linear"``: the
    refinement part of the gradient alone (testing.training_step); ``autocast``: a dtype the
    methods' refinement runs under (torch.autocast; the truth stays float64)."""
    cfg = CONFIGS[config]
    methods = [m for m in methods if supported(m, cfg, device)]
    table = dict(METHODS)
    if autocast is not None:
        table = {m: _under_autocast(f, device, autocast) for m, f in table.items()}
    if device == "cuda":  # the default (TF32 on cuDNN/cuBLAS) and refine's evaluations in full float32
        table.update(CUDA_METHODS)
        methods += [m for m in CUDA_METHODS if m not in methods]
    rows = []
    for batch, steps in shapes:
        errors = {(m, dt): [] for m in methods for dt in dtypes}
        times = {m: [] for m in (FLOOR, *methods)}
        for seed in range(first_seed, first_seed + seeds):
            p32 = make_problem(cfg, device, seed=seed, batch=batch, steps=steps)
            q = p32.to(torch.float64)
            exact = training_step(unrolled, q, objective=objective)
            for dt in dtypes:
                p = p32 if dt == torch.float32 else q
                for m in methods:
                    grads, seconds = _timed(lambda: training_step(table[m], p, objective=objective), device,
                                            warm=seed == first_seed)
                    errors[(m, dt)].append(relative_error(grads, exact))
                    if dt == torch.float32:
                        times[m].append(seconds)
            times[FLOOR].append(_timed(lambda: decoder_floor(p32), device, warm=seed == first_seed)[1])
        for (m, dt), errs in errors.items():
            errs = sorted(errs)
            rows.append({"method": m, "dtype": str(dt).replace("torch.", ""), "batch": batch, "steps": steps,
                         "worst": errs[-1], "median": errs[len(errs) // 2], "p90": errs[(9 * len(errs)) // 10],
                         "seeds": seeds,
                         "ms": 1e3 * statistics.median(times[m]) if dt == torch.float32 else None})
        rows.append({"method": FLOOR, "dtype": "float32", "batch": batch, "steps": steps, "worst": None,
                     "median": None, "seeds": seeds, "ms": 1e3 * statistics.median(times[FLOOR])})
    return {"config": config, "device": device, "rows": rows}


def _timed(fn, device: str, warm: bool):
    """(fn(), seconds of one call after an optional warm-up call)."""
    if warm:
        fn()
    return harness.timed(fn, device)


def accuracy_table(result: dict) -> str:
    shapes = sorted({(r["batch"], r["steps"]) for r in result["rows"]})
    table = {}
    for r in result["rows"]:
        cells = table.setdefault((r["method"], r["dtype"]), {})
        cells[(r["batch"], r["steps"])] = r["worst"]
        cells[("ms", r["batch"], r["steps"])] = r.get("ms")
    rows = [{"method": m, "dtype": dt, **{f"B={b}, K={k}": v.get((b, k)) for b, k in shapes},
             **{f"ms B={b}, K={k}": v.get(("ms", b, k)) for b, k in shapes}}
            for (m, dt), v in table.items()]
    return harness.markdown_table(
        rows, [("method", "method", ""), ("dtype", "dtype", "")]
        + [(f"B = {b}, K = {k}", f"B={b}, K={k}", "{:.1e}") for b, k in shapes]
        + [(f"ms / step, B = {b}, K = {k}", f"ms B={b}, K={k}", "{:.1f}") for b, k in shapes])


def main() -> None:
    """``python -m benchmarks.accuracy --config C --seeds N [--first-seed S] [--shapes 8x10,4x20]
    [--dtype float32] [--methods fd_forward,fd_central] [--objective linear] [--autocast bfloat16]``: median, 90th
    percentile and worst error over many draws."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--config", default="small_lstm", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--shapes", default="8x10,32x20", help="BxK,...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--objective", default="elbo", choices=("elbo", "linear"),
                        help="the outer objective: the single-sample ELBO, or a fixed linear function of lambda_K "
                             "(the refinement part of the gradient alone)")
    parser.add_argument("--autocast", default=None, choices=("bfloat16", "float16"),
                        help="run the methods under torch.autocast with this dtype (float32 state)")
    parser.add_argument("--methods", default="fd_forward,fd_central",
                        help="refine hvp modes, comma-separated; also 'unrolled' (float32 unrolled autograd, the "
                             "rounding floor in float32) and 'optim_n2n'")
    args = parser.parse_args()
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    result = bench_accuracy(args.device, args.config, shapes, args.seeds, (getattr(torch, args.dtype),),
                            [REFERENCES.get(m, f"refine {m}") for m in args.methods.split(",")], args.first_seed,
                            args.objective, getattr(torch, args.autocast) if args.autocast else None)
    for r in result["rows"]:
        where = f"{args.config} {r['method']} B={r['batch']} K={r['steps']}"
        if r["median"] is None:  # the decoder floor: a time only
            print(f"{where}: {r['ms']:.1f} ms per step (median)")
            continue
        ms = f", {r['ms']:.1f} ms per step" if r["ms"] is not None else ""
        print(f"{where} {r['dtype']}: median {r['median']:.1e}, 90th percentile {r['p90']:.1e}, "
              f"worst {r['worst']:.1e} of {r['seeds']} draws (seeds {args.first_seed}..){ms}")


if __name__ == "__main__":
    main()
