"""Does a one-sided second-order stencil pay? ``python -m benchmarks.one_sided_stencil [CONFIG ...]``

fd_forward's quotient [g(z + r u) - g(z)] / r is first order in r. With stacking, the second-order
one-sided stencil Hzz u ~ [4 g(z + r u) - g(z + 2 r u) - 3 g(z)] / (2 r) costs one decoder call
of 2B rows per reverse step, g(z) and the base-point parameter gradients coming from the
forward as in fd_forward. It is measured here against fd_forward and stacked fd_central (the
same two points per reverse step, no parameter-gradient sum in the forward): accuracy against
float64 unrolled autograd over 5 draws, and the time of a training step (median of 10) next to
the decoder floor. Not a mode of refine: it costs what stacked fd_central costs and is less
accurate (benchmarks/results/amd-epyc_2026-12-02_one_sided_stencil.md).
"""

from __future__ import annotations

import sys
import time

import torch

import savae_fast as sf
from benchmarks.configs import CONFIGS, make_problem
from benchmarks.refinement import decoder_floor
from savae_fast.reference import unrolled
from savae_fast.refine.hvp import HVP_METHODS, DecoderTerms, ForwardDifference
from savae_fast.testing import relative_error, training_step


class OneSidedSecondOrder(ForwardDifference):
    """fd_forward's normalised adjoint and fixed step, the stencil (-3, 4, -1) / (2 r)."""

    name = "one_sided_2nd_order"
    points_per_step = 2
    default_fd_eps = {torch.float32: 3e-3, torch.float64: 1e-5}

    def begin(self, run, lbar_mu, lbar_logvar):
        out = super().begin(run, lbar_mu, lbar_logvar)  # (negates the forward's sum of g_theta(z_k))
        torch._foreach_mul_(run.tape.param_grad_sum, 3.0)
        run.theta_bar = run.tape.param_grad_sum  # the points' parameter terms are added into it
        return out

    def decoder_terms(self, run, k, z_eval, u, row_weight, replay):
        z1 = z_eval[0]
        t = run.evaluate_points((z1, z1 + run.cfg.fd_eps * u), (4.0, -1.0), 1.0, torch.ones_like(row_weight), replay)
        hvp_a = 4 * t[0] - t[1]
        return DecoderTerms(hvp_a, 3 * run.tape.grad_z[k], 1.0 / (2 * run.cfg.fd_eps), (hvp_a,))

    def finish(self, run, lbar_mu, lbar_logvar):
        coef = run.out_scale * (-run.cfg.scale / (2 * run.cfg.fd_eps))
        for t in run.tape.param_grad_sum:
            t.mul_(coef.to(t.dtype))
        return lbar_mu * run.out_scale, lbar_logvar * run.out_scale, run.tape.param_grad_sum


def _method(hvp):
    return lambda *a, **k: sf.refine(*a, hvp=hvp, stack_points=True, **k)


def measure(config: str, seeds: int = 5, rounds: int = 10) -> None:
    HVP_METHODS[OneSidedSecondOrder.name] = OneSidedSecondOrder()
    try:
        names = ("fd_forward", OneSidedSecondOrder.name, "fd_central")
        errors = {m: [] for m in names}
        for seed in range(seeds):
            p = make_problem(CONFIGS[config], "cpu", seed=seed)
            ref = training_step(unrolled, p.to(torch.float64))
            for m in names:
                errors[m].append(relative_error(training_step(_method(m), p), ref))
        p = make_problem(CONFIGS[config], "cpu")
        cands = {"decoder floor": lambda: decoder_floor(p), **{m: (lambda m=m: training_step(_method(m), p))
                                                               for m in names}}
        times = {m: [] for m in cands}
        for _ in range(rounds + 2):  # interleaved; the first two rounds warm up
            for m, f in cands.items():
                start = time.perf_counter()
                f()
                times[m].append(time.perf_counter() - start)
        for m, ts in times.items():
            ts = sorted(ts[2:])
            err = sorted(errors.get(m, [float("nan")]))
            accuracy = "" if m not in errors else f", error median {err[len(err) // 2]:.1e}, worst {err[-1]:.1e}"
            print(f"{config} {m} (stacked): {1e3 * ts[len(ts) // 2]:.1f} ms per step{accuracy}")
    finally:
        HVP_METHODS.pop(OneSidedSecondOrder.name, None)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["small_lstm", "large_weight_lstm"]:
        measure(name)
