"""What refine assumes of a decoder, and what it does where a decoder breaks it: decoders that
couple the examples, write state during nll_fn, draw from generators of their own, write into z,
are linear in z or silently not twice differentiable; tensors changed in place before the
backward; gradient hooks. Ground truth: float64 reference.unrolled (plain autograd through the
unrolled loop) on fresh random problems."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import savae_fast as sf
from savae_fast.reference import unrolled
from savae_fast.testing import relative_error


def max_rel_err(grads, ref):
    """(relative error of all the gradients together, per tensor): a tensor whose true gradient is
    zero (a bias before batch norm) is judged against the whole, not its own size."""
    scale = sum(float(b.double().norm()) ** 2 for b in ref) ** 0.5
    per_tensor = [float((a.double() - b.double()).norm()) / max(float(b.double().norm()), 0.1 * scale)
                  for a, b in zip(grads, ref)]
    return max(relative_error(grads, ref), max(per_tensor)), per_tensor

DIFFERENCE_MODES = ["fd_forward", "fd_central", "fd_richardson", "fd_adaptive"]
ALL_MODES = DIFFERENCE_MODES + ["exact", "jvp"]
# float64 bounds against unrolled autograd (each mode's accuracy on a smooth decoder)
BOUND = {"fd_forward": 1e-6, "fd_central": 1e-7, "fd_richardson": 1e-8, "fd_adaptive": 1e-8, "exact": 1e-10,
         "jvp": 1e-10}


class TokenMLP(nn.Module):
    """z -> tanh MLP -> categorical tokens; ``middle`` (a module or function of the hidden
    features) sits between the two layers."""

    def __init__(self, latent, hidden=16, vocab=7, length=5, middle=None):
        super().__init__()
        self.vocab, self.length = vocab, length
        self.l1 = nn.Linear(latent, hidden)
        self.l2 = nn.Linear(hidden, vocab * length)
        self.middle = middle

    def nll(self, x, z):
        h = self.l1(z)
        if self.middle is not None:
            h = self.middle(h)
        logits = self.l2(torch.tanh(h)).view(-1, self.length, self.vocab)
        return F.cross_entropy(logits.reshape(-1, self.vocab), x.reshape(-1), reduction="none").view(
            -1, self.length).sum(1)


def _problem(batch=8, latent=4, steps=5, middle=None, dtype=torch.float64):
    dec = TokenMLP(latent, middle=middle).to(dtype)
    x = torch.randint(0, 7, (batch, 5))
    mu0 = 0.5 * torch.randn(batch, latent, dtype=dtype)
    lv0 = 0.3 * torch.randn(batch, latent, dtype=dtype)
    noise = torch.randn(steps, batch, latent, dtype=dtype)
    w = torch.randn(2, batch, latent, dtype=dtype)
    return dec, x, mu0, lv0, noise, w


def _grads(method, dec, x, mu0, lv0, noise, w, **kw):
    """Gradients of a fixed linear functional of lambda_K w.r.t. (mu0, logvar0, *parameters); refine's
    without its default stabiliser (the exact gradient, which unrolled computes)."""
    if method is sf.refine:
        kw.setdefault("backward_clip", None)
    mu, lv = mu0.clone().requires_grad_(True), lv0.clone().requires_grad_(True)
    params = list(dec.parameters())
    mk, lk = method(mu, lv, lambda z: dec.nll(x, z), params, steps=noise.shape[0], noise=noise, **kw)
    return torch.autograd.grad((w[0] * mk).sum() + (w[1] * lk).sum(), [mu, lv, *params])


def _compare(dec, x, mu0, lv0, noise, w, **kw):
    """(refine's gradients, unrolled's), each from its own copy of the decoder (and its state)."""
    ref_dec = copy.deepcopy(dec)
    got = _grads(sf.refine, dec, x, mu0, lv0, noise, w, **kw)
    ref = _grads(unrolled, ref_dec, x, mu0, lv0, noise, w)
    return got, ref, ref_dec


# ------------------------------------------------------------------ examples coupled by the decoder
@pytest.mark.parametrize("hvp", ALL_MODES)
def test_batchnorm_in_training_mode_matches_unrolled(hvp):
    """BatchNorm1d in training mode couples the examples through the batch statistics: found by
    the probe, the difference modes take one step for the batch (per-example steps were off by
    ~50%); its running statistics end where unrolled's do (K updates, none at perturbed points)."""
    dec, *rest = _problem(middle=nn.BatchNorm1d(16))
    dec.train()
    got, ref, ref_dec = _compare(dec, *rest, hvp=hvp)
    worst, errs = max_rel_err(got, ref)
    assert worst <= BOUND[hvp], errs
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        # (z_k agree to rounding: fused kernels against PyTorch's operators)
        assert torch.allclose(getattr(dec.middle, name), getattr(ref_dec.middle, name), rtol=1e-12, atol=0), name


@pytest.mark.parametrize("check_decoder", [True, False], ids=["probed", "unprobed"])
@pytest.mark.parametrize("hvp", ["fd_central", "fd_richardson", "fd_adaptive"])
def test_coupling_no_operator_shows_is_declared_with_batch_coupled(hvp, check_decoder):
    """A mean over the batch written out: no operator shows it, batch_coupled=True declares it,
    with or without the probe (the declaration was read inside the probe only: with
    check_decoder=False fd_central was off by 0.67)."""
    dec, *rest = _problem(middle=lambda h: h - 0.7 * h.mean(0, keepdim=True))
    got, ref, _ = _compare(dec, *rest, hvp=hvp, batch_coupled=True, check_decoder=check_decoder)
    assert max_rel_err(got, ref)[0] <= BOUND[hvp]
    undeclared = _grads(sf.refine, dec, *rest, hvp=hvp)
    assert max_rel_err(undeclared, ref)[0] > 1e3 * BOUND[hvp]  # per-example steps: wrong, as documented


class _ImageBatchNorm(nn.Module):
    """z -> 4 x 2 x 2 feature maps -> BatchNorm2d -> tokens; takes stacked z (x repeated per point)."""

    def __init__(self, latent, vocab=5, length=3):
        super().__init__()
        self.vocab, self.length = vocab, length
        self.l1, self.bn = nn.Linear(latent, 16), nn.BatchNorm2d(4)
        self.l2 = nn.Linear(16, vocab * length)

    def nll(self, x, z):
        x = sf.nn.repeat_rows(x, z)
        h = self.bn(self.l1(z).view(-1, 4, 2, 2)).view(-1, 16)
        logits = self.l2(torch.tanh(h)).view(-1, self.vocab)
        return F.cross_entropy(logits, x.reshape(-1), reduction="none").view(-1, self.length).sum(1)


@pytest.mark.parametrize("hvp", ["fd_central", "fd_adaptive"])
def test_batchnorm2d_in_training_mode_over_one_example_is_not_stacked(hvp):
    """BatchNorm2d in training mode normalises one example over its feature map: the probe saw no
    coupling (one row), and stacking normalised the n points of the example together (1.5-5
    relative error): stacking is refused for it (one warning) and the gradient is right."""
    from savae_fast.refine import function

    dec = _ImageBatchNorm(3).double().train()
    x = torch.randint(0, 5, (1, 3))
    mu0, lv0 = 0.5 * torch.randn(1, 3, dtype=torch.float64), 0.3 * torch.randn(1, 3, dtype=torch.float64)
    noise, w = torch.randn(4, 1, 3, dtype=torch.float64), torch.randn(2, 1, 3, dtype=torch.float64)
    function._warned_unstacked = False
    with pytest.warns(UserWarning, match="stack_points ignored.*batch statistics"):
        got, ref, _ = _compare(dec, x, mu0, lv0, noise, w, hvp=hvp, stack_points=True)
    assert max_rel_err(got, ref)[0] <= BOUND[hvp]


def test_noise_drawn_under_inference_mode_is_accepted():
    """Noise drawn under torch.inference_mode raised PyTorch's "Inference tensors cannot be saved for
    backward", naming neither refine nor the argument: its values are what refine needs."""
    dec, x, mu0, lv0, noise, w = _problem()
    with torch.inference_mode():
        frozen = noise.clone()
    assert frozen.is_inference()
    got = _grads(sf.refine, dec, x, mu0, lv0, frozen, w, hvp="fd_central")
    want = _grads(sf.refine, dec, x, mu0, lv0, noise, w, hvp="fd_central")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_batch_coupled_false_overrides_the_probe():
    """batch_coupled=False keeps per-example steps even with batch norm in training mode (the
    caller's word; here it is wrong, which shows the option is honoured)."""
    dec, *rest = _problem(middle=nn.BatchNorm1d(16))
    got, ref, _ = _compare(dec, *rest, hvp="fd_central", batch_coupled=False)
    assert max_rel_err(got, ref)[0] > 1e-4


def test_instance_norm_does_not_count_as_coupling(monkeypatch):
    """InstanceNorm runs batch norm over a batch of one: no coupling found, per-example steps."""
    from savae_fast.refine import hvp as hvp_module

    shared = []
    real = hvp_module.shared_central_points
    monkeypatch.setattr(hvp_module, "shared_central_points", lambda *a, **k: (shared.append(1), real(*a, **k))[1])
    norm = nn.InstanceNorm1d(1, affine=True)
    dec, *rest = _problem(middle=lambda h: norm(h.unsqueeze(1)).squeeze(1))
    norm.double()
    got, ref, _ = _compare(dec, *rest, hvp="fd_central")
    assert max_rel_err(got, ref)[0] <= BOUND["fd_central"] and not shared


# ------------------------------------------------------------------ state written during nll_fn
@pytest.mark.parametrize("hvp", ["fd_forward", "fd_central", "exact"])
def test_spectral_norm_decoder_matches_unrolled(hvp):
    """spectral_norm's power iteration writes its vectors at every call: each step's values are
    saved and replayed in the backward, and they end where unrolled's end."""
    dec, *rest = _problem()
    dec.l2 = nn.utils.spectral_norm(dec.l2)
    dec.train()
    got, ref, ref_dec = _compare(dec, *rest, hvp=hvp)
    assert max_rel_err(got, ref)[0] <= BOUND[hvp]
    for name in ("weight_u", "weight_v"):
        assert torch.allclose(getattr(dec.l2, name), getattr(ref_dec.l2, name), rtol=1e-12, atol=1e-15), name


def test_decoder_writing_its_parameter_is_refused_by_name():
    dec, x, mu0, lv0, noise, w = _problem()

    def nll(z):
        with torch.no_grad():
            dec.l1.weight.mul_(1.0)
        return dec.nll(x, z)

    mu = mu0.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"writes in place into params\[0\]"):
        sf.refine(mu, lv0, nll, list(dec.parameters()), steps=3, noise=noise[:3])


def test_decoder_writing_into_z_matches_unrolled():
    """F.relu(z, inplace=True) / z.mul_(): nll_fn gets a tensor it may write into."""
    dec, x, mu0, lv0, noise, w = _problem()
    nll = lambda z: dec.nll(x, torch.tanh_(z.mul_(1.5)))  # noqa: E731
    ref = _grads(lambda *a, **k: unrolled(*a, **k), _Wrap(nll), x, mu0, lv0, noise, w)
    for hvp in ("fd_central", "exact", "jvp"):
        got = _grads(sf.refine, _Wrap(nll), x, mu0, lv0, noise, w, hvp=hvp)
        assert max_rel_err(got[:2], ref[:2])[0] <= BOUND[hvp], hvp
    relu = lambda z: dec.nll(x, F.relu(z, inplace=True))  # noqa: E731
    got = _grads(sf.refine, _Wrap(relu), x, mu0, lv0, noise, w, hvp="exact")
    assert max_rel_err(got[:2], _grads(unrolled, _Wrap(relu), x, mu0, lv0, noise, w)[:2])[0] <= 1e-10


class _Wrap(nn.Module):
    """A decoder given as a function of (x, z) (no parameters of its own)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def nll(self, x, z):
        return self.fn(z)


# ------------------------------------------------------------------ tensors changed before backward
def test_noise_changed_in_place_before_backward_raises():
    """A multi-sample loop reusing its noise buffer: autograd's in-place error, not a wrong gradient."""
    dec, x, mu0, lv0, noise, w = _problem()
    mu = mu0.clone().requires_grad_(True)
    buf = noise.clone()
    mk, lk = sf.refine(mu, lv0, lambda z: dec.nll(x, z), list(dec.parameters()), steps=noise.shape[0], noise=buf)
    buf.normal_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (mk.sum() + lk.sum()).backward()


@pytest.mark.parametrize("what", ["parameter", "mu"])
def test_parameter_or_mu_changed_in_place_before_backward_raises(what):
    dec, x, mu0, lv0, noise, w = _problem()
    mu = mu0.clone().requires_grad_(True)
    start = mu * 1.0  # a non-leaf mu, as an encoder's output
    mk, lk = sf.refine(start, lv0, lambda z: dec.nll(x, z), list(dec.parameters()), steps=3, noise=noise[:3])
    with torch.no_grad():
        (dec.l1.weight if what == "parameter" else start).mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (mk.sum() + lk.sum()).backward()


def test_noise_that_requires_grad_is_refused():
    dec, x, mu0, lv0, noise, w = _problem()
    with pytest.raises(ValueError, match="'noise' requires grad"):
        sf.refine(mu0.requires_grad_(True), lv0, lambda z: dec.nll(x, z), steps=3,
                  noise=noise[:3].clone().requires_grad_(True))


# ------------------------------------------------------------------ hooks
@pytest.mark.parametrize("hvp", ["fd_forward", "fd_central", "exact"])
def test_parameter_hooks_see_the_whole_gradient_once(hvp):
    """A hook on a decoder parameter fires once per backward with the gradient plain autograd
    gives it; refine's own gradient computations do not call it."""
    dec, x, mu0, lv0, noise, w = _problem()
    ref_dec = copy.deepcopy(dec)
    calls = []
    dec.l1.weight.register_hook(lambda g: (calls.append(1), 2 * g)[1])
    ref_calls = []
    ref_dec.l1.weight.register_hook(lambda g: (ref_calls.append(1), 2 * g)[1])
    params = list(dec.parameters())
    for decoder, method, kw in ((dec, sf.refine, {"hvp": hvp}), (ref_dec, unrolled, {})):
        mu = mu0.clone().requires_grad_(True)
        mk, lk = method(mu, lv0, lambda z, d=decoder: d.nll(x, z), list(decoder.parameters()), steps=noise.shape[0],
                        noise=noise, **kw)
        ((w[0] * mk).sum() + (w[1] * lk).sum() + decoder.nll(x, mk).sum()).backward()
    assert calls == [1] and ref_calls == [1]
    assert max_rel_err([p.grad for p in params], [p.grad for p in ref_dec.parameters()])[0] <= BOUND[hvp]
    clamp = dec.l2.weight.register_hook(lambda g: g.clamp(-1e-3, 1e-3))  # a non-linear hook
    ref_dec.l2.weight.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
    for decoder, method, kw in ((dec, sf.refine, {"hvp": hvp}), (ref_dec, unrolled, {})):
        decoder.zero_grad()
        mk, lk = method(mu0.clone().requires_grad_(True), lv0, lambda z, d=decoder: d.nll(x, z),
                        list(decoder.parameters()), steps=noise.shape[0], noise=noise, **kw)
        ((w[0] * mk).sum() + (w[1] * lk).sum()).backward()
    a, b = dec.l2.weight.grad, ref_dec.l2.weight.grad
    assert float((a - b).norm()) <= 10 * BOUND[hvp] * float(b.norm())
    clamp.remove()
    assert not any(dec.l2.weight._backward_hooks)


# ------------------------------------------------------------------ randomness
def test_decoder_drawing_from_its_own_generator_is_refused_by_name():
    gen = torch.Generator().manual_seed(0)
    dec, x, mu0, lv0, noise, w = _problem(middle=lambda h: h * torch.bernoulli(torch.full_like(h, 0.8),
                                                                               generator=gen) / 0.8)
    with pytest.raises(RuntimeError, match="Generator of its own.*aten.bernoulli"):
        sf.refine(mu0.requires_grad_(True), lv0, lambda z: dec.nll(x, z), list(dec.parameters()), steps=3,
                  noise=noise[:3])


@pytest.mark.parametrize("hvp", ["fd_central", "exact"])
def test_decoder_that_draws_only_after_its_first_call_is_replayed(hvp):
    """Dropout only where z is large (data-dependent): the first call, at a small z_0, draws
    nothing and the later ones do. The generators moved during the later calls, so their states
    are replayed (they were not: 1e7 relative error)."""
    dec, x, mu0, lv0, noise, w = _problem()
    mu0, lv0 = 0.05 * mu0, torch.full_like(lv0, -6.0)
    threshold = 3 * float((mu0 + torch.exp(0.5 * lv0) * noise[0]).norm())
    holder, drew = {}, []
    dec.middle = lambda h: F.dropout(h, 0.5, training=drew.append(bool(holder["z"].norm() > threshold)) or drew[-1])
    nll = _Wrap(lambda z: (holder.__setitem__("z", z), dec.nll(x, z))[1])
    nll.dec = dec  # (its parameters)
    # (large clipped steps, so that z leaves the small region after the first step on every draw)
    state = torch.get_rng_state()
    got = _grads(sf.refine, nll, x, mu0, lv0, noise, w, hvp=hvp, reduction="sum", lr=2.0)
    torch.set_rng_state(state)
    ref = _grads(unrolled, nll, x, mu0, lv0, noise, w, reduction="sum", lr=2.0)
    assert drew[0] is False and any(drew)  # (the case meant: the first call drew nothing)
    assert max_rel_err(got, ref)[0] <= BOUND[hvp]


# ------------------------------------------------------------------ exact second derivatives
@pytest.mark.parametrize("hvp", ["exact", "jvp", "fd_central"])
def test_decoder_linear_in_z_has_zero_second_order_terms(hvp):
    """A decoder linear in z with fixed weights: its second derivatives are zero (not a
    'does not support double backward' error)."""
    dec, x, mu0, lv0, noise, w = _problem()
    a = torch.randn(mu0.shape[1], dtype=torch.float64)
    lin = _Wrap(lambda z: (z * a).sum(1) + 0.1 * (z * a).sum(1) ** 1)
    got = _grads(sf.refine, lin, x, mu0, lv0, noise, w, hvp=hvp)
    ref = _grads(unrolled, lin, x, mu0, lv0, noise, w)
    assert max_rel_err(got, ref)[0] <= BOUND[hvp]


class _DetachedSquare(torch.autograd.Function):
    """z^2 whose backward leaves autograd (its derivative is computed from a detached z): first
    derivatives right, second derivatives silently zero."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z * z

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return 2 * z.detach() * g


def test_exact_second_derivatives_that_are_silently_wrong_raise():
    """(hvp='jvp' refuses a custom Function without a jvp rule by itself.)"""
    dec, x, mu0, lv0, noise, w = _problem()
    nll = lambda z: dec.nll(x, z) + _DetachedSquare.apply(z).sum(1)  # noqa: E731
    mu = mu0.clone().requires_grad_(True)
    mk, lk = sf.refine(mu, lv0, nll, list(dec.parameters()), steps=3, noise=noise[:3], hvp="exact")
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        ((w[0] * mk).sum() + (w[1] * lk).sum()).backward()
    mk, lk = sf.refine(mu, lv0, nll, list(dec.parameters()), steps=3, noise=noise[:3], hvp="fd_central")
    ((w[0] * mk).sum() + (w[1] * lk).sum()).backward()  # the difference modes need first derivatives only


def test_exact_on_a_compiled_decoder_raises_every_time():
    """torch.compile (aot_eager) functions have no double backward: refine(hvp='exact') says so
    on every call, also after a failed double backward of the caller's own."""
    dec, x, mu0, lv0, noise, w = _problem()
    compiled = torch.compile(dec.nll, backend="aot_eager")
    z = mu0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(compiled(x, z).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), z)
    for _ in range(2):
        mk, lk = sf.refine(mu0.clone().requires_grad_(True), lv0, lambda z: compiled(x, z), list(dec.parameters()),
                           steps=3, noise=noise[:3], hvp="exact")
        with pytest.raises(RuntimeError, match="twice differentiable|double backward"):
            ((w[0] * mk).sum() + (w[1] * lk).sum()).backward()


# ------------------------------------------------------------------ clear errors
def test_errors_name_refine_and_the_argument():
    nll = lambda z: (z ** 2).sum(1)  # noqa: E731
    mu, lv = torch.randn(4, 3, requires_grad=True), torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="'mu' is on the meta device"):
        sf.refine(torch.randn(4, 3, device="meta"), torch.zeros(4, 3, device="meta"), nll)
    with pytest.raises(TypeError, match="'mu' must be a dense"):
        sf.refine(torch.randn(4, 3).to_sparse(), torch.zeros(4, 3).to_sparse(), nll)
    with pytest.raises(ValueError, match="'steps' = 1000000000000 needs"):
        sf.refine(mu, lv, nll, steps=10**12)
    with pytest.raises(RuntimeError, match="refine: called inside a torch.func transform"):
        torch.func.grad(lambda m: sf.refine(m, lv.detach(), nll, steps=2)[0].sum())(mu.detach())
    with pytest.raises(RuntimeError, match="refine: called inside a torch.func transform"):
        torch.func.vmap(lambda m: sf.refine(m, lv.detach(), nll, steps=2)[0])(mu.detach().unsqueeze(0))
    mk, _ = sf.refine(mu, lv, nll, steps=2)
    with pytest.raises(RuntimeError, match="refine: its backward does not support batched gradients"):
        torch.autograd.grad(mk, mu, torch.eye(12).view(12, 4, 3), is_grads_batched=True)
    wt = torch.randn(3, requires_grad=True)
    coupled = lambda z: ((z - wt) ** 2).sum(1)  # noqa: E731
    mk, _ = sf.refine(mu, lv, coupled, [wt], steps=2)
    (g,) = torch.autograd.grad(coupled(mk).sum(), mu, create_graph=True)
    with pytest.raises(RuntimeError, match="refine: differentiating the gradient of a refinement"):
        g.sum().backward()


def test_fd_forward_under_bfloat16_autocast_warns_once(monkeypatch):
    """Its quotient loses most digits in bfloat16 (README, Precision); the other modes stay accurate."""
    from savae_fast.refine import precision

    monkeypatch.setattr(precision, "_warned_low_precision", False)
    dec, x, mu0, lv0, noise, w = _problem(dtype=torch.float32)
    mu = mu0.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        for hvp in ("fd_central", "exact", "fd_forward", "fd_forward"):
            sf.refine(mu, lv0, lambda z: dec.nll(x, z), steps=2, noise=noise[:2], hvp=hvp)
    texts = [str(m.message) for m in seen if "autocast" in str(m.message)]
    assert len(texts) == 1 and "hvp='fd_forward'" in texts[0] and "'fd_richardson'" in texts[0]


@pytest.mark.parametrize("hvp", ["fd_forward", "fd_central", "exact"])
def test_data_changed_in_place_before_the_backward_raises(hvp):
    """The next batch loaded into the buffer nll_fn closes over, between forward and backward: refine
    replayed the decoder on the new data (fd_central 3.5, fd_forward 3.5e7 relative error, silently);
    it now raises autograd's kind of error, naming the tensor."""
    dec, x, mu0, lv0, noise, w = _problem()
    mu = mu0.clone().requires_grad_(True)
    mk, lk = sf.refine(mu, lv0, lambda z: dec.nll(x, z), list(dec.parameters()), steps=noise.shape[0], noise=noise,
                       hvp=hvp)
    x.copy_(torch.randint(0, 7, x.shape))
    with pytest.raises(RuntimeError, match=r"nll_fn reads \(shape \[8, 5\], torch.int64\) was modified in place"):
        ((w[0] * mk).sum() + (w[1] * lk).sum()).backward()
