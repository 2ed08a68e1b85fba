"""Training time per batch against the number of intra-op threads, on an idle machine and on one
whose cores are busy with other processes: where the default thread setting of the CLI and
the demo comes from (savae_fast/app/threads.py).

``python -m benchmarks.threads [--batches 30] [--rounds 3] [--configs demo_text,demo_digits,text_h256]``

Each measurement is a fresh process (``--child``) that trains ``--batches`` SA-VAE batches (after
two warm-up batches) with ``torch.set_num_threads(t)``; candidates alternate within each round;
"loaded" rounds run one busy-looping process per core next to it. Reported: the median and the
90th percentile of the per-batch times over all rounds, and the worst batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    # the demo's synthetic-data SA-VAE row (small LSTMs) and its digits row (small PixelCNN)
    "demo_text": dict(dataset="synthetic", latent_dim=2, embed_dim=32, hidden_dim=64, dropout=0.0, batch_size=32,
                      optimizer="adam", lr=2e-3, warmup_epochs=0, svi_steps=20),
    "demo_digits": dict(dataset="digits", latent_dim=8, enc_channels=16, dec_channels=16, kernels=(5, 5, 3, 3),
                        batch_size=50, optimizer="adam", lr=1e-3, warmup_epochs=1, svi_steps=20),
    # a text model of the size the CPU training benchmark uses (embedding 128, hidden 256, latent 32)
    "text_h256": dict(dataset="synthetic", latent_dim=32, embed_dim=128, hidden_dim=256, dropout=0.5,
                      batch_size=32, optimizer="sgd", lr=1.0, warmup_epochs=0, svi_steps=20),
}


def child(config: str, threads: int, batches: int) -> dict:
    import torch

    from savae_fast.app.train.config import TrainConfig
    from savae_fast.app.train.loop import Trainer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(**CONFIGS[config], mode="savae", epochs=batches + 2, max_batches_per_epoch=1,
                          out_dir=out, threads=threads)
        trainer = Trainer(cfg, progress=False)
        times = []
        for epoch in range(batches + 2):
            start = time.perf_counter()
            trainer.train_epoch(epoch)
            times.append(time.perf_counter() - start)
        trainer.close()
    return {"config": config, "threads": threads, "seconds": times[2:]}


def _busy(n: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run(configs, thread_counts, batches: int, rounds: int) -> dict:
    results = {}
    for load in ("idle", "loaded"):
        for _ in range(rounds):
            busy = _busy(os.cpu_count() or 1) if load == "loaded" else []
            try:
                for config in configs:
                    for t in thread_counts:
                        out = subprocess.run([sys.executable, "-m", "benchmarks.threads", "--child", config, str(t),
                                              str(batches)], capture_output=True, text=True, check=True)
                        res = json.loads(out.stdout.strip().splitlines()[-1])
                        results.setdefault((config, load, t), []).extend(res["seconds"])
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
    rows = []
    for (config, load, t), seconds in results.items():
        seconds = sorted(seconds)
        rows.append({"config": config, "load": load, "threads": t, "batches": len(seconds),
                     "median_ms": 1e3 * statistics.median(seconds),
                     "p90_ms": 1e3 * seconds[int(0.9 * (len(seconds) - 1))], "max_ms": 1e3 * seconds[-1]})
    return {"cpu_count": os.cpu_count(), "rows": rows}


def table(result: dict) -> str:
    lines = ["| config | machine | threads | batches | median ms | 90th pct ms | worst ms |", "|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["config"], r["load"], r["threads"])):
        lines.append(f"| {r['config']} | {r['load']} | {r['threads']} | {r['batches']} | {r['median_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['max_ms']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, metavar=("CONFIG", "THREADS", "BATCHES"), help=argparse.SUPPRESS)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.child:
        config, threads, batches = args.child
        print(json.dumps(child(config, int(threads), int(batches))))
        return 0
    result = run(args.configs.split(","), [int(t) for t in args.threads.split(",")], args.batches, args.rounds)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
