"""refine's stabilisers of its backward pass (backward_clip, backward_steps) and its amplification
statistics (RefineStats), against the same stabilisation written as hooks on float64 unrolled
autograd (reference.unrolled), on fresh random draws."""

import warnings

import pytest
import torch

import savae_fast as sf
from savae_fast.refine import stabilize
from savae_fast.refine.validation import DEFAULTS
from savae_fast.testing import make_problem, relative_error

STEPS = 8
# A large inner lr: the backpropagated gradient of the small MLP decoder grows 1.2-2x in some
# reverse steps (30 draws), and the stabilisers below engage (clip 0.3: every draw's smallest
# factor at most 0.64).
UNSTABLE = dict(lr=6.0, reduction="mean")
OPTIONS = {
    "stop example": dict(backward_clip=0.3),
    "scale example": dict(backward_clip=0.3, backward_clip_mode="scale"),
    "stop batch": dict(backward_clip=0.3, backward_clip_scope="batch"),
    "scale batch": dict(backward_clip=0.3, backward_clip_scope="batch", backward_clip_mode="scale"),
    "truncate 3": dict(backward_steps=3),
    "truncate 0": dict(backward_steps=0),
    "truncate 4 stop": dict(backward_steps=4, backward_clip=0.3),
}
# float64 relative error of each mode against the hooked unrolled reference: the exact modes to
# rounding (1e-9 asked), the difference modes to their truncation at their float64 steps
TOLERANCE = {"exact": 1e-9, "jvp": 1e-9, "fd_adaptive": 1e-9, "fd_richardson": 1e-8, "fd_central": 1e-6,
             "fd_forward": 1e-5}


def _step(p, method, stats=None, **kw):
    mu0 = p.mu0.detach().clone().requires_grad_(True)
    lv0 = p.logvar0.detach().clone().requires_grad_(True)
    params = p.params
    mu_k, lv_k = method(mu0, lv0, p.nll_fn, params, steps=STEPS, noise=p.noise, stats=stats, **kw)
    grads = torch.autograd.grad(p.elbo_loss(mu_k, lv_k), [mu0, lv0, *params], allow_unused=True)
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, [mu0, lv0, *params])]


def _problem(batch=12, latent=4):
    return make_problem("mlp", torch.float64, batch=batch, latent=latent, steps=STEPS)


@pytest.mark.parametrize("hvp", list(TOLERANCE))
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_stabilised_gradient_equals_hooked_unrolled_autograd(name, backend, hvp):
    if backend == "cpp" and not sf.ops.extension_loaded():
        pytest.skip("the compiled extension is not built")
    p = _problem()
    options = dict(UNSTABLE, **OPTIONS[name])
    stats, ref_stats = sf.RefineStats(), sf.RefineStats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the exploding-gradient warning)
        got = _step(p, sf.refine, stats, hvp=hvp, backend=backend, **options)
    want = _step(p, sf.reference.unrolled, ref_stats, **options)
    err = relative_error(got, want)
    assert err <= TOLERANCE[hvp], f"{name}, {hvp}, {backend}: relative error {err:.2e}"
    exact = _step(p, sf.reference.unrolled, None, **UNSTABLE)
    if "backward_clip" in options:  # the clip engaged and changed the gradient (else the test shows nothing)
        assert float(stats.clip_factor.min()) < 0.9
        torch.testing.assert_close(stats.clip_factor, ref_stats.clip_factor, rtol=1e-6, atol=0)
    assert relative_error(want, exact) > 1e-3
    assert stats.steps == ref_stats.steps == options.get("backward_steps", STEPS)


@pytest.mark.skipif(not sf.ops.triton_available(), reason="Triton cannot run here (no GPU, no interpreter)")
@pytest.mark.parametrize("hvp", ["exact", "fd_central"])
def test_stabilisers_on_the_triton_backend(hvp):
    p = _problem(batch=6, latent=3)
    options = dict(UNSTABLE, backward_clip=0.5, backward_steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = _step(p, sf.refine, hvp=hvp, backend="triton", **options)
    want = _step(p, sf.reference.unrolled, **options)
    assert relative_error(got, want) <= TOLERANCE[hvp]


@pytest.mark.parametrize("options", [dict(), dict(backward_clip=0.5), dict(backward_clip=0.5, backward_clip_mode="scale"),
                                     dict(backward_clip=0.5, backward_clip_scope="batch")])
def test_amplification_statistics_equal_unrolled_autograds(options):
    p = _problem()
    stats, ref = sf.RefineStats(), sf.RefineStats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _step(p, sf.refine, stats, hvp="exact", **UNSTABLE, **options)
    _step(p, sf.reference.unrolled, ref, **UNSTABLE, **options)
    for name in ("gain", "max_step_gain", "batch_gain", "batch_max_step_gain"):
        a, b = getattr(stats, name), getattr(ref, name)
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0, msg=name)
    assert stats.backwards == ref.backwards == 1
    summary = stats.summary()
    assert summary["gain_max"] == pytest.approx(float(ref.gain.max()), rel=1e-9)
    assert summary["gain_batch"] == pytest.approx(float(ref.batch_gain), rel=1e-9)
    assert summary["backward_clip_engaged"] == (0.0 if not options else pytest.approx(
        float((ref.clip_factor < 1).double().mean())))
    # some reverse step grew the gradient (the statistic is not trivially 1); a stopped row stays at 1
    if options.get("backward_clip_mode") == "scale" or not options:
        assert float(ref.max_step_gain.max()) > 1.1


def _quadratic(curvature: float, batch=6, latent=3, dtype=torch.float64):
    """A decoder whose NLL is 0.5 h |z - c|^2 per example: inner lr a with a h above 2 (momentum 0)
    makes every inner step expand the backpropagated vector by |1 - a h| > 1 (with zero noise z = mu,
    and logvar stays where it is)."""
    centre = torch.randn(batch, latent, dtype=dtype)
    weight = torch.ones((), dtype=dtype, requires_grad=True)
    nll = lambda z: 0.5 * curvature * weight * (z - centre).square().sum(1)  # noqa: E731
    return nll, weight, torch.randn(batch, latent, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("lr_times_curvature,warns", [(2.6, True), (0.5, False), (1.9, False)])
def test_exploding_warning_fires_on_a_chaotic_inner_loop_only(lr_times_curvature, warns, monkeypatch):
    monkeypatch.setattr(stabilize, "_warned_exploding", False)
    nll, weight, mu = _quadratic(lr_times_curvature)
    stats = sf.RefineStats()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mu_k, _ = sf.refine(mu, torch.zeros_like(mu), nll, [weight], steps=20, momentum=0.0, noise=torch.zeros(20, *mu.shape, dtype=mu.dtype),
                            max_grad_norm=0.0, kl_weight=0.0, reduction="sum", hvp="exact", stats=stats,
                            backward_clip=None)
        mu_k.sum().backward()
    exploding = [w for w in seen if "grew by" in str(w.message)]
    assert bool(exploding) == warns, [str(w.message) for w in seen]
    if warns:
        gain = float(stats.gain.max())
        assert gain > stabilize.EXPLODING_GAIN
        assert f"{gain:.3g}x" in str(exploding[0].message) and "backward_clip=" in str(exploding[0].message)
    else:
        assert float(stats.gain.max()) < 10


def test_exploding_warning_not_given_where_the_clip_bounds_the_gradient(monkeypatch):
    monkeypatch.setattr(stabilize, "_warned_exploding", False)
    nll, weight, mu = _quadratic(2.6)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mu_k, _ = sf.refine(mu, torch.zeros_like(mu), nll, [weight], steps=20, momentum=0.0, noise=torch.zeros(20, *mu.shape, dtype=mu.dtype),
                            max_grad_norm=0.0,
                            kl_weight=0.0, reduction="sum", backward_clip=10.0)
        mu_k.sum().backward()
    assert not [w for w in seen if "grew by" in str(w.message)]
    # and the gradient to mu is bounded: at most the clip times its incoming norm per example (the
    # incoming dF/dmu_K is all ones: norm sqrt(D) for every example)
    assert float(mu.grad.norm(dim=1).max()) <= 10.0 * mu.shape[1] ** 0.5 * (1 + 1e-12)


@pytest.mark.parametrize("hvp", ["fd_forward", "fd_central", "exact"])
def test_a_clip_that_does_not_engage_leaves_the_gradient_bit_identical(hvp):
    """Where nothing explodes (a small-lr inner loop), the default and a clip that never engages
    give exactly the exact gradient refine gives without a stabiliser."""
    p = make_problem("mlp", torch.float32, batch=8, latent=4, steps=STEPS)
    exact = _step(p, sf.refine, hvp=hvp, backward_clip=None)
    stats = sf.RefineStats()
    for options in (dict(), dict(backward_clip=DEFAULTS.backward_clip or 10.0)):
        got = _step(p, sf.refine, stats, hvp=hvp, **options)
        assert stats.summary()["backward_clip_engaged"] == 0.0
        for a, b in zip(got, exact):
            assert torch.equal(a, b)


def test_stacked_points_clip_like_separate_calls():
    p = _problem()
    options = dict(UNSTABLE, backward_clip=0.5, hvp="fd_central")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stacked = _step(p, sf.refine, stack_points=True, **options)
        separate = _step(p, sf.refine, **options)
    # (float64 rounding of the decoder's gradients, divided by the difference step 5e-6)
    assert relative_error(stacked, separate) <= 1e-10


def test_truncation_keeps_fd_forwards_base_sum_to_the_reversed_steps():
    """fd_forward sums the base points' parameter gradients in the forward: with backward_steps only
    those of the reversed steps (else the earlier steps' sum would be left in the decoder's gradient)."""
    p = _problem()
    got = _step(p, sf.refine, hvp="fd_forward", lr=0.5, backward_steps=2)
    want = _step(p, sf.reference.unrolled, lr=0.5, backward_steps=2)
    assert relative_error(got[2:], want[2:]) <= 1e-5


@pytest.mark.parametrize("kwargs,message", [
    (dict(backward_clip=0.0), "'backward_clip' must be > 0"),
    (dict(backward_clip=-1), "'backward_clip' must be > 0"),
    (dict(backward_clip=float("inf")), "'backward_clip' must be finite"),
    (dict(backward_clip="10"), "'backward_clip' must be a real number"),
    (dict(backward_clip_scope="global"), "'backward_clip_scope' must be one of"),
    (dict(backward_clip_mode="drop"), "'backward_clip_mode' must be one of"),
    (dict(backward_steps=-1), "'backward_steps' must be >= 0"),
    (dict(backward_steps=2.0), "'backward_steps' must be None or an int"),
    (dict(stats={}), "'stats' must be a savae_fast.RefineStats"),
])
def test_bad_stabiliser_arguments_are_named(kwargs, message):
    mu = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises((TypeError, ValueError), match=message):
        sf.refine(mu, torch.zeros(2, 3), lambda z: z.square().sum(1), steps=2, **kwargs)


def test_stats_summary_is_empty_before_a_backward_and_counts_backwards():
    stats = sf.RefineStats()
    assert stats.summary() == {}
    mu = torch.randn(4, 2, requires_grad=True)
    for i in range(2):
        mu_k, _ = sf.refine(mu, torch.zeros(4, 2), lambda z: z.square().sum(1), steps=3, stats=stats)
        mu_k.sum().backward()
        assert stats.backwards == i + 1 and stats.gain.shape == (4,)
