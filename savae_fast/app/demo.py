"""The main job: ``savae-fast demo``.

Trains the paper's vae, svi and savae rows on the synthetic data (sentences
from a random latent-variable LSTM, true NLL known) and vae / savae on the 8x8
digits bundled with scikit-learn, then prints a table like the paper's and
saves training curves. Sized for a few minutes on 2 CPU cores.

Settings (documented deviations from the paper, which trained for days on
Yahoo/OMNIGLOT): small LSTMs (embedding 32, hidden 64, latent 2) and a
4-layer gated PixelCNN; Adam (lr 2e-3 text, 1e-3 images) for a short run;
no KL warm-up on the synthetic data, the setting in which a VAE with an
autoregressive decoder collapses its posterior.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from savae_fast.app.train.config import TrainConfig
from savae_fast.app.train.data import load_data
from savae_fast.app.errors import MissingDependency, notice
from savae_fast.app.plotting import plot_panels
from savae_fast.app.train.loop import Trainer

TEXT = dict(dataset="synthetic", latent_dim=2, embed_dim=32, hidden_dim=64, dropout=0.0, batch_size=32,
            optimizer="adam", lr=2e-3, epochs=8, warmup_epochs=0, svi_steps=20, eval_samples=100,
            eval_elbo_samples=5, seed=3435)
IMAGES = dict(dataset="digits", latent_dim=8, enc_channels=16, dec_channels=16,
              kernels=(5, 5, 3, 3), batch_size=50, optimizer="adam", lr=1e-3, epochs=6, warmup_epochs=1,
              svi_steps=20, eval_samples=100, eval_elbo_samples=5, seed=3435)
QUICK = dict(epochs=1, max_batches_per_epoch=8, eval_samples=10, eval_elbo_samples=1, svi_steps=4)
QUICK_SYNTHETIC = {"train": 512, "valid": 64, "test": 64}


def _configs(out_dir: str, quick: bool):
    runs = []
    for mode in ("vae", "svi", "savae"):
        kw = dict(TEXT, mode=mode, out_dir=os.path.join(out_dir, f"synthetic-{mode}"))
        if quick:
            kw.update(QUICK, synthetic=QUICK_SYNTHETIC)
        runs.append(("synthetic", TrainConfig(**kw).validate()))
    for mode in ("vae", "savae"):
        kw = dict(IMAGES, mode=mode, out_dir=os.path.join(out_dir, f"digits-{mode}"))
        if quick:
            kw.update(QUICK)
        runs.append(("digits", TrainConfig(**kw).validate()))
    return runs


def format_table(rows: list[dict]) -> str:
    head = "| data | model | NLL bound | KL | IW NLL | MI | active units | true NLL | train time |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        true = f"{r['true_nll']:.2f}" if r.get("true_nll") is not None else "-"
        lines.append(f"| {r['data']} | {r['mode']} | {r['nll_bound']:.2f} | {r['kl']:.2f} | {r['iw_nll']:.2f} | "
                     f"{r.get('mutual_info', 0.0):.2f} | {r.get('active_units', 0)} | {true} | {r['seconds']:.0f}s |")
    return "\n".join(lines)


def plot_curves(histories: dict, path: str) -> str:
    """Validation NLL bound and KL per epoch of the synthetic-data runs."""
    def series(key):
        return {name: ([h["epoch"] for h in hist], [h[key] for h in hist]) for name, hist in histories.items()}

    return plot_panels([
        {"xlabel": "epoch", "ylabel": "validation NLL bound (nats)", "title": "synthetic data", "marker": "o",
         "lines": series("valid_nll_bound")},
        {"xlabel": "epoch", "ylabel": "validation KL (nats)", "title": "posterior collapse: KL -> 0", "marker": "o",
         "lines": series("valid_kl")},
    ], path)


def run_demo(out_dir: str = "runs/demo", quick: bool = False, progress: bool = True, threads: int = 0) -> list[dict]:
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    rows, histories, data_cache = [], {}, {}
    for data_name, cfg in _configs(out_dir, quick):
        cfg.threads = threads
        key = (data_name, json.dumps(cfg.synthetic, sort_keys=True))
        if key not in data_cache:
            t = time.time()
            data_cache[key] = load_data(cfg)
            print(f"[demo] {data_name} data ready ({time.time() - t:.0f}s)", file=sys.stderr)
        t = time.time()
        trainer = Trainer(cfg, progress=progress, data=data_cache[key], overwrite=True)  # (the demo's own runs)
        try:
            trainer.fit()
            res = trainer.test()
        finally:
            trainer.close()
        seconds = time.time() - t
        rows.append({"data": data_name, "mode": cfg.mode, "seconds": seconds, **res})
        if data_name == "synthetic":
            histories[cfg.mode] = trainer.state["history"]
        print(f"[demo] {data_name} {cfg.mode}: bound {res['nll_bound']:.2f}, KL {res['kl']:.2f} "
              f"({seconds:.0f}s)", file=sys.stderr)
    table = format_table(rows)
    try:
        plot = plot_curves(histories, os.path.join(out_dir, "synthetic_curves.png"))
    except MissingDependency as exc:  # the runs and the table do not need it
        notice(f"no curves drawn: {exc}")
        plot = "(none)"
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"rows": rows, "seconds": time.time() - start, "torch": torch.__version__}, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    by_mode = {r["mode"]: r for r in rows if r["data"] == "synthetic"}
    if {"vae", "savae"} <= set(by_mode):
        v, s = by_mode["vae"], by_mode["savae"]
        print(f"\nsynthetic: VAE KL {v['kl']:.2f} vs SA-VAE KL {s['kl']:.2f} (posterior collapse "
              f"{'avoided' if s['kl'] > 0.05 > v['kl'] else 'not shown'}); NLL bound SA-VAE {s['nll_bound']:.2f} vs "
              f"VAE {v['nll_bound']:.2f}; true NLL {s.get('true_nll', float('nan')):.2f}")
    print(f"total {time.time() - start:.0f}s; curves: {plot}")
    return rows
