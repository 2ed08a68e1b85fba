"""refine() against the exact float64 unrolled reference."""

import os

import pytest
import torch

import savae_fast as sf
from savae_fast.testing import make_problem, max_rel_err, refine_grads, reference_grads, rel_err, step0_grad_norm

BACKENDS = ["cpp", "torch"] if sf.ops.available("cpu") else ["torch"]

# (hvp, dtype) -> bound on the relative error of every gradient vs float64 unrolled autograd.
TOLERANCE = {
    ("fd_central", torch.float64): 1e-7,
    ("fd_central", torch.float32): 1e-4,
    ("fd_forward", torch.float32): 1e-3,
    ("fd_forward", torch.float64): 1e-6,
    ("fd_richardson", torch.float64): 1e-10,  # fourth order: truncation ~1e-13 at its step
    ("fd_richardson", torch.float32): 1e-4,
    ("fd_adaptive", torch.float64): 1e-10,  # fd_richardson's passes, steps halved where too curved
    ("fd_adaptive", torch.float32): 1e-4,
    ("exact", torch.float64): 1e-11,  # float rounding
    ("exact", torch.float32): 2e-5,  # float32 rounding through K steps
    ("jvp", torch.float64): 1e-11,  # forward-over-reverse: exact as double backward
    ("jvp", torch.float32): 2e-5,
}

# The PixelCNN's output-layer bias gradient is a sum over B x H x W pixel terms that
# can cancel to a few percent of the other gradients; in float32 its relative error then
# measures that cancellation. Largest errors seen over random draws (3000 for
# fd_central, 800 for the others): fd_central 3.4e-4, fd_forward 2.1e-3, exact 2.8e-5.
# MLP and LSTM decoders keep the bounds above (largest seen over 400-600 draws: 4.4e-6,
# 9.6e-5, 5.0e-7).
PIXELCNN_FLOAT32_TOLERANCE = {"fd_central": 1.5e-3, "fd_richardson": 1.5e-3, "fd_adaptive": 1.5e-3, "fd_forward": 1e-2,
                              "exact": 1.5e-4, "jvp": 1.5e-4}


def _clip_setting(p, clip):
    """max_grad_norm that leaves clipping off, or makes it active in the early steps."""
    return 0.0 if clip == "off" else 0.5 * step0_grad_norm(p)


def _gradient_cases():
    """(kind, hvp, dtype) of the grid below; the float64 PixelCNN cases (the grid's slowest,
    float64 accuracy is covered by the MLP and LSTM) are left to the full suite."""
    cases = []
    for kind in ("mlp", "lstm", "pixelcnn"):
        for hvp in ("fd_central", "fd_forward", "fd_richardson", "fd_adaptive", "exact", "jvp"):
            for dtype in (torch.float64, torch.float32):
                marks = pytest.mark.slow if (kind == "pixelcnn" and dtype == torch.float64) else ()
                cases.append(pytest.param(kind, hvp, dtype, marks=marks,
                                          id=f"{hvp}-{str(dtype).removeprefix('torch.')}-{kind}"))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", ["off", "on"])
@pytest.mark.parametrize("kind,hvp,dtype", _gradient_cases())
def test_gradients_match_unrolled(kind, clip, hvp, dtype, backend, seed):
    p = make_problem(kind, dtype, batch=32, latent=8, steps=10)
    max_norm = _clip_setting(p, clip)
    (mu_k, lv_k), grads = refine_grads(p, hvp=hvp, max_grad_norm=max_norm, backend=backend)
    (mu_r, lv_r), ref = reference_grads(p, max_grad_norm=max_norm)

    fwd_tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert rel_err(mu_k, mu_r) < fwd_tol and rel_err(lv_k, lv_r) < fwd_tol
    worst, errs = max_rel_err(grads, ref)
    tol = TOLERANCE[(hvp, dtype)]
    if kind == "pixelcnn" and dtype == torch.float32:
        tol = PIXELCNN_FLOAT32_TOLERANCE[hvp]
    assert worst <= tol, f"seed={seed} errors (mu0, logvar0, params...) = {errs}"


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_clipping_setting_is_active(kind):
    """The 'on' setting of the tests above really clips (the forward differs from unclipped)."""
    p = make_problem(kind, torch.float64, batch=32, latent=8, steps=10)
    clipped = sf.refine(p.mu0, p.logvar0, p.nll_fn, steps=10, noise=p.noise, max_grad_norm=_clip_setting(p, "on"))
    free = sf.refine(p.mu0, p.logvar0, p.nll_fn, steps=10, noise=p.noise, max_grad_norm=0.0)
    assert rel_err(clipped[0], free[0]) > 1e-3


@pytest.mark.parametrize("hvp,tol", [("fd_central", 1e-7), ("exact", 1e-11)])
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_refinement_path_only(kind, hvp, tol, seed):
    """Objective that depends on theta only through the refinement (no direct term)."""
    p = make_problem(kind, torch.float64, batch=16, latent=6, steps=8)
    max_norm = 0.5 * step0_grad_norm(p)
    _, grads = refine_grads(p, objective="linear", hvp=hvp, max_grad_norm=max_norm)
    _, ref = reference_grads(p, objective="linear", max_grad_norm=max_norm)
    worst, errs = max_rel_err(grads, ref)
    assert worst <= tol, f"seed={seed} errors = {errs}"


@pytest.mark.parametrize("hvp", ["fd_central", "fd_forward", "exact"])
def test_options_sum_reduction_lr_pair_kl_weight(hvp, seed):
    p = make_problem("lstm", torch.float64, batch=8, latent=5, steps=6)
    kw = dict(reduction="sum", lr=(0.05, 0.02), momentum=0.8, kl_weight=0.3, max_grad_norm=2.0)
    _, grads = refine_grads(p, hvp=hvp, **kw)
    _, ref = reference_grads(p, **kw)
    worst, errs = max_rel_err(grads, ref)
    assert worst <= {"fd_central": 1e-7, "fd_forward": 1e-6, "exact": 1e-11}[hvp], f"seed={seed} {errs}"


@pytest.mark.parametrize("batch,latent", [(1, 1), (1, 7), (5, 1), (3, 33)])
def test_odd_shapes(batch, latent):
    p = make_problem("mlp", torch.float64, batch=batch, latent=latent, steps=4)
    _, grads = refine_grads(p, hvp="fd_central")
    _, ref = reference_grads(p)
    worst, errs = max_rel_err(grads, ref)
    assert worst <= 1e-7, errs


def test_steps_zero_returns_inputs():
    mu = torch.randn(3, 2, requires_grad=True)
    lv = torch.randn(3, 2, requires_grad=True)
    out = sf.refine(mu, lv, lambda z: z.sum(1), steps=0)
    assert out[0] is mu and out[1] is lv


def test_encoder_free_svi_mode_params_only():
    """mu0/logvar0 without grad (the 'svi' row): decoder still gets the refinement gradient."""
    p = make_problem("lstm", torch.float64, batch=8, latent=4, steps=5)
    mu_k, lv_k = sf.refine(p.mu0, p.logvar0, p.nll_fn, p.params, steps=5, noise=p.noise, hvp="fd_central")
    grads = torch.autograd.grad(p.elbo_loss(mu_k, lv_k), p.params)
    _, ref = reference_grads(p)
    worst, errs = max_rel_err(grads, ref[2:])
    assert worst <= 1e-7, errs


def test_param_without_grad_gets_none_and_duplicates_counted_once():
    p = make_problem("mlp", torch.float64, batch=6, latent=3, steps=4)
    frozen = p.decoder.l1.bias
    frozen.requires_grad_(False)
    params = [p.decoder.l1.weight, frozen, p.decoder.l1.weight, *p.decoder.l2.parameters()]
    mu0 = p.mu0.clone().requires_grad_(True)
    mu_k, lv_k = sf.refine(mu0, p.logvar0, p.nll_fn, params, steps=4, noise=p.noise, hvp="fd_central")
    p.elbo_loss(mu_k, lv_k).backward()
    assert frozen.grad is None
    frozen.requires_grad_(True)
    # .grad of l1.weight (listed twice) equals the reference gradient, not twice it
    _, ref = reference_grads(p)
    assert rel_err(p.decoder.l1.weight.grad, ref[2]) < 1e-7


def test_no_grad_mode_runs_forward_only():
    p = make_problem("mlp", torch.float32, batch=4, latent=3, steps=5)
    with torch.no_grad():
        mu_k, lv_k = sf.refine(p.mu0, p.logvar0, p.nll_fn, p.params, steps=5, noise=p.noise)
    ref_mu, ref_lv = sf.refine(p.mu0, p.logvar0, p.nll_fn, p.params, steps=5, noise=p.noise)
    assert not mu_k.requires_grad
    assert torch.equal(mu_k, ref_mu) and torch.equal(lv_k, ref_lv)


def test_second_backward_raises_clear_error():
    p = make_problem("mlp", torch.float64, batch=4, latent=3, steps=3)
    mu0 = p.mu0.clone().requires_grad_(True)
    mu_k, lv_k = sf.refine(mu0, p.logvar0, p.nll_fn, p.params, steps=3, noise=p.noise)
    loss = (mu_k.sum() + lv_k.sum())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_exact_mode_needs_twice_differentiable_decoder():
    class OnceDifferentiableSquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return z * z

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            return 2 * z * g

    mu0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    lv0 = torch.zeros(4, 3, dtype=torch.float64)
    mu_k, lv_k = sf.refine(mu0, lv0, lambda z: OnceDifferentiableSquare.apply(z).sum(1), steps=2, hvp="exact")
    with pytest.raises(RuntimeError, match="twice differentiable"):
        mu_k.sum().backward()
    # the finite-difference modes work with it
    mu_k, _ = sf.refine(mu0, lv0, lambda z: OnceDifferentiableSquare.apply(z).sum(1), steps=2, hvp="fd_central")
    mu_k.sum().backward()
    assert torch.isfinite(mu0.grad).all()


def test_zero_incoming_gradient_gives_zero():
    p = make_problem("mlp", torch.float32, batch=4, latent=3, steps=3)
    mu0 = p.mu0.clone().requires_grad_(True)
    mu_k, _ = sf.refine(mu0, p.logvar0, p.nll_fn, p.params, steps=3, noise=p.noise, hvp="fd_forward")
    grads = torch.autograd.grad((mu_k * 0).sum(), [mu0, *p.params])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_decoder_gradients_equal_autograd_grad_on_every_path(monkeypatch):
    """refine's gradient call (the autograd engine directly for plain tensors) returns what
    torch.autograd.grad returns: for plain tensors and parameters, for a Tensor subclass
    (public path), and after the engine's signature ever fails (public path from then on)."""
    from savae_fast.refine import decoder

    class Sub(torch.Tensor):
        pass

    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def case(z):
        return (z @ w).sin().sum()

    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(case(z), (z, w, unused), allow_unused=True)

    def check(z):
        got = decoder.gradients(case(z), (z, w, unused))
        assert got[2] is None and all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))

    check(z)
    check(z.detach().as_subclass(Sub).requires_grad_(True))

    class OldEngine:
        def run_backward(self, *args):
            raise TypeError("run_backward() takes 6 positional arguments")

    monkeypatch.setattr(decoder, "_ENGINE", OldEngine())
    monkeypatch.setattr(decoder, "_engine_usable", True)
    check(z)
    assert decoder._engine_usable is False


FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "fixtures")


# (fixture, bound on fd_central, bound on fd_forward); benchmarks/trained_decoder.py makes them.
# Synthetic (the demo's SA-VAE text row after 8 epochs), 750 draws: worst 5.9e-5 and 3.7e-3
# (99th percentiles 3.5e-5 and 1.6e-3). PTB (a short SA-VAE run on Penn Treebank), 20 draws:
# worst 5.7e-7 and 2.0e-5.
@pytest.mark.parametrize("fixture,central_bound,forward_bound", [("trained_synthetic_savae.pt", 1e-4, 1e-2),
                                                                  ("trained_ptb_savae.pt", 1e-4, 1e-3)])
def test_float32_accuracy_on_trained_decoders(fixture, central_bound, forward_bound, seed):
    """Decoders trained by this package (larger, structured weights), fresh test sentences
    and draws each run, B 8, K 10: fd_central and fd_forward against float64 unrolled."""
    from benchmarks.trained_decoder import load
    from savae_fast.testing import Problem, reference_grads, refine_grads, relative_error

    path = os.path.join(FIXTURES, fixture)
    if not os.path.exists(path):
        pytest.skip("benchmarks/fixtures not in this tree")
    decoder, sentences = load(path=path)
    batch, steps, latent = 8, 10, decoder.latent_dim
    x = sentences[torch.randperm(len(sentences))[:batch]]
    p = Problem(decoder, x, 0.5 * torch.randn(batch, latent), 0.3 * torch.randn(batch, latent),
                torch.randn(steps, batch, latent), torch.randn(batch, latent))
    _, exact = reference_grads(p)
    for hvp, bound in (("fd_central", central_bound), ("fd_richardson", central_bound), ("fd_adaptive", central_bound),
                       ("fd_forward", forward_bound)):
        err = relative_error(refine_grads(p, hvp=hvp)[1], exact)
        assert err <= bound, f"{hvp}: {err:.2e} (seed={seed})"


def _large_weight_problem():
    """The authors' text decoder (V 50, E 16, H 32) with weights uniform in [-0.5, 0.5] and
    30-token sentences, B 8, K 10, latent 8: strongly curved gradients (the accuracy
    benchmark's large_weight_lstm), a fresh draw each call."""
    from benchmarks.configs import CONFIGS, make_problem

    return make_problem(CONFIGS["large_weight_lstm"], "cpu", seed=int(torch.randint(2**31, ())))


def _mode(hvp, **options):
    options.setdefault("backward_clip", None)  # the exact gradient (its accuracy is what these tests measure)
    return lambda *a, **kw: sf.refine(*a, hvp=hvp, **options, **kw)


def _float32_rounding_floor(p, exact, nudges: int = 6) -> float:
    """Float32 unrolled autograd's error against ``exact``, the largest over the input as given
    and ``nudges`` copies with mu0 moved by one float32 ulp up or down per element at random.
    On an ill-conditioned decoder that error is a spread, not a number: one ulp of mu0 moved
    it by up to 7x on the large-weight decoder (80 draws), so one sample can sit far below
    what float32 arithmetic guarantees for inputs known to float32 precision."""
    import dataclasses

    from savae_fast.reference import unrolled
    from savae_fast.testing import relative_error, training_step

    up, down = torch.full_like(p.mu0, float("inf")), torch.full_like(p.mu0, -float("inf"))
    errors = [relative_error(training_step(unrolled, p), exact)]
    for _ in range(nudges):
        mu0 = torch.where(torch.rand(p.mu0.shape) < 0.5, torch.nextafter(p.mu0, up), torch.nextafter(p.mu0, down))
        errors.append(relative_error(training_step(unrolled, dataclasses.replace(p, mu0=mu0)), exact))
    return max(errors)


@pytest.mark.parametrize("hvp", ["jvp", "exact"])
def test_exact_modes_on_a_large_weight_decoder_are_at_float32_rounding(hvp, seed):
    """On the large-weight decoder, where difference quotients lose most digits, the exact modes in
    float32 are within 3x of float32 unrolled autograd's own error against float64, taken as
    the largest over one-ulp roundings of mu0 (jvp: at most 2.0x over 60 draws with the six
    here, 2.4x over 80 with four; 8.9x against the unnudged input's error alone), and in
    float64 within 1e-10 (20 draws: <= 5e-12)."""
    from savae_fast.reference import unrolled
    from savae_fast.testing import relative_error, training_step

    p = _large_weight_problem()
    q = p.to(torch.float64)
    exact = training_step(unrolled, q)
    mode = _mode(hvp)
    assert relative_error(training_step(mode, q), exact) <= 1e-10
    floor = _float32_rounding_floor(p, exact)
    err = relative_error(training_step(mode, p), exact)
    assert err <= 3 * floor, f"{hvp}: {err:.2e} vs float32 unrolled {floor:.2e} (seed={seed})"


def test_richardson_difference_is_fourth_order_and_beats_central_on_a_large_weight_decoder(seed):
    """fd_richardson extrapolates two central differences: in float64 (no rounding to
    speak of) halving its step divides its error by 2^4 (90 draws, at the finest steps
    1e-3 / 2^i whose error stays above 1e-10: 15.4-16.2; fd_central's ratio is 4), which
    checks the stencil. In float32 at the default steps it is more
    accurate than fd_central on this decoder (40 draws: 2.7x to 100x; median errors
    9e-5 vs 4e-3, worst 4.1e-3 vs 7.9e-2; float32 unrolled's own error 7e-7 to 2e-3; over 150
    draws at least 1.29x, worst 2.8e-2)."""
    from savae_fast.reference import unrolled
    from savae_fast.testing import relative_error, training_step

    p = _large_weight_problem()
    q = p.to(torch.float64)
    exact = training_step(unrolled, q)
    # the finest pair of steps whose error is still far above float64 rounding (~1e-12 here):
    # the draws' curvature spans 10^4, so one fixed pair is outside the r^4 regime for some
    # (ratio 2.3 at 1e-3 / 5e-4 on one draw) or at the rounding floor for others
    errors = [relative_error(training_step(_mode("fd_richardson", fd_eps=1e-3 / 2**i), q), exact) for i in range(4)]
    pairs = [(coarse, fine) for coarse, fine in zip(errors, errors[1:]) if fine >= 1e-10]
    assert pairs, f"errors {errors} (seed={seed})"
    coarse, fine = pairs[-1]
    assert coarse / fine >= 10, f"error ratio {coarse / fine:.1f} at half the step, errors {errors} (seed={seed})"
    richardson = relative_error(training_step(_mode("fd_richardson"), p), exact)
    central = relative_error(training_step(_mode("fd_central"), p), exact)
    # (the absolute cap from the worst seen over 150 draws, 2.8e-2; fd_richardson <= fd_central held on
    # all 150, by 1.29x at the least: a cap of 1e-2 failed on 3 of them)
    assert richardson <= min(central, 5e-2), f"{richardson:.2e} vs fd_central {central:.2e} (seed={seed})"


def test_adaptive_step_reaches_rounding_on_a_large_weight_decoder(seed):
    """fd_adaptive takes fd_richardson's four passes and halves the step of every example whose
    own truncation estimate |D(2 r) - D(r)| is above its tolerance, then evaluates that
    reverse step again. On the large-weight decoder (100 draws): float64 worst 1.4e-10
    (fd_richardson's 1e-11 to 1.4e-6); float32 worst 3.8x max(float32 unrolled's own error,
    1e-4), 3.8e-4 where that error is small (fd_richardson up to 0.1); float32 unrolled's own
    error reaches 1.4e-2 on some draws, which no float32 method can beat. The float32 bound
    takes that error over one-ulp roundings of mu0 as for the exact modes (100 more draws:
    at most 0.74 of the bound with the unnudged error alone, 7.5e-5 there against 7.2e-4
    nudged)."""
    from savae_fast.reference import unrolled
    from savae_fast.testing import relative_error, training_step

    p = _large_weight_problem()
    q = p.to(torch.float64)
    exact = training_step(unrolled, q)
    err64 = relative_error(training_step(_mode("fd_adaptive"), q), exact)
    assert err64 <= 1e-9, f"float64 {err64:.2e} (seed={seed})"
    floor = _float32_rounding_floor(p, exact)
    err32 = relative_error(training_step(_mode("fd_adaptive"), p), exact)
    assert err32 <= 3 * floor + 1e-3, f"float32 {err32:.2e} vs float32 unrolled {floor:.2e} (seed={seed})"


def test_adaptive_step_recovers_from_a_step_too_large(seed):
    """From 10x the float64 default step (fd_richardson's error then 1e-5 to 1e-2 on the
    large-weight decoder), the halvings bring fd_adaptive down by the 16^4 that four
    halvings of a fourth-order error give (30 draws: 5.7e4x to 6.7e4x)."""
    from savae_fast.reference import unrolled
    from savae_fast.testing import relative_error, training_step

    q = _large_weight_problem().to(torch.float64)
    exact = training_step(unrolled, q)
    richardson = relative_error(training_step(_mode("fd_richardson", fd_eps=1e-3), q), exact)
    adaptive = relative_error(training_step(_mode("fd_adaptive", fd_eps=1e-3), q), exact)
    # (mild draws stop halving at the tolerance: 130 draws, at most 8.6e-11 where fd_richardson
    # was already 2.8e-8)
    assert adaptive <= max(richardson / 1000, 3e-10), f"{adaptive:.2e} vs fd_richardson {richardson:.2e} (seed={seed})"


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_adaptive_step_is_richardson_where_no_example_is_too_curved(kind, adaptive_evaluations):
    """Small-weight decoders: no estimate reaches the tolerance, so fd_adaptive evaluates
    fd_richardson's points once per reverse step and differs from it only by the order of
    the additions."""
    p = make_problem(kind, torch.float64, batch=16, latent=6, steps=8)
    _, adaptive = refine_grads(p, hvp="fd_adaptive")
    _, richardson = refine_grads(p, hvp="fd_richardson")
    assert len(adaptive_evaluations) == 8
    assert max_rel_err(adaptive, richardson)[0] <= 1e-12


def test_adaptive_tolerance_is_the_accuracy_cost_knob(adaptive_evaluations, seed):
    """fd_tol on a large-weight draw in float64: 1 (an estimate as large as the result) retries
    nothing, giving fd_richardson's result; tighter tolerances evaluate more reverse steps
    again (10 draws: 10 / 15-30 / 45-49 evaluations for 1, the default 1e-6 and 1e-8)."""
    from savae_fast.testing import training_step

    q = _large_weight_problem().to(torch.float64)
    counts, grads = {}, {}
    for tol in (1.0, None, 1e-8):
        adaptive_evaluations.clear()
        grads[tol] = training_step(_mode("fd_adaptive", fd_tol=tol), q)
        counts[tol] = len(adaptive_evaluations)
    assert counts[1.0] == q.noise.shape[0] <= counts[None] <= counts[1e-8], f"{counts} (seed={seed})"
    assert counts[1e-8] > counts[1.0], f"{counts} (seed={seed})"
    assert max_rel_err(grads[1.0], training_step(_mode("fd_richardson"), q))[0] <= 1e-12, f"seed={seed}"
