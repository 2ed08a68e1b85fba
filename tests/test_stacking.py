"""refine(stack_points=...): a reverse step's difference points evaluated in one decoder call
([n B, D], rows point-major) and one backward. The same computation as one call per point,
up to the order of summation; dropout through savae_fast.nn.Dropout; what it refuses."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import savae_fast as sf
from savae_fast.testing import (make_problem, max_rel_err, refine_grads, reference_grads, relative_error,
                                step0_grad_norm)

BACKENDS = ["cpp", "torch"] if sf.ops.available("cpu") else ["torch"]
STACKED = ["fd_central", "fd_richardson", "fd_adaptive"]
# float32 bounds of the unstacked modes (tests/test_refine.py) and the PixelCNN's
FLOAT32 = {"fd_central": 1e-4, "fd_richardson": 1e-4, "fd_adaptive": 1e-4}
PIXELCNN_FLOAT32 = {"fd_central": 1.5e-3, "fd_richardson": 1.5e-3, "fd_adaptive": 1.5e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", ["off", "on"])
@pytest.mark.parametrize("kind", ["mlp", "lstm", "pixelcnn"])
@pytest.mark.parametrize("hvp", STACKED)
@pytest.mark.parametrize("stack", [True, 2])
def test_stacked_equals_unstacked_in_float64(hvp, kind, clip, backend, stack):
    """At a step of 1e-4 (fd_richardson's float64 default): the two differ by the order in which
    one backward sums the points' parameter terms, rounding that the quotient divides by the step
    (at fd_central's own float64 step, 5e-6, both are ~1e-12 from the truth and from each other)."""
    p = make_problem(kind, torch.float64, batch=8, latent=4, steps=6)
    clip_norm = 0.0 if clip == "off" else 0.5 * step0_grad_norm(p)
    kw = dict(hvp=hvp, backend=backend, max_grad_norm=clip_norm, fd_eps=1e-4)
    (mu_a, lv_a), one_call_each = refine_grads(p, **kw)
    (mu_b, lv_b), stacked = refine_grads(p, stack_points=stack, **kw)
    assert torch.equal(mu_a, mu_b) and torch.equal(lv_a, lv_b)  # the forward is untouched
    assert relative_error(stacked, one_call_each) <= 1e-12


@pytest.mark.parametrize("kind", ["mlp", "lstm", "pixelcnn"])
@pytest.mark.parametrize("hvp", STACKED)
def test_stacked_float32_within_the_unstacked_bounds(hvp, kind, seed):
    p = make_problem(kind, torch.float32, batch=32, latent=8, steps=10)
    _, grads = refine_grads(p, hvp=hvp, stack_points=True)
    _, ref = reference_grads(p)
    worst, errs = max_rel_err(grads, ref)
    assert worst <= (PIXELCNN_FLOAT32 if kind == "pixelcnn" else FLOAT32)[hvp], f"seed={seed} {errs}"


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
@pytest.mark.parametrize("hvp", STACKED)
def test_dropout_of_savae_fast_nn_replays_in_stacked_calls(hvp, kind):
    """One mask per example at all its points, the mask of the forward step: float64 within 1e-9
    of unrolled autograd (which sees each step's mask once)."""
    p = make_problem(kind, torch.float64, batch=8, latent=4, steps=6, dropout=0.5)
    p.decoder.train()
    state = torch.get_rng_state()
    _, grads = refine_grads(p, hvp=hvp, stack_points=True)
    torch.set_rng_state(state)
    _, ref = reference_grads(p)
    assert max_rel_err(grads, ref)[0] <= 1e-9


def test_same_seed_is_bit_identical_stacked():
    p = make_problem("lstm", torch.float32, batch=8, latent=4, steps=6, dropout=0.5)
    p.decoder.train()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(refine_grads(p, hvp="fd_richardson", stack_points=True)[1])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("draw", ["nn.Dropout", "F.dropout", "bernoulli"])
def test_other_random_draws_are_refused_by_name(draw):
    p = make_problem("mlp", torch.float64, batch=6, latent=3, steps=3)
    dec = p.decoder
    dec.train()
    if draw == "nn.Dropout":
        dec.drop = nn.Dropout(0.3)
        nll = p.nll_fn
    elif draw == "F.dropout":
        nll = lambda z: p.nll_fn(F.dropout(z, 0.2))  # noqa: E731
    else:
        nll = lambda z: p.nll_fn(z * torch.bernoulli(torch.full_like(z, 0.9)))  # noqa: E731
    mu0 = p.mu0.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"outside savae_fast.nn.Dropout \(aten\."):
        sf.refine(mu0, p.logvar0, nll, p.params, steps=3, noise=p.noise, hvp="fd_central", stack_points=True)
    sf.refine(mu0, p.logvar0, nll, p.params, steps=3, noise=p.noise, hvp="fd_central")  # unstacked: fine
    sf.refine(mu0, p.logvar0, nll, p.params, steps=3, noise=p.noise, hvp="fd_forward", stack_points=True)  # one point


def test_unstacked_random_draws_without_the_probe_are_refused():
    p = make_problem("mlp", torch.float64, batch=6, latent=3, steps=3, dropout=0.3)
    p.decoder.train()
    with pytest.raises(RuntimeError, match="needs check_decoder=True"):
        refine_grads(p, hvp="fd_central", stack_points=True, check_decoder=False)


def test_wrong_row_count_is_refused_by_name():
    p = make_problem("mlp", torch.float64, batch=6, latent=3, steps=3)
    per_example = lambda z: p.decoder.nll(p.x, z[: p.x.shape[0]])  # noqa: E731  (ignores the stacked rows)
    mu0 = p.mu0.clone().requires_grad_(True)
    mk, lk = sf.refine(mu0, p.logvar0, per_example, p.params, steps=3, noise=p.noise, hvp="fd_central",
                       stack_points=True)
    with pytest.raises(ValueError, match=r"argument 'nll_fn' returned shape \(6,\) for a stacked z of shape \[12, D\]"):
        (mk.sum() + lk.sum()).backward()


def test_stack_points_argument_is_checked():
    p = make_problem("mlp", torch.float64, batch=4, latent=3, steps=2)
    for bad in (-1, 2.5, "yes"):
        with pytest.raises(ValueError, match="'stack_points'"):
            sf.refine(p.mu0, p.logvar0, p.nll_fn, steps=2, stack_points=bad)


def test_a_coupled_decoder_is_evaluated_unstacked_with_a_warning(monkeypatch):
    from savae_fast.refine import function

    monkeypatch.setattr(function, "_warned_unstacked", False)
    p = make_problem("mlp", torch.float64, batch=8, latent=4, steps=4)
    norm = nn.BatchNorm1d(4).double().train()
    nll = lambda z: p.decoder.nll(p.x, norm(z))  # noqa: E731
    grads = {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for stack in (False, True):
            torch.manual_seed(0)
            mu0 = p.mu0.clone().requires_grad_(True)
            mk, lk = sf.refine(mu0, p.logvar0, nll, p.params, steps=4, noise=p.noise, hvp="fd_central",
                               stack_points=stack)
            grads[stack] = torch.autograd.grad(mk.sum() + lk.sum(), [mu0, *p.params])
    assert any("stack_points ignored" in str(m.message) for m in seen)
    assert relative_error(grads[True], grads[False]) <= 1e-13


@pytest.mark.parametrize("policy", ["zero", "raise"])
def test_nonfinite_policies_stacked(policy):
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    calls = {"n": 0}

    def nll(z):
        calls["n"] += 1
        out = ((z - sf.nn.repeat_rows(w.expand(4, 3), z)) ** 2).sum(1)
        return out * float("nan") if calls["n"] == 6 else out  # the first backward call (stacked)

    mu = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    mu_k, lv_k = sf.refine(mu, torch.zeros(4, 3, dtype=torch.float64), nll, [w], steps=5, hvp="fd_central",
                           stack_points=True, on_nonfinite=policy)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="backward"):
            (mu_k.sum() + lv_k.sum()).backward()
    else:
        (mu_k.sum() + lv_k.sum()).backward()
        assert torch.isfinite(mu.grad).all() and torch.isfinite(w.grad).all()


def test_stacked_under_bfloat16_autocast():
    p = make_problem("mlp", torch.float32, batch=32, latent=8, steps=10)
    mu0 = p.mu0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mk, lk = sf.refine(mu0, p.logvar0, p.nll_fn, p.params, steps=10, noise=p.noise, hvp="fd_richardson",
                           stack_points=True)
    grads = torch.autograd.grad(p.elbo_loss(mk, lk), [mu0, *p.params])
    _, ref = reference_grads(p)
    assert max_rel_err(grads, [ref[0], *ref[2:]])[0] < 3e-3


def test_stacked_with_tf32_emulation():
    """The TF32 steps (CPU emulation of a GPU's TF32 products) with stacking: as unstacked."""
    from savae_fast.testing import cpu_tf32_enabled

    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "tf32"
    try:
        assert cpu_tf32_enabled()
        p = make_problem("tf32_mlp", torch.float32, batch=16, latent=4, steps=6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, a = refine_grads(p, hvp="fd_richardson")
            _, b = refine_grads(p, hvp="fd_richardson", stack_points=True)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    assert relative_error(b, a) < 1e-4  # float32 rounding of the two summation orders


def test_bundled_decoders_take_stacked_z_without_repeating_x():
    """LSTMDecoder and GatedPixelCNNDecoder: nll(x, z) of z with n points per example equals the
    n separate calls (x of B rows; the embedding / first layer computed once)."""
    for kind in ("lstm", "pixelcnn"):
        p = make_problem(kind, torch.float64, batch=5, latent=4, steps=1)
        z = torch.randn(3, 5, 4, dtype=torch.float64)
        stacked = p.decoder.nll(p.x, z.reshape(15, 4))
        separate = torch.cat([p.decoder.nll(p.x, z[j]) for j in range(3)])
        assert torch.allclose(stacked, separate, rtol=1e-13, atol=0), kind
