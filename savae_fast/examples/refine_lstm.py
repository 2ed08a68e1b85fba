"""End-to-end example: one SA-VAE training step through ``savae_fast.refine`` on an
LSTM decoder, with its gradient error against exact float64 unrolled autograd and
its time against the SA-VAE authors' algorithm (``reference.optim_n2n``).

    python -m savae_fast.examples.refine_lstm [--device cpu|cuda] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import savae_fast as sf
from savae_fast.models import LSTMDecoder
from savae_fast.reference import gaussian_kl, optim_n2n, unrolled

SMALL_LSTM = dict(batch=32, latent=16, vocab=200, embed=32, hidden=64, length=12, steps=20)


def make_setup(cfg: dict, device: str, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dec = LSTMDecoder(cfg["vocab"], cfg["latent"], cfg["embed"], cfg["hidden"], dropout=0.0).to(device, dtype)
    x = torch.randint(1, cfg["vocab"], (cfg["batch"], cfg["length"]), generator=gen).to(device)
    shape = (cfg["batch"], cfg["latent"])
    mu0 = (0.5 * torch.randn(shape, generator=gen)).to(device, dtype)
    logvar0 = (0.3 * torch.randn(shape, generator=gen)).to(device, dtype)
    noise = torch.randn((cfg["steps"], *shape), generator=gen).to(device, dtype)
    final_eps = torch.randn(shape, generator=gen).to(device, dtype)
    return dec, x, mu0, logvar0, noise, final_eps


def training_step(method, dec, x, mu0, logvar0, noise, final_eps, **kw):
    """Refine, evaluate the negative ELBO at lambda_K, backpropagate; returns the gradients."""
    mu0 = mu0.detach().clone().requires_grad_(True)
    logvar0 = logvar0.detach().clone().requires_grad_(True)
    params = list(dec.parameters())
    mu_k, logvar_k = method(mu0, logvar0, lambda z: dec.nll(x, z), params, steps=noise.shape[0], noise=noise, **kw)
    z = mu_k + torch.exp(0.5 * logvar_k) * final_eps
    loss = (dec.nll(x, z) + gaussian_kl(mu_k, logvar_k)).mean()
    return torch.autograd.grad(loss, [mu0, logvar0, *params])


def rel_err(grads, ref) -> float:
    num = sum((a.double() - b.double()).pow(2).sum() for a, b in zip(grads, ref)) ** 0.5
    den = sum(b.double().pow(2).sum() for b in ref) ** 0.5
    return float(num / den)


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
    dec, x, mu0, logvar0, noise, final_eps = make_setup(cfg, args.device)
    setup = (dec, x, mu0, logvar0, noise, final_eps)

    dec64 = copy.deepcopy(dec).double()
    exact = training_step(unrolled, dec64, x, mu0.double(), logvar0.double(), noise.double(), final_eps.double())
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
        err = rel_err(training_step(method, *setup), exact)
        times[name] = _time(lambda: training_step(method, *setup), args.repeats, args.device)
        print(f"{name:<28} {err:>16.2e} {times[name] * 1e3:>10.1f}ms")
    speedup = times["authors' optim_n2n"] / times["refine fd_forward"]
    print(f"speed-up of refine fd_forward over optim_n2n: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
