"""Training curves of a run directory (metrics.csv) as a PNG."""

from __future__ import annotations

import csv
import os

from savae_fast.data.text import DataError


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise DataError(f"no metrics.csv in {run_dir}")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"metrics.csv is empty: {path}")
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in rows]


def plot_run(run_dir: str, output: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], label="train loss (-ELBO, beta-weighted)")
    axes[0].plot(epochs, [r["valid_nll_bound"] for r in rows], label="valid NLL bound")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("nats / example")
    axes[0].legend()
    axes[1].plot(epochs, [r["train_kl"] for r in rows], label="train KL")
    axes[1].plot(epochs, [r["valid_kl"] for r in rows], label="valid KL")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("KL (nats)")
    axes[1].legend()
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    output = output or os.path.join(run_dir, "curves.png")
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
