"""Command line: ``savae-fast train | eval | plot | demo``.

Errors in user input (missing or corrupt data files and checkpoints, invalid
options) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from savae_fast.data.text import DataError
from savae_fast.train.checkpoint import CheckpointError
from savae_fast.train.config import ConfigError, TrainConfig

USER_ERRORS = (DataError, ConfigError, CheckpointError)


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One --option per TrainConfig field (defaults from the dataclass)."""
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                           help=f"comma-separated (default {','.join(map(str, default))})")
        elif isinstance(default, dict):
            p.add_argument(flag, type=json.loads, default=None, help="JSON object")
        elif f.name in ("data_path", "max_length", "max_batches_per_epoch"):
            p.add_argument(flag, type=(str if f.name == "data_path" else int), default=None)
        else:
            p.add_argument(flag, type=type(default), default=None, help=f"(default {default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = {}
    if args.config:
        try:
            with open(args.config) as f:
                base = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read configuration file {args.config}: {exc}") from exc
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = value
    try:
        return TrainConfig.from_dict(base)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def cmd_train(args) -> int:
    from savae_fast.train.loop import Trainer

    cfg = config_from_args(args)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress)
    try:
        trainer.fit()
        res = trainer.test()
        if trainer.d.is_main:
            print(json.dumps({"mode": cfg.mode, "dataset": cfg.dataset, **res}, indent=1))
    finally:
        trainer.close()
    return 0


def cmd_eval(args) -> int:
    import torch

    from savae_fast import evaluate as ev
    from savae_fast.train import checkpoint
    from savae_fast.train.data import build_model, load_data

    ck = checkpoint.load(args.checkpoint)
    cfg = TrainConfig.from_dict(ck["config"])
    if args.samples:
        cfg.eval_samples = args.samples
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_data(cfg)
    model = build_model(cfg, data).to(device)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not match its configuration's model: {args.checkpoint}") from exc
    torch.manual_seed(cfg.seed)
    res = ev.evaluate(model, cfg, data.batches(args.split, cfg.batch_size, shuffle=False), device,
                      data.num_tokens(args.split))
    if data.true_test_nll is not None and args.split == "test":
        res["true_nll"] = data.true_test_nll
    print(json.dumps({"mode": cfg.mode, "dataset": cfg.dataset, "split": args.split, **res}, indent=1))
    return 0


def cmd_plot(args) -> int:
    from savae_fast.plotting import plot_run

    path = plot_run(args.run_dir, args.output)
    print(path)
    return 0


def cmd_demo(args) -> int:
    from savae_fast.demo import run_demo

    run_demo(args.out_dir, quick=args.quick, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="savae-fast", description="Semi-amortized VAEs with fast SVI refinement.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model (mode: autoreg, vae, svi, vae+svi, vae+svi+kl, savae)")
    p.add_argument("--config", help="JSON file with TrainConfig fields (options below override it)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint (NLL bound, KL, PPL, IW NLL, MI, active units)")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--samples", type=int, default=None, help="importance samples per example")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="draw the training curves of a run directory (PNG)")
    p.add_argument("run_dir")
    p.add_argument("--output", default=None)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="the main job: vae / svi / savae on synthetic data and a quick digits run")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"savae-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
