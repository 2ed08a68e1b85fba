"""Training curves of a run directory (metrics.csv) as a PNG."""

from __future__ import annotations

import csv
import os

from savae_fast.app.errors import DataError, MissingDependency


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise DataError(f"no metrics.csv in {run_dir}")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"metrics.csv is empty: {path}")
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in rows]


def plot_panels(panels: list[dict], path: str, title: str | None = None) -> str:
    """Side-by-side line plots, one per panel: ``{"xlabel", "ylabel", "title" (optional),
    "lines": {label: (xs, ys)}, "marker" (optional)}``; written as a PNG to ``path``."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependency("drawing curves needs matplotlib: pip install matplotlib "
                                "(or savae_fast[models])") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (xs, ys) in panel["lines"].items():
            # points where there are few: a one-epoch run is one point, which a bare line does not show
            marker = panel.get("marker") or ("o" if len(xs) <= 30 else None)
            ax.plot(xs, ys, marker=marker, label=label)
        ax.set(xlabel=panel["xlabel"], ylabel=panel["ylabel"], title=panel.get("title", ""))
        if panel.get("log"):
            ax.set_yscale("log")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(run_dir: str, output: str | None = None) -> str:
    """Training curves of a run directory: loss and NLL bound, train and valid KL."""
    rows = read_metrics(run_dir)
    epochs = [r["epoch"] for r in rows]
    series = lambda key: (epochs, [r[key] for r in rows])  # noqa: E731
    panels = [
        {"xlabel": "epoch", "ylabel": "nats / example",
         "lines": {"train loss (-ELBO, beta-weighted)": series("train_loss"), "valid NLL bound": series("valid_nll_bound")}},
        {"xlabel": "epoch", "ylabel": "KL (nats)",
         "lines": {"train KL": series("train_kl"), "valid KL": series("valid_kl")}},
    ]
    # the outer gradient's norm and refine's amplification of its backpropagated vector (runs that record them):
    # an exploding gradient through the inner steps shows here first
    growth = {label: series(key) for key, label in (("train_grad_norm_median", "outer grad norm (median)"),
                                                     ("train_grad_norm_max", "outer grad norm (max)"),
                                                     ("refine_gain_median", "refine gain (median of batches)"),
                                                     ("refine_gain_max", "refine gain (max)"))
              if all(key in r for r in rows)}
    if growth:
        panels.append({"xlabel": "epoch", "ylabel": "before clipping (log scale)", "lines": growth, "log": True})
    return plot_panels(panels, output or os.path.join(run_dir, "curves.png"),
                       title=os.path.basename(os.path.abspath(run_dir)))
