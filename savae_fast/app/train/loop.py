"""The training loop: one process, or DistributedDataParallel under torchrun."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from savae_fast.app import evaluate as ev
from savae_fast.app.devices import resolve_device
from savae_fast.app.errors import CheckpointError, ConfigError, notice
from savae_fast.app.threads import apply_threads
from savae_fast.app.train import checkpoint
from savae_fast.app.train.config import OPTIM_N2N, TrainConfig
from savae_fast.app.train.data import RunData, build_model, load_data
from savae_fast.app.train.distributed import Distributed, ShardedObjective
from savae_fast.app.train.metrics import Progress, append_metrics, write_metrics
from savae_fast.app.train.rng import rng_state, set_rng_state


# Options a resumed run may change: none of them changes what is computed.
RESUMABLE_CHANGES = frozenset({"epochs", "out_dir", "device", "log_every", "eval_samples", "eval_elbo_samples",
                               "data_path", "backend", "threads"})


# What a run writes into its out_dir (a fresh run refuses a directory holding any of them).
RUN_FILES = ("config.json", "metrics.csv", "metrics.json", "last.pt", "best.pt", "results.json")
LOCK_FILE = ".savae-fast.lock"


def check_run_directory(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"out_dir (--out-dir) names a file, not a directory: {path}")


def run_files(path: str) -> list[str]:
    """The run files already in ``path``."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(path, name))]


CHECKPOINTS = ("last.pt", "best.pt")


def never_started(path: str) -> bool:
    """A run directory with run files but no checkpoint: a run killed before its first epoch was
    saved (its config.json, maybe a metrics row), which holds nothing to resume or to keep."""
    found = run_files(path)
    return bool(found) and not any(name in found for name in CHECKPOINTS)


def refuse_existing_run(path: str, resume: bool, overwrite: bool) -> None:
    """A fresh run (no --resume) does not write over another run's files unless told to."""
    found = run_files(path)
    if found and not resume and not overwrite:
        raise ConfigError(f"out_dir (--out-dir) {path} holds a run already ({', '.join(found)}): pass --resume to "
                          "continue it, --overwrite to replace it, or another --out-dir")


class RunDirectory:
    """The out_dir of one run, created and locked (an exclusive lock on a file in it) for the
    run's lifetime, so that two runs cannot write into one directory at once. The lock goes
    with the process (also when it is killed)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = None

    def claim(self) -> None:
        import fcntl

        check_run_directory(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
            lock = open(os.path.join(self.path, LOCK_FILE), "a+")
        except OSError as exc:
            raise ConfigError(f"cannot write to out_dir (--out-dir) {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise ConfigError(f"out_dir (--out-dir) {self.path} is in use by another savae-fast run ({holder}); "
                              "wait for it or choose another --out-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # (closing the file releases the lock)
            self._lock = None


def write_failed(path: str, exc: OSError, state: dict) -> ConfigError:
    """A write into the run directory that failed (full disk, read-only file system, ...)."""
    done = state.get("epoch", 0)
    resume = (f"; last.pt holds epoch {done}: free the space and rerun with --resume" if done
              else "; no epoch was saved yet")
    return ConfigError(f"cannot write {path}: {exc.strerror or exc}{resume}")


class Trainer:
    """Trains one configuration: epochs, validation, checkpoints (last.pt, best.pt), metrics."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True, data: RunData | None = None,
                 overwrite: bool = False):
        self.cfg = cfg.validate()
        self.out_dir = cfg.out_dir
        self.run_dir = RunDirectory(self.out_dir)
        self.state = {"epoch": 0}
        self._saved_state = {"epoch": 0}  # what last.pt holds (for the message of a failed write)
        # a run stopped before its first checkpoint holds nothing to keep: resumed or not, it starts again
        takeover = never_started(self.out_dir)
        if resume and not os.path.isfile(self._path("last.pt")):
            if not takeover:
                raise CheckpointError(f"cannot resume: {self._path('last.pt')} not found")
            resume = False
        if takeover and not resume:
            overwrite = True
            notice(f"{self.out_dir} holds a run that stopped before its first checkpoint "
                   f"({', '.join(run_files(self.out_dir))}, no last.pt): starting it from the beginning")
        self.d = Distributed()
        self.device = resolve_device(cfg.device, self.d.local_rank)
        self.d.init(self.device)
        if self.d.enabled and cfg.hvp == OPTIM_N2N:
            raise ConfigError("hvp (--hvp) 'optim_n2n' (the authors' algorithm) runs in one process: its clipping "
                              "uses the local batch's norms")
        self.progress = progress and self.d.is_main
        check_run_directory(self.out_dir)
        if self.d.is_main:
            refuse_existing_run(self.out_dir, resume, overwrite)
        self.threads = apply_threads(cfg)
        check_refinement_fits(cfg, self.device)
        self._steps_per_epoch = None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.data = data or load_data(cfg)
        check_model_fits(cfg, self.data, self.device)
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
            self.run_dir.claim()
            try:
                refuse_existing_run(self.out_dir, resume, overwrite)  # (a run that finished meanwhile)
                if overwrite and not resume:
                    for name in run_files(self.out_dir):
                        os.unlink(self._path(name))
                with open(self._path("config.json"), "w") as f:
                    f.write(cfg.to_json())
                if resume:  # metrics as of last.pt (a crash after a metrics row but before last.pt left one more)
                    self._rewrite_metrics()
            except OSError as exc:
                self.run_dir.release()
                raise write_failed(self._path("config.json"), exc, self.state) from exc
            except BaseException:
                self.run_dir.release()
                raise

    # ------------------------------------------------------------------ checkpoints
    def _path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def _save(self, obj: dict, name: str) -> None:
        try:
            checkpoint.save(obj, self._path(name))
        except OSError as exc:
            raise write_failed(self._path(name), exc, self._saved_state) from exc

    def _save_last(self) -> None:
        if not self.d.is_main:
            return
        self._save({"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "state": self.state, "rng": rng_state(),
                    "data_fingerprint": self.data_fingerprint}, "last.pt")
        self._saved_state = {"epoch": self.state["epoch"]}

    def _save_best(self, epoch: int, val: dict) -> None:
        if not self.d.is_main:
            return
        self._save({"config": self.cfg.to_dict(), "model": self.model.state_dict(), "epoch": epoch,
                    "valid": val, "vocab_size": self.data.vocab_size, "image_size": self.data.image_size,
                    "data_fingerprint": self.data_fingerprint}, "best.pt")

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
        self._saved_state = {"epoch": self.state["epoch"]}
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
        grad_norms, gains, engaged = [], [], []  # per batch: the outer gradient's norm, refine's amplification
        stats = self.objective.refine_stats
        bar = Progress(self.progress, len(batches), f"{c.mode} epoch {epoch + 1}/{c.epochs}")
        for x in batches:
            if self.d.enabled and x.shape[0] % self.d.world:
                continue  # equal shares keep the data-parallel update equal to the one-process update
            local = self.d.shard(x)
            x_local = x[local].to(self.device)
            beta = self.beta()
            filled = stats.backwards
            out = self.step_module(x_local, beta, x.shape[0], local)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norms.append(float(outer_grad_norm(self.model.parameters(), c.max_grad_norm)))
            self.optimizer.step()
            self.state["step"] += 1
            n = x_local.shape[0]
            totals = [t + v for t, v in zip(totals, (float(out.loss.detach()) * n, float(out.nll.sum()),
                                                     float(out.kl.sum()), n))]
            postfix = dict(loss=f"{totals[0] / totals[3]:.2f}", kl=f"{totals[2] / totals[3]:.2f}", beta=f"{beta:.2f}",
                           grad=f"{grad_norms[-1]:.3g}")
            if stats.backwards > filled:  # refine's backward ran: how much it amplified its vector
                summary = stats.summary()
                gains.append(summary["gain_max"])
                engaged.append(summary["backward_clip_engaged"])
                postfix["gain"] = f"{summary['gain_max']:.3g}"
            bar.update(**postfix)
        bar.close()
        loss, nll, kl, n = self.d.sum(totals, self.device)
        record = {"train_loss": loss / max(n, 1), "train_nll": nll / max(n, 1), "train_kl": kl / max(n, 1),
                  "train_grad_norm_median": statistics.median(grad_norms) if grad_norms else 0.0,
                  "train_grad_norm_max": max(grad_norms, default=0.0)}
        if c.mode == "savae" and c.hvp != OPTIM_N2N:  # (the same columns every epoch of a run)
            record.update(refine_gain_median=statistics.median(gains) if gains else 0.0,
                          refine_gain_max=max(gains, default=0.0),
                          backward_clip_engaged=statistics.mean(engaged) if engaged else 0.0)
        return record

    def eval_batches(self, split: str) -> list:
        return self.data.batches(split, self.cfg.batch_size, shuffle=False)[: self.cfg.max_eval_batches]

    def validate(self, split: str = "valid", full: bool = False, progress: Progress | None = None) -> dict:
        batches = self.eval_batches(split)
        tokens = self.data.num_tokens(split) if self.cfg.max_eval_batches is None else sum(
            int((x[:, 1:] != 0).sum()) for x in batches) if self.data.kind == "text" else 0
        own = progress is None
        if own:  # validation: a bar, or with --no-progress a line if it takes over 30 s
            progress = Progress(self.progress, len(batches), f"{self.cfg.mode} {split}", estimate=self.d.is_main,
                                estimate_above=30.0)
        try:
            return ev.evaluate(self.model, self.cfg, batches, self.device, tokens, full=full, progress=progress)
        finally:
            if own:
                progress.close()

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
                      f"{train['train_kl']:.3f} grad norm {train['train_grad_norm_median']:.3g} (max "
                      f"{train['train_grad_norm_max']:.3g})"
                      + (f" refine gain {train['refine_gain_max']:.3g}" if "refine_gain_max" in train else "")
                      + f" | valid bound {val['nll_bound']:.3f} kl {val['kl']:.3f}"
                      f" ({record['seconds']:.0f}s)", file=sys.stderr)
            if c.optimizer == "sgd" and self.state["lr"] < c.min_lr:
                break
        return self.state

    def _write_metrics(self, record: dict) -> None:
        if self.d.is_main:
            try:
                append_metrics(self.out_dir, record, self.state["history"])
            except OSError as exc:
                raise write_failed(self._path("metrics.csv"), exc, self._saved_state) from exc

    def _rewrite_metrics(self) -> None:
        """metrics.csv and metrics.json from the history in last.pt."""
        write_metrics(self.out_dir, self.state["history"])

    def test(self) -> dict:
        """Full metrics of the best checkpoint on the test split (written to results.json)."""
        best = self._path("best.pt")
        if os.path.exists(best):
            self.model.load_state_dict(checkpoint.load(best, map_location=self.device)["model"])
        c = self.cfg
        batches = len(self.eval_batches("test"))
        examples = min(len(self.data.splits["test"]), batches * c.batch_size)
        what = "exact NLL" if c.mode == "autoreg" else f"{c.eval_samples} importance samples per example"
        if self.d.is_main:  # the full test evaluation can take long: say so even with --no-progress
            notice(f"testing {'best.pt' if os.path.exists(best) else 'the last model'} on the test split "
                   f"({examples} examples, {batches} batches, {what})")
        bar = Progress(self.progress, batches, f"{c.mode} test", estimate=self.d.is_main)
        res = self.validate("test", full=True, progress=bar)
        bar.close()
        if self.data.true_test_nll is not None:
            res["true_nll"] = self.data.true_test_nll
        if self.d.is_main:
            try:
                with open(self._path("results.json"), "w") as f:
                    json.dump({"mode": self.cfg.mode, "dataset": self.cfg.dataset, **res}, f, indent=1)
            except OSError as exc:
                raise write_failed(self._path("results.json"), exc, self._saved_state) from exc
        return res

    def close(self) -> None:
        self.run_dir.release()
        if self.d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def outer_grad_norm(params, max_grad_norm: float) -> torch.Tensor:
    """The outer gradient's norm before clipping; clipped to ``max_grad_norm`` where that is > 0."""
    params = [p for p in params if p.grad is not None]
    if max_grad_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def check_refinement_fits(cfg: TrainConfig, device: torch.device) -> None:
    """The inner refinement's saved state (noise and K steps of lambda and dNLL/dz, float32,
    one batch) within the device's memory: found before anything is written."""
    from savae_fast.refine.validation import memory_capacity

    if not cfg.uses_refinement:
        return
    need = cfg.svi_steps * cfg.batch_size * cfg.latent_dim * 4 * 4
    capacity = memory_capacity(device) if need > 2**30 else None
    if capacity is not None and need > capacity:
        raise ConfigError(f"svi_steps (--svi-steps) {cfg.svi_steps} needs {need / 2**30:,.0f} GiB for the refinement's "
                          f"saved steps at batch size {cfg.batch_size} and latent_dim {cfg.latent_dim}, more than "
                          f"the {capacity / 2**30:,.1f} GiB of {device}")


def check_model_fits(cfg: TrainConfig, data: RunData, device: torch.device) -> None:
    """The model's parameters (counted on the meta device, nothing allocated), their gradients
    and optimiser state within the device's memory."""
    from savae_fast.refine.validation import memory_capacity

    with torch.device("meta"):
        numel = sum(p.numel() for p in build_model(cfg, data).parameters())
    need = numel * 4 * 4  # parameters, gradients, two optimiser moments (Adam)
    capacity = memory_capacity(device) if need > 2**30 else None
    if capacity is not None and need > capacity:
        sizes = (f"embed_dim {cfg.embed_dim}, hidden_dim {cfg.hidden_dim}, vocabulary {data.vocab_size}"
                 if data.kind == "text" else f"enc_channels {cfg.enc_channels}, dec_channels {cfg.dec_channels}")
        raise ConfigError(f"the model has {numel:,} parameters ({sizes}): with their gradients and optimiser "
                          f"state {need / 2**30:,.0f} GiB, more than the {capacity / 2**30:,.1f} GiB of {device} "
                          "(--hidden-dim, --embed-dim, --max-vocab)")
