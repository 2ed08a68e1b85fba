"""Every figure of README and the docs, from the committed results: ``python -m benchmarks.plots``.

* ``plot_accuracy_vs_cost.png``: gradient error against the cost of a training step over the
  decoder floor, every mode, on the small LSTM (stacked modes included), the two trained decoders
  and the large-weight LSTM (CPU);
* ``plot_step_vs_k.png``: time of a training step against K for refine, the authors' algorithm,
  unrolled autograd and the decoder floor (CPU);
* ``plot_gpu_graph.png``: a training step on a GPU, eager and as one CUDA graph (``GraphedStep``);
* the training benchmark's curves are drawn by ``benchmarks.training`` itself.

Each figure says in its caption which machine, date and commit measured it.
"""

from __future__ import annotations

import json
import os
import textwrap

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SOURCES = {
    "step": "amd-epyc_2026-12-02.json",  # step section with the stacked modes (small LSTM)
    "accuracy": "amd-epyc_2026-11-26_accuracy.json",  # trained and large-weight decoders
    "scaling": "amd-epyc_2026-11-26.json",  # step time against K
    "gpu": "nvidia-h100-80gb-hbm3_2026-11-26.json",  # eager and graphed steps
}
SHORT = {"refine fd_forward": "fd_forward", "refine fd_central": "fd_central", "refine fd_richardson": "fd_richardson",
         "refine fd_adaptive": "fd_adaptive", "refine exact": "exact", "refine jvp": "jvp",
         "refine fd_central, stacked": "fd_central stacked", "refine fd_richardson, stacked": "fd_richardson stacked",
         "refine fd_adaptive, stacked": "fd_adaptive stacked", "optim_n2n (authors)": "authors' optim_n2n",
         "unrolled (autograd)": "unrolled autograd"}


def _load(name: str) -> dict:
    with open(os.path.join(RESULTS, SOURCES[name])) as f:
        return json.load(f)


def _caption(result: dict) -> str:
    machine = result["machine"].get("gpu") or result["machine"].get("cpu", "?")
    command = result.get("command", "").strip()
    if command == "python -m benchmarks":  # (runs before 2026-12-02 did not record their arguments)
        command += " (arguments not recorded)"
    return textwrap.fill(f"{machine}, {result['date']}, commit {result['commit']}: {command}", 200)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_panels() -> list[dict]:
    """(title, {mode: (cost over the floor, float32 error)}, caption) per decoder."""
    panels = []
    step = _load("step")
    small = next(r for r in step["step"] if r["config"] == "small_lstm")
    points = {SHORT[r["method"]]: (r["vs_floor"]["median_of_ratios"], r["grad_rel_error"])
              for r in small["rows"] if r["method"] in SHORT and r.get("grad_rel_error")}
    panels.append(("small LSTM (B 32, K 20): median of 20 rounds, error of one draw", points, _caption(step)))
    acc = _load("accuracy")
    for key, title in (("accuracy_trained", "trained decoder (synthetic data), B 8, K 10"),
                       ("accuracy_trained_ptb", "trained decoder (PTB), B 8, K 10"),
                       ("accuracy_large_weight", "large-weight LSTM, B 8, K 10")):
        rows = [r for r in acc[key]["rows"] if r["dtype"] == "float32" and r["batch"] == 8]
        floor = next(r["ms"] for r in rows if r["method"].startswith("decoder floor"))
        panels.append((f"{title}: worst of {rows[0]['seeds']} draws",
                       {SHORT[r["method"]]: (r["ms"] / floor, r["worst"]) for r in rows if r["method"] in SHORT},
                       _caption(acc)))
    return panels


COLORS = {"fd_forward": "#1f77b4", "fd_central": "#ff7f0e", "fd_richardson": "#2ca02c", "fd_adaptive": "#d62728",
          "exact": "#9467bd", "jvp": "#8c564b", "authors' optim_n2n": "#e377c2", "unrolled autograd": "#7f7f7f"}


def _style(name: str) -> dict:
    base = name.replace(" stacked", "")
    marker = "s" if name.endswith("stacked") else {"authors' optim_n2n": "x", "unrolled autograd": "^"}.get(name, "o")
    return {"color": COLORS[base], "marker": marker, "facecolors": "none" if marker == "s" else None}


def plot_accuracy_vs_cost(path: str) -> str:
    plt = _plt()
    panels = accuracy_panels()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    handles = {}
    for ax, (title, points, caption) in zip(axes.flat, panels):
        for name, (cost, err) in points.items():
            style = _style(name)
            kw = {"marker": style["marker"], "s": 46, "label": name}
            if style["facecolors"] == "none":
                kw.update(facecolors="none", edgecolors=style["color"], linewidths=1.5)
            else:
                kw.update(color=style["color"])
            handles[name] = ax.scatter(cost, err, **kw)
        ax.set_yscale("log")
        ax.set(xlabel="time per training step / decoder floor (2K + 1 passes)",
               ylabel="float32 gradient rel. error vs float64", title=title)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    order = [n for n in SHORT.values() if n in handles]
    fig.legend([handles[n] for n in order], order, loc="upper center", ncol=6, fontsize=8, frameon=False)
    return _save(plt, fig, path, "CPU, 2 cores. " + panels[0][2] + "\n" + panels[1][2], fontsize=6.5, top=0.94)


def _save(plt, fig, path: str, caption: str, fontsize: float = 6, top: float = 1) -> str:
    """The caption (machine, date, commit) under the axes, then the file."""
    fig.text(0.01, 0.005, caption, fontsize=fontsize, alpha=0.8)
    fig.tight_layout(rect=(0, 0.04, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_step_vs_k(path: str) -> str:
    plt = _plt()
    res = _load("scaling")
    scaling = res["scaling_k"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, series in scaling["series"].items():
        ax.plot(scaling["ks"], [s * 1e3 for s in series], marker="o", label=SHORT.get(name, name))
    ax.set(xlabel="inner steps K", ylabel="time per SA-VAE training step (ms)",
           title=f"{scaling['config']} on {scaling['device']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path, _caption(res))


def plot_gpu_graph(path: str) -> str:
    plt = _plt()
    res = _load("gpu")
    fig, axes = plt.subplots(1, len(res["graphed_step"]), figsize=(5.2 * len(res["graphed_step"]), 4), squeeze=False)
    for ax, g in zip(axes[0], res["graphed_step"]):
        names = [r["method"] for r in g["rows"]]
        values = [r["median_s"] * 1e3 for r in g["rows"]]
        bars = ax.bar(range(len(names)), values, color=["#8fa9d9", "#3a5fb0", "#d9a98f", "#b0603a"])
        ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=7)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set(ylabel="ms per training step", title=f"{g['config']} (K 20)")
    return _save(plt, fig, path, _caption(res))


def main(argv=None) -> int:
    out = RESULTS
    paths = [plot_accuracy_vs_cost(os.path.join(out, "plot_accuracy_vs_cost.png")),
             plot_step_vs_k(os.path.join(out, "plot_step_vs_k.png")),
             plot_gpu_graph(os.path.join(out, "plot_gpu_graph.png"))]
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
