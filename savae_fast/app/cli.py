"""Command line: ``savae-fast train | eval | plot | info | demo``.

Errors in user input (missing or corrupt data files and checkpoints, invalid
options) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json

from savae_fast.app.devices import resolve_device
from savae_fast.app.errors import CheckpointError, UserError, notice, report_user_error
from savae_fast.app.train import command as train_command
from savae_fast.app.train.config import TrainConfig


def cmd_eval(args) -> int:
    import torch

    from savae_fast.app import evaluate as ev
    from savae_fast.app.train import checkpoint
    from savae_fast.app.train.data import build_model, load_data

    from savae_fast.app.threads import apply_threads
    from savae_fast.app.train.metrics import Progress

    ck = checkpoint.load(args.checkpoint)
    cfg = TrainConfig.from_dict(ck["config"])
    if args.samples:
        cfg.eval_samples = args.samples
    if args.threads is not None:
        cfg.threads = args.threads
    apply_threads(cfg)
    device = resolve_device(args.device)
    data = load_data(cfg)
    trained_on = ck.get("data_fingerprint")
    if trained_on is None:
        notice(f"{args.checkpoint} records no fingerprint of its training data: the data cannot be checked")
    elif trained_on != data.fingerprint():
        if not args.other_data:
            raise CheckpointError(
                f"{args.checkpoint} was trained on other data than its configuration now loads (fingerprint "
                f"{trained_on[:12]}, the data's {data.fingerprint()[:12]}): the files changed; pass --other-data to "
                "evaluate on them anyway")
        notice(f"evaluating {args.checkpoint} on other data than it was trained on (--other-data)")
    model = build_model(cfg, data).to(device)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not match its configuration's model: {args.checkpoint}") from exc
    torch.manual_seed(cfg.seed)
    batches = data.batches(args.split, cfg.batch_size, shuffle=False)
    if args.max_batches is not None:
        batches = batches[: args.max_batches]
    tokens = (data.num_tokens(args.split) if args.max_batches is None else
              sum(int((x[:, 1:] != 0).sum()) for x in batches) if data.kind == "text" else 0)
    examples = sum(x.shape[0] for x in batches)
    # the plan first, then a line after the first batch with the time the rest may take, and one at
    # least every 30 s: a run whose output goes to a file shows where it stands
    notice(f"evaluating {examples} {args.split} examples ({len(batches)} batches"
           f"{'' if args.max_batches is None else ', --max-batches'}) x {cfg.eval_samples} importance samples, "
           f"the bound from {cfg.eval_elbo_samples} samples"
           + (f" after {cfg.svi_steps} refinement steps" if cfg.uses_refinement else "")
           + (" (--samples and --max-batches make it shorter)" if args.max_batches is None else ""))
    bar = Progress(not args.no_progress, len(batches), f"eval {args.split}", first_estimate=True)
    try:
        res = ev.evaluate(model, cfg, batches, device, tokens, progress=bar)
    finally:
        bar.close()
    if data.true_test_nll is not None and args.split == "test":
        res["true_nll"] = data.true_test_nll
    print(json.dumps({"mode": cfg.mode, "dataset": cfg.dataset, "split": args.split, **res}, indent=1))
    mi_note(res)
    return 0


def mi_note(res: dict) -> None:
    """A note where the mutual information estimate is within two standard errors of zero (or below)."""
    mi, se = res.get("mutual_info"), res.get("mutual_info_se")
    if mi is not None and se is not None and mi < 2 * se:
        notice(f"mutual_info {mi:.3f} is within two standard errors ({se:.3f}) of 0 over {res.get('examples')} "
               "examples: the estimate is biased and noisy at this size (the true value is >= 0)")


def cmd_plot(args) -> int:
    from savae_fast.app.plotting import plot_run

    path = plot_run(args.run_dir, args.output)
    print(path)
    return 0


def cmd_info(args) -> int:
    from savae_fast.info import main as info_main

    return info_main(["--json"] if args.json else [])


def cmd_demo(args) -> int:
    from savae_fast.app.demo import run_demo

    run_demo(args.out_dir, quick=args.quick, progress=not args.no_progress, threads=args.threads)
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line too (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="savae-fast", description="Semi-amortized VAEs with fast SVI refinement.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model (mode: autoreg, vae, svi, vae+svi, vae+svi+kl, savae)")
    train_command.add_arguments(p)
    p.set_defaults(func=train_command.run)

    p = sub.add_parser("eval", help="evaluate a checkpoint (NLL bound, KL, PPL, IW NLL, MI, active units)")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--samples", type=positive_int, default=None, help="importance samples per example")
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="evaluate the first this-many batches of the split only (a bounded, quicker estimate)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines (the plan line stays)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=non_negative_int, default=None,
                   help="CPU threads (default: the checkpoint's setting; 0 chooses, see docs/models-and-cli.md, "
                        "'Threads')")
    p.add_argument("--other-data", action="store_true",
                   help="evaluate even where the data files differ from those the checkpoint was trained on")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="draw the training curves of a run directory (PNG)")
    p.add_argument("run_dir")
    p.add_argument("--output", default=None)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("info", help="what is installed and what runs here: versions, the extension's build, "
                                    "backends, precision settings, hvp modes per device")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the main job: vae / svi / savae on synthetic data and a quick digits run")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="CPU threads of the training runs (default 0: chosen per model, see "
                        "docs/models-and-cli.md, 'Threads')")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, status 2) or --help (status 0)
        return exc.code
    try:
        return args.func(args)
    except UserError as exc:
        return report_user_error(f"savae-fast {args.command}", exc)


if __name__ == "__main__":
    raise SystemExit(main())
