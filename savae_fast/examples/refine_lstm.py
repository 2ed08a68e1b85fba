"""End-to-end example: one SA-VAE training step through ``savae_fast.refine`` on an
LSTM decoder, with its gradient error against exact float64 unrolled autograd and
its time against the SA-VAE authors' algorithm (``reference.optim_n2n``).

    python -m savae_fast.examples.refine_lstm [--device cpu|cuda] [--repeats N]
"""

from __future__ import annotations

import argparse
import time

import torch

import savae_fast as sf
from savae_fast.models import LSTMDecoder
from savae_fast.reference import optim_n2n, unrolled
from savae_fast.testing import Problem, relative_error, training_step

SMALL_LSTM = dict(batch=32, latent=16, vocab=200, embed=32, hidden=64, length=12, steps=20)


def make_setup(cfg: dict, device: str, dtype=torch.float32, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dec = LSTMDecoder(cfg["vocab"], cfg["latent"], cfg["embed"], cfg["hidden"], dropout=0.0).to(device, dtype)
    x = torch.randint(1, cfg["vocab"], (cfg["batch"], cfg["length"]), generator=gen).to(device)
    shape = (cfg["batch"], cfg["latent"])
    mu0 = (0.5 * torch.randn(shape, generator=gen)).to(device, dtype)
    logvar0 = (0.3 * torch.randn(shape, generator=gen)).to(device, dtype)
    noise = torch.randn((cfg["steps"], *shape), generator=gen).to(device, dtype)
    final_eps = torch.randn(shape, generator=gen).to(device, dtype)
    return Problem(dec, x, mu0, logvar0, noise, final_eps)


def _time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = SMALL_LSTM
    problem = make_setup(cfg, args.device)
    exact = training_step(unrolled, problem.to(torch.float64))
    print(f"SA-VAE training step, LSTM decoder {cfg}, float32, device {args.device}")
    print(f"{'method':<28} {'grad rel. error':>16} {'time / step':>12}")
    methods = [
        ("refine fd_forward", lambda *a, **k: sf.refine(*a, hvp="fd_forward", **k)),
        ("refine fd_central", lambda *a, **k: sf.refine(*a, hvp="fd_central", **k)),
        ("refine exact", lambda *a, **k: sf.refine(*a, hvp="exact", **k)),
        ("authors' optim_n2n", optim_n2n),
        ("unrolled autograd", unrolled),
    ]
    times = {}
    for name, method in methods:
        err = relative_error(training_step(method, problem), exact)
        times[name] = _time(lambda: training_step(method, problem), args.repeats, args.device)
        print(f"{name:<28} {err:>16.2e} {times[name] * 1e3:>10.1f}ms")
    speedup = times["authors' optim_n2n"] / times["refine fd_forward"]
    print(f"speed-up of refine fd_forward over optim_n2n: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
