"""Training configuration (one dataclass, JSON round-trip, validated)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from savae_fast.app.errors import ConfigError
from savae_fast.refine.validation import DEFAULTS

MODES = ("autoreg", "vae", "svi", "vae+svi", "vae+svi+kl", "savae")
DATASETS = ("synthetic", "text", "ptb", "digits", "omniglot", "mnist")


@dataclass
class TrainConfig:
    # data
    dataset: str = "synthetic"
    data_path: str | None = None  # text: directory with train.txt/valid.txt/test.txt; omniglot/mnist: file or dir
    max_vocab: int = 20000
    max_length: int | None = None
    synthetic: dict = field(default_factory=dict)  # overrides of savae_fast.app.data.synthetic.SyntheticSpec
    # model (text: latent/embed/hidden/dropout; images: latent/enc_channels/dec_channels/kernels)
    mode: str = "savae"
    latent_dim: int = 32
    embed_dim: int = 512
    hidden_dim: int = 1024
    dropout: float = 0.5
    enc_channels: int = 64
    dec_channels: int = 32
    kernels: tuple = (9, 9, 9, 7, 7, 7, 5, 5, 5, 3, 3, 3)
    # outer optimisation
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "sgd"  # "sgd" (text, the paper's decay schedule) | "adam" (images)
    lr: float = 1.0
    decay_start_epoch: int = 15  # sgd: halve lr when validation stops improving after this epoch
    min_lr: float = 0.03  # sgd: stop when lr falls below
    max_grad_norm: float = 5.0  # global clip of the outer gradient
    warmup_epochs: int = 10  # KL weight beta from warmup_start to 1
    warmup_start: float = 0.1
    # inner refinement (svi modes)
    svi_steps: int = DEFAULTS.steps
    svi_lr: float = DEFAULTS.lr
    svi_momentum: float = DEFAULTS.momentum
    svi_max_grad_norm: float = DEFAULTS.max_grad_norm
    hvp: str = DEFAULTS.hvp
    backend: str = "auto"
    # evaluation
    eval_samples: int = 500  # importance samples per example for the IW NLL estimate
    eval_elbo_samples: int = 10  # samples of the single-sample bound averaged per example
    # bookkeeping
    seed: int = 3435
    device: str = "auto"
    out_dir: str = "runs/default"
    log_every: int = 50
    max_batches_per_epoch: int | None = None  # for quick runs

    def validate(self) -> "TrainConfig":
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset in ("text", "omniglot", "mnist") and not self.data_path:
            raise ConfigError(f"dataset {self.dataset!r} needs --data-path")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "svi_steps", "eval_samples", "eval_elbo_samples", "log_every"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < (0 if name in (
                    "svi_steps", "epochs") else 1):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.mode != "autoreg" and self.latent_dim < 1:
            raise ConfigError(f"mode {self.mode!r} needs latent_dim >= 1")
        for name in ("lr", "svi_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        return self


    def refine_options(self, beta: float) -> dict:
        """Keyword arguments of savae_fast.refine for this configuration's inner optimiser."""
        return dict(steps=self.svi_steps, lr=self.svi_lr, momentum=self.svi_momentum,
                    max_grad_norm=self.svi_max_grad_norm, kl_weight=beta, hvp=self.hvp, backend=self.backend)
    @property
    def uses_refinement(self) -> bool:
        return self.mode in ("svi", "vae+svi", "vae+svi+kl", "savae")

    @property
    def is_image(self) -> bool:
        return self.dataset in ("digits", "omniglot", "mnist")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kernels"] = list(self.kernels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown configuration keys: {sorted(unknown)}")
        d = dict(d)
        if "kernels" in d:
            d["kernels"] = tuple(d["kernels"])
        return cls(**d).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)
