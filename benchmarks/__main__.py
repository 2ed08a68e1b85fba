"""``python -m benchmarks [--quick] [--device cpu|cuda] [--only ...]``

Runs the suite, prints markdown tables, and writes
``benchmarks/results/<machine>_<date>.json`` / ``.md`` and a plot of step time vs K.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

import torch

from benchmarks import harness
from benchmarks.accuracy import accuracy_table, bench_accuracy
from benchmarks.configs import CONFIGS
from benchmarks.op_level import QUICK_SIZES, SIZES, bench_latency, bench_ops, latency_table, ops_table
from benchmarks.refinement import (bench_graphed_step, bench_memory, bench_scaling_batch, bench_scaling_k,
                                   bench_stacked_passes, bench_step, graphed_step_table, stacked_passes_table,
                                   step_table)

SECTIONS = ("startup", "ops", "step", "accuracy", "scaling", "memory", "training")
# "training": benchmarks.training (hours on a CPU: run only when named in --only)
DEFAULT_SECTIONS = SECTIONS[:-1]


def emit(report: list[str], lines: list[str]) -> None:
    """Add a section to the report and print it at once: a run stopped by a time limit
    still shows everything it measured."""
    report += lines
    print("\n".join(lines), flush=True)


def plot_scaling(scaling: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in scaling["series"].items():
        ax.plot(scaling["ks"], [s * 1e3 for s in series], marker="o", label=name)
    ax.set(xlabel="inner steps K", ylabel="time per SA-VAE training step (ms)",
           title=f"{scaling['config']} on {scaling['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def memory_table(mem: dict) -> str:
    return harness.markdown_table(mem["rows"], [
        ("method", "method", ""), ("K", "steps", "{}"), ("peak (MB)", "peak_mb", "{:.0f}"),
        ("beyond floor (MB)", "extra_mb", "{:.0f}"), ("beyond floor (x |theta|)", "extra_in_theta", "{:.2f}")])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds (about 2 minutes on CPU)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--out", default=harness.RESULTS_DIR)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile in the op benchmarks")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per candidate (default 20, 5 with --quick)")
    p.add_argument("--configs", default=None,
                   help="comma-separated decoder configs of the step section (default: all, or small_lstm with --quick)")
    args = p.parse_args(argv)
    sections = set(args.only.split(","))
    unknown = [n for n in (args.configs.split(",") if args.configs else []) if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; known: {sorted(CONFIGS)}")
    dev, quick = args.device, args.quick
    start = time.time()
    info = harness.machine(dev)
    results = {"machine": info, "commit": harness.git_commit(), "date": dt.date.today().isoformat(),
               "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]), "quick": quick}
    report = [f"# savae_fast benchmarks: {info.get('gpu') or info['cpu']} ({dev})",
              f"date {results['date']}, commit {results['commit']}, torch {info['torch']}, "
              f"threads {info['torch_threads']}{', quick' if quick else ''}", ""]
    print("\n".join(report), flush=True)

    if "startup" in sections:
        from benchmarks.startup import bench_startup, startup_table

        results["startup"] = bench_startup(rounds=3 if quick else 7)
        emit(report, ["## Start-up: fresh interpreters, interleaved (benchmarks/startup.py)",
                      startup_table(results["startup"]), ""])
    if "ops" in sections:
        r = bench_ops(dev, QUICK_SIZES if quick else SIZES, rounds=args.rounds or (5 if quick else 20),
                      compile_=not (args.no_compile or quick))
        results["ops"] = r
        emit(report, ["## Fused operators", ops_table(r), ""])
        if dev == "cuda":
            try:
                lat = bench_latency(dev, rounds=20 if quick else 50)
            except Exception as exc:  # noqa: BLE001 - reported in the results, the suite goes on
                lat = {"error": f"{type(exc).__name__}: {exc}"}
                emit(report, [f"## Launch latency: failed ({lat['error'][:300]})", ""])
            else:
                emit(report, ["## Launch latency per operator call (CUDA; see benchmarks/op_level.py: _latency)",
                           latency_table(lat), ""])
            results["op_latency"] = lat
    if "step" in sections:
        results["step"] = []
        if args.configs:
            names = args.configs.split(",")
        elif quick:
            names = ["small_lstm"]
        else:
            names = ["tiny_lstm", "small_lstm", "synthetic_lstm", "pixelcnn_small", "yahoo_lstm", "pixelcnn_omniglot"]
        for name in names:
            cfg = CONFIGS[name]
            if dev not in cfg.devices:
                continue
            rounds = args.rounds or (5 if quick else 20)
            try:
                r = bench_step(cfg, dev, rounds=min(rounds, cfg.max_rounds or rounds), include_slow=not quick)
            except Exception as exc:  # noqa: BLE001 - reported in the results, the suite goes on
                results["step"].append({"config": name, "error": f"{type(exc).__name__}: {exc}"})
                emit(report, [f"## SA-VAE training step: {name}: failed ({type(exc).__name__}: {str(exc)[:300]})", ""])
                continue
            results["step"].append(r)
            errors_on = "" if r["error_batch"] == cfg.batch else f"; errors on the first {r['error_batch']} examples"
            emit(report, [f"## SA-VAE training step: {name} (B={cfg.batch}, D={cfg.latent}, K={cfg.steps}, "
                       f"{r['decoder_params']:,} decoder parameters{errors_on})", step_table(r), ""])
            passes = bench_stacked_passes(cfg, dev, rounds=min(rounds, cfg.max_rounds or rounds))
            results.setdefault("stacked_passes", []).append(passes)
            emit(report, [f"### {name}: one decoder pass over n B rows (stack_points' calls)",
                          stacked_passes_table(passes), ""])
            if dev == "cuda" and cfg.kind == "lstm":
                try:
                    g = bench_graphed_step(cfg, dev, rounds=min(rounds, cfg.max_rounds or rounds))
                except Exception as exc:  # noqa: BLE001 - reported in the results, the suite goes on
                    g = {"config": name, "error": f"{type(exc).__name__}: {exc}"}
                    emit(report, [f"## {name} as one CUDA graph: failed ({g['error'][:300]})", ""])
                else:
                    emit(report, [f"## SA-VAE training step as one CUDA graph (sf.GraphedStep): {name}",
                               graphed_step_table(g), ""])
                results.setdefault("graphed_step", []).append(g)
    if "accuracy" in sections:
        shapes = ((32, 20),) if quick else ((8, 10), (32, 20))
        acc = bench_accuracy(dev, "small_lstm", shapes=shapes, seeds=2 if quick else 5)
        results["accuracy"] = acc
        emit(report, [f"## Gradient relative error vs float64 unrolled autograd, small_lstm decoder "
                   f"(worst of {acc['rows'][0]['seeds']} random problems)", accuracy_table(acc), ""])
        large = bench_accuracy(dev, "large_weight_lstm", shapes=((8, 10),), seeds=2 if quick else 5)
        results["accuracy_large_weight"] = large
        emit(report, ["## Gradient relative error vs float64 unrolled autograd, large-weight LSTM decoder (V 50, "
                   "E 16, H 32, T 30, weights uniform in [-0.5, 0.5]; worst of "
                   f"{large['rows'][0]['seeds']} random problems)", accuracy_table(large), ""])
        trained = bench_accuracy(dev, "trained_synthetic_lstm", shapes=((8, 10), (32, 20)), seeds=2 if quick else 5)
        results["accuracy_trained"] = trained
        emit(report, ["## Gradient relative error vs float64 unrolled autograd, trained decoder (the demo's SA-VAE "
                   "text row after 8 epochs: V 100, E 32, H 64, D 2, T 10; benchmarks/trained_decoder.py; worst of "
                   f"{trained['rows'][0]['seeds']} random problems)", accuracy_table(trained), ""])
        ptb = bench_accuracy(dev, "trained_ptb_lstm", shapes=((8, 10), (32, 20)), seeds=2 if quick else 5)
        results["accuracy_trained_ptb"] = ptb
        emit(report, ["## Gradient relative error vs float64 unrolled autograd, PTB-trained decoder (a short "
                      "SA-VAE run on Penn Treebank: V 2000, E 32, H 64, D 8; benchmarks/trained_decoder.py --data "
                      f"ptb; worst of {ptb['rows'][0]['seeds']} random problems)", accuracy_table(ptb), ""])
    if "scaling" in sections:
        cfg = CONFIGS["small_lstm"]
        ks = (1, 5, 10) if quick else (1, 5, 10, 20, 40)
        sk = bench_scaling_k(cfg, dev, ks, rounds=3 if quick else 7)
        sb = bench_scaling_batch(cfg, dev, (16, 64) if quick else (16, 64, 256, 1024), rounds=3 if quick else 5)
        results["scaling_k"], results["scaling_batch"] = sk, sb
        os.makedirs(args.out, exist_ok=True)
        tag = f"{harness.machine_tag(info)}_{results['date']}"
        plot = plot_scaling(sk, os.path.join(args.out, f"{tag}_step_vs_k.png"))
        results["scaling_plot"] = os.path.relpath(plot, os.path.dirname(harness.RESULTS_DIR))
        rows = [{"K": k, **{n: s[i] * 1e3 for n, s in sk["series"].items()}} for i, k in enumerate(sk["ks"])]
        emit(report, ["## Time per training step vs K (ms)",
                   harness.markdown_table(rows, [("K", "K", "{}")] + [(n, n, "{:.1f}") for n in sk["series"]]), ""])
        rows = [{"B": b, **{n: s[i] * 1e3 for n, s in sb["series"].items()}} for i, b in enumerate(sb["batches"])]
        emit(report, ["## Time per training step vs batch size (ms)",
                   harness.markdown_table(rows, [("B", "B", "{}")] + [(n, n, "{:.1f}") for n in sb["series"]]), ""])
    if "training" in sections:  # its own runs, results and plots (benchmarks/training.py, default settings)
        from benchmarks import training

        training.main(["--smoke"] if quick else [])
    if "memory" in sections:
        mem = bench_memory("lstm_5m", dev, ks=(20,) if quick else (5, 20))
        results["memory"] = mem
        emit(report, [f"## Peak memory, {mem['rows'][0]['params']:,}-parameter LSTM decoder "
                   f"({'CUDA allocator maximum' if dev == 'cuda' else 'resident-set high-water mark'}, "
                   "beyond a plain training step of the decoder)", memory_table(mem), ""])

    results["seconds"] = time.time() - start
    path = harness.write_results(results, args.out)
    md = path[:-5] + ".md"
    report.append(f"total {results['seconds']:.0f} s")
    with open(md, "w") as f:
        f.write("\n".join(report) + "\n")
    print(report[-1])
    print(f"\nwrote {path} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
