"""Training configuration (one dataclass, JSON round-trip, validated)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from savae_fast.app.errors import ConfigError
from savae_fast.refine.validation import DEFAULTS, real


def _option(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _integer(cfg, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{_option(name)} must be an integer >= {low}, got {value!r}")


def _real(cfg, name: str, **bounds) -> None:
    """refine's check of a finite real number within bounds, as a ConfigError naming the option."""
    try:
        real(name, getattr(cfg, name), who="configuration", **bounds)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{exc} (--{name.replace('_', '-')})") from None


MODES = ("autoreg", "vae", "svi", "vae+svi", "vae+svi+kl", "savae")
# --hvp optim_n2n: the SA-VAE authors' published algorithm (savae_fast.reference.optim_n2n: a
# lambda-space one-sided difference with eps 1e-5 and their clipping), for comparison only
OPTIM_N2N = "optim_n2n"
DATASETS = ("synthetic", "text", "ptb", "digits", "omniglot", "mnist")
# Model sizes (--size): "paper" is the SA-VAE paper's (text: word 512, hidden 1024; images: 64-channel
# encoder, 12-layer 32-channel PixelCNN), a GPU's size; "small" trains in minutes on a few CPU cores.
# "auto": paper where a GPU is found, else small. A size option given explicitly wins.
SIZES = {
    "small": dict(embed_dim=64, hidden_dim=128, enc_channels=32, dec_channels=16, kernels=(7, 7, 5, 5, 3, 3)),
    "paper": dict(embed_dim=512, hidden_dim=1024, enc_channels=64, dec_channels=32,
                  kernels=(9, 9, 9, 7, 7, 7, 5, 5, 5, 3, 3, 3)),
}


@dataclass
class TrainConfig:
    # data
    dataset: str = "synthetic"
    data_path: str | None = None  # text: directory with train.txt/valid.txt/test.txt; omniglot/mnist: file or dir
    max_vocab: int = 20000
    max_length: int | None = 500  # text: longer sentences are left out (a note says how many); None: no limit
    synthetic: dict = field(default_factory=dict)  # overrides of savae_fast.app.data.synthetic.SyntheticSpec
    # model (text: latent/embed/hidden/dropout; images: latent/enc_channels/dec_channels/kernels)
    mode: str = "savae"
    size: str = "auto"  # the sizes below left None: "small", "paper" or "auto" (paper with a GPU) (SIZES)
    latent_dim: int = 32
    embed_dim: int | None = None
    hidden_dim: int | None = None
    dropout: float = 0.5
    enc_channels: int | None = None
    dec_channels: int | None = None
    kernels: tuple | None = None
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
    stack_points: int = 0  # refine's stack_points: the most difference points per decoder call (0: one)
    backward_clip: float | None = DEFAULTS.backward_clip  # refine's stabiliser of its backward (None: exact)
    backward_clip_scope: str = DEFAULTS.backward_clip_scope
    backward_clip_mode: str = DEFAULTS.backward_clip_mode
    backward_steps: int | None = None  # refine's truncation: the last inner steps differentiated (None: all)
    backend: str = "auto"
    # evaluation
    eval_samples: int = 500  # importance samples per example for the IW NLL estimate
    eval_elbo_samples: int = 10  # samples of the single-sample bound averaged per example
    # bookkeeping
    seed: int = 3435
    device: str = "auto"
    threads: int = 0  # CPU intra-op threads (torch.set_num_threads); 0: chosen for the model (app/threads.py)
    out_dir: str = "runs/default"
    log_every: int = 50
    max_batches_per_epoch: int | None = None  # for quick runs
    max_eval_batches: int | None = None  # validation and test evaluation: at most this many batches (quick runs)

    def __post_init__(self) -> None:
        if self.size == "auto":
            import torch

            self.size = "paper" if torch.cuda.is_available() else "small"
        if self.size in SIZES:  # (another value is refused by validate)
            for name, value in SIZES[self.size].items():
                if getattr(self, name) is None:
                    setattr(self, name, value)

    def validate(self) -> "TrainConfig":
        """Every field checked before anything runs; errors name the field and its option."""
        from savae_fast.app.data.synthetic import check_overrides
        from savae_fast.app.devices import parse_device
        from savae_fast.ops.constants import BACKENDS
        from savae_fast.refine.hvp import HVP_METHODS

        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.size not in SIZES:
            raise ConfigError(f"size (--size) must be one of {('auto', *SIZES)}, got {self.size!r}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset in ("text", "omniglot", "mnist") and not self.data_path:
            raise ConfigError(f"dataset {self.dataset!r} needs --data-path")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.hvp not in HVP_METHODS and self.hvp != OPTIM_N2N:
            raise ConfigError(f"hvp must be one of {(*HVP_METHODS, OPTIM_N2N)}, got {self.hvp!r}")
        if self.hvp == OPTIM_N2N and self.mode != "savae":
            raise ConfigError(f"hvp (--hvp) {OPTIM_N2N!r} (the authors' algorithm) applies to --mode savae only, got "
                              f"mode {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("batch_size", "embed_dim", "hidden_dim", "enc_channels", "dec_channels", "eval_samples",
                     "eval_elbo_samples", "log_every", "max_vocab"):
            _integer(self, name, low=1)
        for name in ("epochs", "svi_steps", "decay_start_epoch", "warmup_epochs", "seed", "threads", "stack_points"):
            _integer(self, name, low=0)
        for name in ("max_length", "max_batches_per_epoch", "max_eval_batches"):
            if getattr(self, name) is not None:
                _integer(self, name, low=1)
        _integer(self, "latent_dim", low=0 if self.mode == "autoreg" else 1)
        if not isinstance(self.kernels, tuple) or not self.kernels or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.kernels):
            raise ConfigError(f"kernels (--kernels) must be a non-empty list of positive integers, got {self.kernels!r}")
        _real(self, "lr", low=0.0, low_open=True)
        _real(self, "min_lr", low=0.0)
        _real(self, "max_grad_norm", low=0.0)
        _real(self, "warmup_start", low=0.0, high=1.0)
        _real(self, "dropout", low=0.0, high=1.0, high_open=True)
        _real(self, "svi_lr", low=0.0, low_open=True)
        _real(self, "svi_momentum", low=0.0, high=1.0, high_open=True)
        _real(self, "svi_max_grad_norm")
        if self.backward_clip is not None:
            _real(self, "backward_clip", low=0.0, low_open=True)
        if self.backward_clip_scope not in ("example", "batch"):
            raise ConfigError(f"backward_clip_scope (--backward-clip-scope) must be 'example' or 'batch', got "
                              f"{self.backward_clip_scope!r}")
        if self.backward_clip_mode not in ("stop", "scale"):
            raise ConfigError(f"backward_clip_mode (--backward-clip-mode) must be 'stop' or 'scale', got "
                              f"{self.backward_clip_mode!r}")
        if self.backward_steps is not None:
            _integer(self, "backward_steps", low=0)
        if self.device != "auto":
            parse_device(self.device)
        if not isinstance(self.synthetic, dict):
            raise ConfigError(f"synthetic (--synthetic) must be a JSON object, got {self.synthetic!r}")
        try:
            check_overrides(self.synthetic)
        except ValueError as exc:
            raise ConfigError(f"synthetic (--synthetic): {exc}") from exc
        return self

    def optimiser_options(self, beta: float) -> dict:
        """The inner optimiser's options alone (for the reference implementations)."""
        return dict(steps=self.svi_steps, lr=self.svi_lr, momentum=self.svi_momentum,
                    max_grad_norm=self.svi_max_grad_norm, kl_weight=beta)

    def refine_options(self, beta: float) -> dict:
        """Keyword arguments of savae_fast.refine for this configuration's inner optimiser."""
        # (--hvp optim_n2n trains with the authors' backward; evaluation refines with refine's forward,
        # which is the same optimiser)
        return dict(self.optimiser_options(beta), hvp=DEFAULTS.hvp if self.hvp == OPTIM_N2N else self.hvp,
                    backend=self.backend, stack_points=self.stack_points, backward_clip=self.backward_clip,
                    backward_clip_scope=self.backward_clip_scope, backward_clip_mode=self.backward_clip_mode,
                    backward_steps=self.backward_steps)

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
