"""The training loop: one process, or DistributedDataParallel under torchrun."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from savae_fast.app import evaluate as ev
from savae_fast.app.devices import resolve_device
from savae_fast.app.errors import CheckpointError, ConfigError, notice
from savae_fast.app.train import checkpoint
from savae_fast.app.train.config import TrainConfig
from savae_fast.app.train.data import RunData, build_model, load_data
from savae_fast.app.train.distributed import Distributed, ShardedObjective
from savae_fast.app.train.metrics import Progress, append_metrics
from savae_fast.app.train.rng import rng_state, set_rng_state


# Options a resumed run may change: none of them changes what is computed.
RESUMABLE_CHANGES = frozenset({"epochs", "out_dir", "device", "log_every", "eval_samples", "eval_elbo_samples",
                               "data_path", "backend"})


def check_run_directory(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"out_dir (--out-dir) names a file, not a directory: {path}")


def make_run_directory(path: str) -> None:
    check_run_directory(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create out_dir (--out-dir) {path}: {exc.strerror}") from exc


class Trainer:
    """Trains one configuration: epochs, validation, checkpoints (last.pt, best.pt), metrics."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True, data: RunData | None = None):
        self.cfg = cfg.validate()
        self.out_dir = cfg.out_dir
        if resume and not os.path.isfile(self._path("last.pt")):
            raise CheckpointError(f"cannot resume: {self._path('last.pt')} not found")
        self.d = Distributed()
        self.device = resolve_device(cfg.device, self.d.local_rank)
        self.d.init(self.device)
        self.progress = progress and self.d.is_main
        check_run_directory(self.out_dir)
        self._steps_per_epoch = None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.data = data or load_data(cfg)
        self.model = build_model(cfg, self.data).to(self.device)
        self.objective = ShardedObjective(self.model, cfg, self.d)
        self.step_module = self.objective
        if self.d.enabled:
            self.step_module = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = (torch.optim.SGD(params, lr=cfg.lr) if cfg.optimizer == "sgd"
                          else torch.optim.Adam(params, lr=cfg.lr))
        self.state = {"epoch": 0, "step": 0, "lr": cfg.lr, "best_val": math.inf, "best_epoch": -1, "history": []}
        self.data_fingerprint = self.data.fingerprint()
        if resume:
            self._load_last()
        if self.d.is_main:  # after a resume was accepted: a rejected one leaves the run as it was
            make_run_directory(self.out_dir)
            with open(os.path.join(self.out_dir, "config.json"), "w") as f:
                f.write(cfg.to_json())

    # ------------------------------------------------------------------ checkpoints
    def _path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def _save_last(self) -> None:
        if not self.d.is_main:
            return
        checkpoint.save({"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                         "optimizer": self.optimizer.state_dict(), "state": self.state, "rng": rng_state(),
                         "data_fingerprint": self.data_fingerprint}, self._path("last.pt"))

    def _save_best(self, epoch: int, val: dict) -> None:
        if not self.d.is_main:
            return
        checkpoint.save({"config": self.cfg.to_dict(), "model": self.model.state_dict(), "epoch": epoch,
                         "valid": val, "vocab_size": self.data.vocab_size, "image_size": self.data.image_size},
                        self._path("best.pt"))

    def _load_last(self) -> None:
        path = self._path("last.pt")
        ck = checkpoint.load(path, map_location=self.device)
        saved, current = TrainConfig.from_dict(ck["config"]).to_dict(), self.cfg.to_dict()
        for key, value in saved.items():
            if key not in RESUMABLE_CHANGES and value != current[key]:
                raise CheckpointError(
                    f"cannot resume: {path} was written with {key}={value!r}, this run has "
                    f"{key}={current[key]!r} (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
        saved_data = ck.get("data_fingerprint")
        if saved_data is not None and saved_data != self.data_fingerprint:
            raise CheckpointError(f"cannot resume: {path} was trained on different data (fingerprint "
                                  f"{saved_data[:12]}, this run's data {self.data_fingerprint[:12]})")
        try:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot resume: {path} does not match this run's model "
                                  f"({str(exc).splitlines()[0]})") from exc
        self.state = ck["state"]
        set_rng_state(ck["rng"])

    # --------------------------------------------------------------------- training
    def beta(self) -> float:
        c = self.cfg
        if c.warmup_epochs <= 0 or c.mode in ("autoreg",):
            return 1.0
        steps = c.warmup_epochs * self.steps_per_epoch
        return min(1.0, c.warmup_start + (1.0 - c.warmup_start) * self.state["step"] / steps)

    @property
    def steps_per_epoch(self) -> int:
        if self._steps_per_epoch is None:
            n = len(self.data.batches("train", self.cfg.batch_size, shuffle=False))
            self._steps_per_epoch = min(n, self.cfg.max_batches_per_epoch or n)
        return self._steps_per_epoch

    def train_epoch(self, epoch: int) -> dict:
        c = self.cfg
        batches = self.data.batches("train", c.batch_size, shuffle=True, epoch=epoch)[: self.steps_per_epoch]
        for group in self.optimizer.param_groups:
            group["lr"] = self.state["lr"]
        self.model.train()
        totals = [0.0, 0.0, 0.0, 0.0]  # loss * n, nll, kl, n
        bar = Progress(self.progress, len(batches), f"{c.mode} epoch {epoch + 1}/{c.epochs}")
        for x in batches:
            if self.d.enabled and x.shape[0] % self.d.world:
                continue  # equal shares keep the data-parallel update equal to the one-process update
            local = self.d.shard(x)
            x_local = x[local].to(self.device)
            beta = self.beta()
            out = self.step_module(x_local, beta, x.shape[0], local)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if c.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
            self.optimizer.step()
            self.state["step"] += 1
            n = x_local.shape[0]
            totals = [t + v for t, v in zip(totals, (float(out.loss.detach()) * n, float(out.nll.sum()),
                                                     float(out.kl.sum()), n))]
            bar.update(loss=f"{totals[0] / totals[3]:.2f}", kl=f"{totals[2] / totals[3]:.2f}", beta=f"{beta:.2f}")
        bar.close()
        loss, nll, kl, n = self.d.sum(totals, self.device)
        return {"train_loss": loss / max(n, 1), "train_nll": nll / max(n, 1), "train_kl": kl / max(n, 1)}

    def validate(self, split: str = "valid", full: bool = False, progress: Progress | None = None) -> dict:
        batches = self.data.batches(split, self.cfg.batch_size, shuffle=False)
        return ev.evaluate(self.model, self.cfg, batches, self.device, self.data.num_tokens(split), full=full,
                           progress=progress)

    def fit(self) -> dict:
        c = self.cfg
        while self.state["epoch"] < c.epochs:
            epoch = self.state["epoch"]
            start = time.time()
            train = self.train_epoch(epoch)
            val = self.validate("valid")
            record = {"epoch": epoch + 1, "lr": self.state["lr"], "beta": self.beta(), **train,
                      **{f"valid_{k}": v for k, v in val.items()}, "seconds": time.time() - start}
            self.state["history"].append(record)
            improved = val["nll_bound"] < self.state["best_val"]
            if improved:
                self.state["best_val"], self.state["best_epoch"] = val["nll_bound"], epoch + 1
                self._save_best(epoch + 1, val)
            elif c.optimizer == "sgd" and epoch + 1 > c.decay_start_epoch:
                self.state["lr"] /= 2  # the paper's schedule: halve when validation stops improving
            self.state["epoch"] = epoch + 1
            self._write_metrics(record)
            self._save_last()
            if self.progress:
                print(f"[{c.mode}] epoch {epoch + 1}: train loss {train['train_loss']:.3f} kl "
                      f"{train['train_kl']:.3f} | valid bound {val['nll_bound']:.3f} kl {val['kl']:.3f}"
                      f" ({record['seconds']:.0f}s)", file=sys.stderr)
            if c.optimizer == "sgd" and self.state["lr"] < c.min_lr:
                break
        return self.state

    def _write_metrics(self, record: dict) -> None:
        if self.d.is_main:
            append_metrics(self.out_dir, record, self.state["history"])

    def test(self) -> dict:
        """Full metrics of the best checkpoint on the test split (written to results.json)."""
        best = self._path("best.pt")
        if os.path.exists(best):
            self.model.load_state_dict(checkpoint.load(best, map_location=self.device)["model"])
        c = self.cfg
        batches = math.ceil(len(self.data.splits["test"]) / c.batch_size)  # as data.batches chunks them
        what = "exact NLL" if c.mode == "autoreg" else f"{c.eval_samples} importance samples per example"
        if self.d.is_main:  # the full test evaluation can take long: say so even with --no-progress
            notice(f"testing {'best.pt' if os.path.exists(best) else 'the last model'} on the test split "
                   f"({len(self.data.splits['test'])} examples, {batches} batches, {what})")
        bar = Progress(self.progress, batches, f"{c.mode} test", estimate=self.d.is_main)
        res = self.validate("test", full=True, progress=bar)
        bar.close()
        if self.data.true_test_nll is not None:
            res["true_nll"] = self.data.true_test_nll
        if self.d.is_main:
            with open(self._path("results.json"), "w") as f:
                json.dump({"mode": self.cfg.mode, "dataset": self.cfg.dataset, **res}, f, indent=1)
        return res

    def close(self) -> None:
        if self.d.enabled and dist.is_initialized():
            dist.destroy_process_group()
