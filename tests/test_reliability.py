"""Reliability: property-based checks against the references, fuzzing of the compiled
operators, non-finite values, extreme log-variances, torch.compile, threads."""

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savae_fast as sf
from savae_fast.ops import torch_impl
from savae_fast.ops.constants import FD_CENTRAL, FD_EXACT, FD_FORWARD
from savae_fast.reference import unrolled
from savae_fast.testing import MLPDecoder, max_rel_err, rel_err
from savae_fast.testing import OP_TOL, assert_outputs_close, op_state, op_err

HAVE_CPP = sf.ops.available("cpu")
BACKENDS = (["cpp"] if HAVE_CPP else []) + (["triton"] if sf.ops.triton_available("cpu") else []) + ["torch"]
PROPERTY = settings(max_examples=30, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _impl(backend):
    return sf.ops.get_backend(backend, "cpu")


# ------------------------------------------------------------------------------ properties
op_inputs = st.fixed_dictionaries({
    "batch": st.integers(1, 40), "latent": st.integers(1, 70), "dtype": st.sampled_from([torch.float32, torch.float64]),
    "backend": st.sampled_from([b for b in BACKENDS if b != "torch"] or ["torch"]),
    "scale": st.floats(1e-3, 2.0), "kl_weight": st.floats(0.0, 2.0), "lr": st.floats(0.05, 2.0),
    "momentum": st.floats(0.0, 0.95), "clip": st.sampled_from(["off", "inactive", "active"]),
    "fd_mode": st.sampled_from([FD_EXACT, FD_FORWARD, FD_CENTRAL]), "seed": st.integers(0, 2**31 - 1)})


@PROPERTY
def _assert_as_accurate_as_formula(fused, formula, args, dtype, scales=None):
    """Fused output within the op tolerance of the pure-torch formula, or, where the
    draw is ill-conditioned in float32 (exp amplifying the rounding of a large logvar
    update), within a few times the float32 formula's own distance from the float64 one."""
    out, ref = fused(*args), formula(*args)
    try:
        assert_outputs_close(out, ref, dtype, scales)
        return
    except AssertionError:
        if dtype != torch.float32:
            raise
    exact = list(formula(*(a.double() if isinstance(a, torch.Tensor) else a for a in args)))
    if formula is torch_impl.forward_step and args[6] is not None:
        # z = mu_n + exp(logvar_n / 2) eps_next: exp turns the last-bit rounding of a
        # large logvar_n into a relative error of z; judge z given the op's own
        # (already checked) logvar_n and mu_n
        exact[4] = torch_impl.sample(out[0].double(), out[1].double(), args[6].double())
    for i, (a, b, e) in enumerate(zip(out, ref, exact)):
        if a is None:
            continue
        scale = (scales or {}).get(i, 1.0)
        err_fused, err_formula = op_err(a, e, scale), op_err(b, e, scale)
        assert err_fused <= max(OP_TOL[dtype], 8 * err_formula), (i, err_fused, err_formula)


@settings(deadline=None)  # a correctness property: no per-example time limit (slow under sanitizers)
@given(op_inputs)
def test_property_fused_ops_match_formula(p):
    torch.manual_seed(p["seed"])
    state = op_state((p["batch"], p["latent"]), p["dtype"])
    g_mu, g_lv = torch_impl.elbo_grad(state["grad_z"], state["mu"], state["logvar"], state["eps"], p["scale"],
                                      p["kl_weight"])
    lo, hi = min(g_mu.norm(), g_lv.norm()).item(), max(g_mu.norm(), g_lv.norm()).item()
    max_norm = {"off": 0.0, "inactive": 3 * hi, "active": 0.5 * lo}[p["clip"]]
    impl = _impl(p["backend"])
    fwd = (state["mu"], state["logvar"], state["p_mu"], state["p_logvar"], state["eps"], state["grad_z"],
           state["eps_next"], p["scale"], p["kl_weight"], p["lr"], p["lr"], p["momentum"], max_norm)
    _assert_as_accurate_as_formula(impl.forward_step, torch_impl.forward_step, fwd, p["dtype"])
    norms = torch_impl.forward_step(*fwd)[5]
    step = {FD_EXACT: 0.0, FD_FORWARD: 1e-3, FD_CENTRAL: 2e-3}[p["fd_mode"]]
    rev = (torch.randn_like(state["mu"]), torch.randn_like(state["mu"]), state["p_mu"], state["p_logvar"],
           state["mu"], state["logvar"], state["eps"], state["grad_z"], norms, p["scale"], p["kl_weight"], p["lr"],
           p["lr"], max_norm, p["fd_mode"], step)
    _assert_as_accurate_as_formula(impl.reverse_direction, torch_impl.reverse_direction, rev, p["dtype"],
                                   scales={6: 0.5 / step} if p["fd_mode"] == FD_CENTRAL else None)
    t = lambda: torch.randn_like(state["mu"])  # noqa: E731
    upd = (t(), t(), t(), t(), t(), t(), state["logvar"], state["eps"], state["grad_z"], t(), t(), 1.0 / max(step, 1e-3),
           p["scale"], p["kl_weight"], p["momentum"])
    _assert_as_accurate_as_formula(impl.reverse_update, torch_impl.reverse_update, upd, p["dtype"])


refine_inputs = st.fixed_dictionaries({
    "batch": st.integers(1, 12), "latent": st.integers(1, 6), "steps": st.integers(1, 6),
    "lr": st.floats(0.1, 1.5), "momentum": st.floats(0.0, 0.9), "clip": st.booleans(),
    "kl_weight": st.floats(0.0, 1.5), "reduction": st.sampled_from(["mean", "sum", 0.3]),
    "hvp": st.sampled_from(["fd_central", "fd_forward", "exact"]), "backend": st.sampled_from(BACKENDS),
    "seed": st.integers(0, 2**31 - 1)})


@PROPERTY
@given(refine_inputs)
def test_property_refine_gradients_match_unrolled(p):
    """float64: fd_central within 1e-7, fd_forward within 1e-6, exact to rounding."""
    torch.manual_seed(p["seed"])
    b, d = p["batch"], p["latent"]
    dec = MLPDecoder(d, hidden=8, vocab=5, length=3).double()
    x = torch.randint(0, 5, (b, 3))
    mu0 = (0.5 * torch.randn(b, d, dtype=torch.float64)).requires_grad_(True)
    lv0 = (0.3 * torch.randn(b, d, dtype=torch.float64)).requires_grad_(True)
    noise = torch.randn(p["steps"], b, d, dtype=torch.float64)
    lr = p["lr"] / b if p["reduction"] == "sum" else p["lr"]
    kw = dict(steps=p["steps"], lr=lr, momentum=p["momentum"], kl_weight=p["kl_weight"], reduction=p["reduction"],
              noise=noise)
    nll = lambda z: dec.nll(x, z)  # noqa: E731
    with torch.no_grad():  # a clip threshold that bites in the early steps
        z0 = (mu0 + torch.exp(0.5 * lv0) * noise[0]).requires_grad_(True)
    with torch.enable_grad():
        gz = torch.autograd.grad(nll(z0).sum(), z0)[0]
    kw["max_grad_norm"] = 0.5 * float((gz + p["kl_weight"] * mu0.detach()).norm()) / (b if p["reduction"] == "mean" else 1) \
        if p["clip"] else 0.0
    w1, w2 = torch.randn(b, d, dtype=torch.float64), torch.randn(b, d, dtype=torch.float64)
    params = list(dec.parameters())

    def grads(method, **extra):
        mk, lk = method(mu0, lv0, nll, params, **kw, **extra)
        loss = (w1 * mk).sum() + (w2 * lk).sum() + dec.nll(x, mk).mean()
        return torch.autograd.grad(loss, [mu0, lv0, *params])

    ours = grads(sf.refine, hvp=p["hvp"], backend=p["backend"], backward_clip=None)
    ref = grads(unrolled)
    # Each gradient's error relative to its norm, floored at a tenth of the largest
    # gradient's: with B = D = 1 and lr = 1 a step can nearly annihilate the dependence
    # on lambda_0 (dF/dmu0 cancels to ~0), and a relative error of a cancelled quantity
    # measures the draw, not the difference quotient.
    largest = max(r.norm().item() for r in ref)
    errs = [(a - r).norm().item() / max(r.norm().item(), 0.1 * largest) for a, r in zip(ours, ref)]
    worst = max(errs)
    assert worst <= {"fd_central": 1e-7, "fd_forward": 1e-6, "exact": 1e-10}[p["hvp"]], (p, errs)


# ----------------------------------------------------------------------------------- fuzzing
BAD_TENSORS = [
    lambda: torch.randn(4, 3)[:, :2], lambda: torch.randn(4), lambda: torch.randn(4, 3, 2), lambda: torch.randn(0, 3),
    lambda: torch.randn(4, 0), lambda: torch.randn(4, 3).half(), lambda: torch.randn(4, 3).bfloat16(),
    lambda: torch.randint(0, 3, (4, 3)), lambda: torch.randn(4, 3, dtype=torch.float64),
    lambda: torch.randn(3, 4).t(), lambda: torch.full((4, 3), float("nan")), lambda: torch.randn(4, 3)[::2],
    lambda: torch.randn(4, 3, dtype=torch.complex64),
]
BAD_SCALARS = [float("nan"), float("inf"), -1.0, 0.0, 1e300, -7]


@pytest.mark.skipif(not HAVE_CPP, reason="compiled kernels not built")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["sample", "forward_step", "reverse_direction", "reverse_update", "accumulate_"]),
       st.integers(0, 20), st.integers(0, len(BAD_TENSORS) - 1), st.integers(0, 20),
       st.sampled_from(BAD_SCALARS), st.booleans())
def test_fuzz_compiled_ops_never_crash(name, position, bad_tensor, scalar_position, bad_scalar, swap_none):
    """Malformed arguments raise a Python exception (or are handled); they never crash a kernel."""
    st_ = op_state((4, 3), torch.float32)
    t = lambda: torch.randn(4, 3)  # noqa: E731
    args = {
        "sample": [st_["mu"], st_["logvar"], st_["eps"]],
        "forward_step": [t(), t(), t(), t(), t(), t(), t(), 0.25, 1.0, 1.0, 1.0, 0.5, 1.0],
        "reverse_direction": [t(), t(), t(), t(), t(), t(), t(), t(), torch.rand(2), 0.25, 1.0, 1.0, 1.0, 1.0, 2, 1e-3],
        "reverse_update": [t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), 10.0, 0.25, 1.0, 0.5],
        "accumulate_": [[torch.randn(5), torch.randn(2, 2)], [torch.randn(5), None]],
    }[name]
    tensor_slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    scalar_slots = [i for i, a in enumerate(args) if isinstance(a, (float, int)) and not isinstance(a, bool)]
    if name == "accumulate_":
        args[position % 2] = [BAD_TENSORS[bad_tensor](), args[position % 2][1]]
    else:
        args[tensor_slots[position % len(tensor_slots)]] = None if (swap_none and name != "sample") else \
            BAD_TENSORS[bad_tensor]()
        if scalar_slots:
            args[scalar_slots[scalar_position % len(scalar_slots)]] = bad_scalar
    op = getattr(torch.ops.savae_fast, name).default
    try:
        out = op(*args)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return
    for o in (out if isinstance(out, tuple) else (out,)):  # accepted inputs give well-formed outputs
        assert o is None or isinstance(o, torch.Tensor)


# ------------------------------------------------------------------------- non-finite values
def _nan_decoder(step_with_nan: int):
    calls = {"n": 0}

    def nll(z):
        calls["n"] += 1
        out = (z ** 2).sum(1)
        if calls["n"] == step_with_nan + 1:
            out = out * float("nan")
        return out

    return nll


def test_nonfinite_forward_raises_naming_the_step():
    mu = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(FloatingPointError, match="inner step 2"):
        sf.refine(mu, torch.zeros(4, 3), _nan_decoder(2), steps=5)
    with torch.no_grad(), pytest.raises(FloatingPointError, match="inner step 1"):
        sf.refine(mu, torch.zeros(4, 3), _nan_decoder(1), steps=5)


def test_nonfinite_zero_and_ignore():
    mu = torch.randn(4, 3, requires_grad=True)
    mu_k, lv_k = sf.refine(mu, torch.zeros(4, 3), _nan_decoder(2), steps=5, on_nonfinite="zero")
    (mu_k.sum() + lv_k.sum()).backward()
    assert torch.isfinite(mu_k).all() and torch.isfinite(mu.grad).all()
    mu_k, _ = sf.refine(mu.detach(), torch.zeros(4, 3), _nan_decoder(2), steps=5, on_nonfinite="ignore")
    assert not torch.isfinite(mu_k).all()
    with pytest.raises(ValueError, match="on_nonfinite"):
        sf.refine(mu, torch.zeros(4, 3), _nan_decoder(2), steps=5, on_nonfinite="skip")


@pytest.mark.parametrize("hvp", ["fd_central", "fd_forward", "fd_adaptive", "exact"])
def test_nonfinite_in_backward_raises_and_no_nan_reaches_params(hvp):
    w = torch.ones(3, requires_grad=True)
    calls = {"n": 0}

    def nll(z):
        calls["n"] += 1
        out = ((z - w) ** 2).sum(1)
        return out * float("nan") if calls["n"] in (6, 7) else out  # backward evaluations (forward uses 5)

    mu = torch.randn(4, 3, requires_grad=True)
    mu_k, lv_k = sf.refine(mu, torch.zeros(4, 3), nll, [w], steps=5, hvp=hvp)
    with pytest.raises(FloatingPointError, match="backward"):
        (mu_k.sum() + lv_k.sum()).backward()
    assert w.grad is None or torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logvar", [-30.0, 30.0])
def test_extreme_logvar_float32(backend, logvar):
    """logvar = +-30: exp(logvar/2) stays finite and accurate in float32 (no clamping)."""
    b, d = 6, 3
    mu = torch.randn(b, d)
    lv = torch.full((b, d), logvar)
    eps, gz = torch.randn(b, d), torch.randn(b, d)
    be = _impl(backend)
    args = (mu, lv, torch.zeros(b, d), torch.zeros(b, d), eps, gz, torch.randn(b, d), 1 / b, 1.0, 1e-3, 1e-3, 0.5,
            5.0)
    out = be.forward_step(*args)
    ref = torch_impl.forward_step(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    for a, r in zip(out, ref):
        assert torch.isfinite(a).all()
        assert rel_err(a, r) < 1e-5
    # refine end to end: finite gradients
    lin = torch.randn(d, dtype=torch.float64)
    nll = lambda z: (z * lin.to(z.dtype)).sum(1) + 0.5 * (z ** 2).sum(1) * 1e-6  # noqa: E731
    mu0 = mu.clone().requires_grad_(True)
    lv0 = lv.clone().requires_grad_(True)
    mk, lk = sf.refine(mu0, lv0, nll, steps=4, lr=1e-3, hvp="fd_central", backend=backend)
    g = torch.autograd.grad(mk.sum() + lk.sum(), [mu0, lv0])
    assert all(torch.isfinite(t).all() for t in g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hvp", ["fd_forward", "fd_central", "exact"])
def test_clip_jacobian_at_logvar_28_float32_matches_float64(backend, hvp):
    """B = D = 32, reduction "sum", logvar ~ 28: the logvar gradient's norm (~2e13) cubed
    overflows float32, as the clip Jacobian's coefficient was once computed. The float32
    gradient through refine stays within float32 rounding of float64 unrolled autograd."""
    b = d = 32
    lin = torch.randn(d, dtype=torch.float64)
    nll = lambda z: (z * lin.to(z.dtype)).sum(1) + 1e-3 * torch.tanh(z).pow(2).sum(1)  # noqa: E731
    mu, lv = torch.randn(b, d, dtype=torch.float64), 28 + torch.randn(b, d, dtype=torch.float64)
    noise, w = torch.randn(4, b, d, dtype=torch.float64), torch.randn(b, d, dtype=torch.float64)

    def grads(method, dtype, **kw):
        m0, l0 = mu.to(dtype).requires_grad_(), lv.to(dtype).requires_grad_()
        mk, lk = method(m0, l0, nll, steps=4, noise=noise.to(dtype), reduction="sum", **kw)
        return torch.autograd.grad((w.to(dtype) * mk).sum() + (w.to(dtype) * lk).sum(), [m0, l0])

    ref = grads(unrolled, torch.float64)
    got = grads(sf.refine, torch.float32, backend=backend, hvp=hvp)
    assert max_rel_err(got, ref)[0] < 1e-5  # float32 unrolled: ~5e-7; the cube overflowing: ~1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_logvar_46_steps_or_raises(backend):
    """logvar 46 in float32 (B 4, D 32): the logvar gradient (~1e19 per element) is finite but its
    squares overflow. The C++ and pure-PyTorch backends sum them in double and step as float64
    does; a backend whose norm overflows raises by name instead of silently not moving."""
    b, d = 4, 32
    mu, lv = torch.randn(b, d), torch.full((b, d), 46.0)
    noise = torch.randn(3, b, d)
    nll = lambda z: 1e-3 * z.sum(1)  # noqa: E731
    ref = sf.refine(mu.double(), lv.double(), nll, steps=3, noise=noise.double(), backend="torch")
    try:
        got = sf.refine(mu, lv, nll, steps=3, noise=noise, backend=backend)
    except FloatingPointError as exc:
        assert backend == "triton" and "norm of the inner objective's gradient w.r.t. logvar" in str(exc)
        return
    assert got[1].sub(lv).abs().max() > 0.1  # logvar moved
    assert max_rel_err(got, ref)[0] < 1e-5


# ------------------------------------------------------------------------- compile, threads
def test_ops_trace_under_torch_compile_fullgraph():
    if not HAVE_CPP:
        pytest.skip("compiled kernels not built")
    st_ = op_state((5, 4), torch.float32)

    def f(mu, lv, eps, gz, en):
        out = sf.ops.forward_step(mu, lv, torch.zeros_like(mu), torch.zeros_like(mu), eps, gz, en, scale=0.2,
                                  kl_weight=1.0, lr_mu=1.0, lr_logvar=1.0, momentum=0.5, max_grad_norm=1.0)
        return out[0] * 2 + out[4]

    args = (st_["mu"], st_["logvar"], st_["eps"], st_["grad_z"], st_["eps_next"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(*args), f(*args))


def test_model_calling_refine_compiles_with_one_graph_break():
    torch.manual_seed(0)
    enc = torch.nn.Linear(6, 8)
    dec = MLPDecoder(4, hidden=8, vocab=5, length=3)
    x_feat, x = torch.randn(10, 6), torch.randint(0, 5, (10, 3))
    noise = torch.randn(3, 10, 4)

    def step(x_feat):
        mu, lv = enc(x_feat).chunk(2, dim=1)
        mk, lk = sf.refine(mu, lv, lambda z: dec.nll(x, z), dec.parameters(), steps=3, noise=noise)
        return (dec.nll(x, mk) + 0.5 * (mk ** 2 + lk.exp() - lk).sum(1)).mean()

    explanation = torch._dynamo.explain(step)(x_feat)
    # at most one break, at refine (it differentiates the decoder inside; newer torch calls it opaquely)
    assert explanation.graph_break_count <= 1, explanation.break_reasons
    params = [*enc.parameters(), *dec.parameters()]
    ref = torch.autograd.grad(step(x_feat), params)
    out = torch.autograd.grad(torch.compile(step, backend="aot_eager")(x_feat), params)
    assert max_rel_err(out, ref)[0] < 1e-6


def test_fullgraph_compile_cannot_include_refine():
    """As README says: refine is excluded from compilation (torch.compiler.disable), so a
    fullgraph=True compile of a step calling it fails instead of silently breaking the graph."""
    dec = MLPDecoder(4, hidden=8, vocab=5, length=3)
    x, mu = torch.randint(0, 5, (6, 3)), torch.randn(6, 4)

    def step(mu):
        return sf.refine(mu, torch.zeros_like(mu), lambda z: dec.nll(x, z), steps=2)[0].sum()

    with pytest.raises(Exception, match="(?i)disable|skip|graph break|unsupported"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(mu)


def test_refine_from_two_threads_on_different_models():
    def problem(seed):
        g = torch.Generator().manual_seed(seed)
        dec = MLPDecoder(4, hidden=8, vocab=5, length=3).double()
        with torch.no_grad():
            for p in dec.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        x = torch.randint(0, 5, (6, 3), generator=g)
        return dec, x, torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(8, 6, 4, generator=g,
                                                                                         dtype=torch.float64)

    def run(dec, x, mu, noise, hvp):
        mu = mu.clone().requires_grad_(True)
        mk, lk = sf.refine(mu, torch.zeros_like(mu), lambda z: dec.nll(x, z), dec.parameters(), steps=8, noise=noise,
                           hvp=hvp)
        return torch.autograd.grad(mk.sum() + lk.sum(), [mu, *dec.parameters()])

    problems = [problem(s) for s in (1, 2)]
    expected = [run(*pr, hvp) for pr, hvp in zip(problems, ("fd_forward", "fd_central"))]
    results, errors = [None, None], []

    def worker(i, hvp):
        try:
            for _ in range(5):
                results[i] = run(*problems[i], hvp)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, hvp)) for i, hvp in enumerate(("fd_forward", "fd_central"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def _deterministic_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    dec = MLPDecoder(4, hidden=8, vocab=5, length=3).double()
    x = torch.randint(0, 5, (6, 3), generator=g)
    return dec, x, torch.randn(6, 4, generator=g, dtype=torch.float64)


def _default_refine_step(dec, x, mu0):
    """One refine forward + backward with the default options (noise drawn, RNG state preserved)."""
    mu = mu0.clone().requires_grad_(True)
    mk, lk = sf.refine(mu, torch.zeros_like(mu), lambda z: dec.nll(x, z), dec.parameters(), steps=6)
    (mk.sum() + lk.sum()).backward()
    return mk.detach()


@pytest.fixture
def idle_thread():
    """Another Python thread alive during the test (as a data loader's or a logger's would be)."""
    stop = threading.Event()
    th = threading.Thread(target=stop.wait)
    th.start()
    yield th
    stop.set()
    th.join()


def test_default_options_do_not_rewind_the_generators_for_other_threads():
    """A thread drawing random numbers while another runs refine (deterministic decoder,
    default options) never sees a value twice, and concurrent default-noise refine calls
    draw different noise."""
    dec, x, mu0 = _deterministic_problem()
    draws, outputs, errors = [], [[], []], []
    running = threading.Event()
    running.set()

    def drawer():
        while running.is_set():
            draws.append(torch.randint(0, 2**62, (16,)))

    def refiner(i):
        try:
            for _ in range(25):
                outputs[i].append(_default_refine_step(dec, x, mu0))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=drawer)] + [threading.Thread(target=refiner, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads[1:]:
        th.join()
    running.clear()
    threads[0].join()
    assert not errors, errors
    values = torch.cat(draws)
    assert values.numel() > 100 and values.unique().numel() == values.numel(), "a drawing thread saw repeats"
    results = torch.stack(outputs[0] + outputs[1]).flatten(1)
    assert results.unique(dim=0).shape[0] == results.shape[0], "two refine calls drew the same noise"


@pytest.mark.parametrize("with_thread", [False, True])
def test_deterministic_decoder_never_sets_the_generators(monkeypatch, request, with_thread):
    """Found by the probe of the first decoder call, once per refine call (an idle thread, as
    tqdm's monitor or a data loader's, changes nothing)."""
    from savae_fast.refine import probe

    if with_thread:
        request.getfixturevalue("idle_thread")
    calls, probes = [], []
    real, real_run = torch.set_rng_state, probe.DecoderProbe.run
    monkeypatch.setattr(torch, "set_rng_state", lambda state: (calls.append(1), real(state)))
    monkeypatch.setattr(probe.DecoderProbe, "run", lambda self, *a: (probes.append(1), real_run(self, *a))[1])
    _default_refine_step(*_deterministic_problem())
    assert calls == [] and probes == [1]


def test_with_other_threads_alive_the_probe_finds_dropout_at_the_first_step(monkeypatch, idle_thread):
    """Dropout with another thread alive (whose draws could move the generators as well): the
    probe of the first call sees the dropout operator itself; replay follows."""
    from savae_fast.refine import probe
    from savae_fast.testing import make_problem, refine_grads

    found = []
    real_check = probe.DecoderProbe.check
    monkeypatch.setattr(probe.DecoderProbe, "check", lambda self: (found.append(self.draws), real_check(self))[1])
    p = make_problem("mlp", torch.float64, batch=6, latent=3, steps=4, dropout=0.5)
    p.decoder.train()
    refine_grads(p)
    assert found == [True]
