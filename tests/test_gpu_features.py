"""RefineGraph, mixed precision, sync-free CUDA paths (the CUDA parts need a GPU)."""

import pytest
import torch

import savae_fast as sf
from savae_fast.gaussian import gaussian_kl
from savae_fast.testing import cpu_bfloat16_lstm, make_problem, max_rel_err, reference_grads

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_refine_graph_matches_refine_on_cpu():
    p = make_problem("lstm", torch.float32, batch=6, latent=4, steps=5)
    graph = sf.RefineGraph(p.nll_fn, steps=5, max_grad_norm=1.0)
    out = graph(p.mu0, p.logvar0, p.noise)
    ref = sf.refine(p.mu0, p.logvar0, p.nll_fn, steps=5, noise=p.noise, max_grad_norm=1.0)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    with pytest.raises(TypeError, match="'hvp' does not apply"):
        sf.RefineGraph(p.nll_fn, hvp="exact")
    with pytest.raises(ValueError, match="'noise' must have shape"):
        graph(p.mu0, p.logvar0, p.noise[:2])


@cuda
@pytest.mark.cuda
def test_refine_graph_capture_replays_identically():
    p = make_problem("mlp", torch.float32, batch=16, latent=8, steps=10).to(device="cuda")
    nll, mu, lv, noise = p.nll_fn, p.mu0, p.logvar0, p.noise
    graph = sf.RefineGraph(nll, steps=10)
    eager = sf.refine(mu, lv, nll, steps=10, noise=noise)
    first = graph(mu, lv, noise)
    second = graph(mu * 1.0, lv * 1.0, noise)
    for out in (first, second):
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    assert len(graph._graphs) == 1


@cuda
@pytest.mark.cuda
def test_training_step_capturable_without_rng_preservation():
    p = make_problem("mlp", torch.float32, batch=16, latent=8, steps=6).to(device="cuda")
    dec, x, nll, noise = p.decoder, p.x, p.nll_fn, p.noise
    mu0 = p.mu0.clone().requires_grad_(True)
    params = list(dec.parameters())

    def step():
        mu_k, lv_k = sf.refine(mu0, p.logvar0, nll, params, steps=6, noise=noise, preserve_rng_state=False,
                                   on_nonfinite="ignore")
        return torch.autograd.grad(dec.nll(x, mu_k).mean() + lv_k.sum(), [mu0, *params])

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = step()
    g.replay()
    assert max_rel_err(captured, eager)[0] < 1e-6


@cuda
@pytest.mark.cuda
def test_preserve_rng_state_during_capture_gives_clear_error():
    mu = torch.zeros(4, 3, device="cuda", requires_grad=True)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="preserve_rng_state=False"):
        with torch.cuda.graph(g):
            sf.refine(mu, torch.zeros(4, 3, device="cuda"), lambda z: (z * z).sum(1), steps=2)
    # the host reads of on_nonfinite='raise' are refused by name too, before anything is recorded
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="on_nonfinite='raise'"):
        with torch.cuda.graph(g):
            sf.refine(mu, torch.zeros(4, 3, device="cuda"), lambda z: (z * z).sum(1), steps=2,
                      preserve_rng_state=False)
    # fd_adaptive reads its error estimates on the host in the backward
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="hvp='fd_adaptive'"):
        with torch.cuda.graph(g):
            sf.refine(mu, torch.zeros(4, 3, device="cuda"), lambda z: (z * z).sum(1), steps=2,
                      preserve_rng_state=False, on_nonfinite="ignore", hvp="fd_adaptive")


@pytest.mark.parametrize("kind", ["lstm", "mlp"])
@pytest.mark.parametrize("hvp,tol", [("fd_central", 5e-3), ("fd_forward", 3e-2), ("fd_richardson", 3e-3),
                                     ("fd_adaptive", 3e-3), ("exact", 3e-3)])
def test_decoder_under_autocast(kind, hvp, tol, seed):
    """Mixed precision: refine called inside a bfloat16 autocast region. The decoder runs in
    bfloat16; the variational state, the Gaussian math and the gradients stay float32, and
    the default finite-difference step follows the decoder's precision. (The LSTM needs
    oneDNN's bfloat16 RNN, i.e. AVX-512; the MLP runs on every CPU.)"""
    if kind == "lstm" and not cpu_bfloat16_lstm()[0]:
        pytest.skip(cpu_bfloat16_lstm()[1])
    p = make_problem(kind, torch.float32, batch=32, latent=8, steps=10)
    mu0 = p.mu0.clone().requires_grad_(True)
    lv0 = p.logvar0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu_k, lv_k = sf.refine(mu0, lv0, p.nll_fn, p.params, steps=10, noise=p.noise, hvp=hvp)
    assert mu_k.dtype == torch.float32 and lv_k.dtype == torch.float32
    grads = torch.autograd.grad(p.elbo_loss(mu_k, lv_k), [mu0, lv0, *p.params])
    assert all(g.dtype == torch.float32 for g in grads)
    _, ref = reference_grads(p)
    worst, errs = max_rel_err(grads, ref)
    assert worst < tol, f"seed={seed} {errs}"


def test_autocast_selects_low_precision_steps():
    from savae_fast.refine.precision import decoder_precision
    from savae_fast.refine.validation import DEFAULT_FD_EPS

    mu = torch.zeros(2, 2)
    assert decoder_precision(mu) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decoder_precision(mu) == torch.bfloat16
        assert DEFAULT_FD_EPS[("fd_central", torch.bfloat16)] > 10 * DEFAULT_FD_EPS[("fd_central", torch.float32)]


# --------------------------------------------------------------------------- GraphedStep
def _graphed_problem(device="cpu", steps=4, **refine_options):
    p = make_problem("mlp", torch.float32, batch=8, latent=4, steps=steps).to(device=device)
    enc = torch.nn.Linear(p.x.shape[1], 8).to(device)
    dec = p.decoder
    params = [*enc.parameters(), *dec.parameters()]
    options = {"preserve_rng_state": False, "on_nonfinite": "ignore", **refine_options}

    def loss_fn(x, noise, final_eps):
        mu, logvar = enc(x.float()).chunk(2, dim=1)
        mu_k, logvar_k = sf.refine(mu, logvar, lambda z: dec.nll(x, z), dec.parameters(), steps=steps,
                                   noise=noise, **options)
        z = mu_k + torch.exp(0.5 * logvar_k) * final_eps
        kl = gaussian_kl(mu_k, logvar_k)
        return (dec.nll(x, z) + kl).mean()

    return loss_fn, (p.x, p.noise, p.final_eps), params


def _eager_grads(loss_fn, inputs, params):
    for q in params:
        q.grad = None
    loss = loss_fn(*inputs)
    loss.backward()
    return loss.detach(), [q.grad.clone() for q in params]


def test_graphed_step_validates_its_arguments():
    loss_fn, inputs, params = _graphed_problem()
    with pytest.raises(TypeError, match="'loss_fn' must be callable"):
        sf.GraphedStep(None, inputs, params)
    with pytest.raises(TypeError, match=r"'example_inputs'\[1\] must be a Tensor, got int"):
        sf.GraphedStep(loss_fn, (inputs[0], 3), params)
    with pytest.raises(ValueError, match="'params' is empty"):
        sf.GraphedStep(loss_fn, inputs, [])
    with pytest.raises(ValueError, match=r"'params'\[0\] does not require grad"):
        sf.GraphedStep(loss_fn, inputs, [torch.zeros(2)])
    with pytest.raises(ValueError, match="'warmup' must be an int >= 1"):
        sf.GraphedStep(loss_fn, inputs, params, warmup=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_graphed_step_without_cuda_falls_back_to_eager_with_one_warning():
    loss_fn, inputs, params = _graphed_problem()
    with pytest.warns(RuntimeWarning, match="running the step eagerly .*CUDA is not available"):
        step = sf.GraphedStep(loss_fn, inputs, params)
    assert not step.captured and "CUDA is not available" in step.reason
    want_loss, want = _eager_grads(loss_fn, inputs, params)
    for q in params:
        q.grad = torch.full_like(q, 7.0)  # overwritten, not accumulated
    loss = step(*inputs)
    assert torch.equal(loss, want_loss) and all(torch.equal(q.grad, g) for q, g in zip(params, want))
    with pytest.raises(RuntimeError, match="cannot be captured as a CUDA graph: CUDA is not available"):
        sf.GraphedStep(loss_fn, inputs, params, fallback=False)


def test_graphed_step_refuses_other_shapes_by_input():
    """Also when running eagerly: a CPU dry run finds what a capture would refuse."""
    loss_fn, inputs, params = _graphed_problem()
    with pytest.warns(RuntimeWarning) if not torch.cuda.is_available() else _no_warning():
        step = sf.GraphedStep(loss_fn, inputs, params)
    x, noise, final_eps = inputs
    with pytest.raises(ValueError, match=rf"input 0 is \[8, 3\] int64 on \w+ but the step was captured for "
                                         rf"\[8, {x.shape[1]}\]"):
        step(x[:, :3], noise, final_eps)
    with pytest.raises(ValueError, match="input 2 is .* float64"):
        step(x, noise, final_eps.double())
    with pytest.raises(TypeError, match="expected 3 input tensors"):
        step(x, noise)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("options", [{}, {"hvp": "fd_richardson", "stack_points": True}], ids=["default", "stacked"])
def test_graphed_step_replay_equals_eager(options):
    """A deterministic decoder: every replay gives the eager loss and gradients, for new
    inputs too, and the gradients land in p.grad even after zero_grad(set_to_none=True).
    Stacked fd_richardson (four points per reverse step in one decoder call) captures too."""
    loss_fn, inputs, params = _graphed_problem("cuda", **options)
    step = sf.GraphedStep(loss_fn, inputs, params, fallback=False)
    assert step.captured
    other = (inputs[0].flip(0), torch.randn_like(inputs[1]), torch.randn_like(inputs[2]))
    for data in (inputs, other, inputs):
        want_loss, want = _eager_grads(loss_fn, data, params)
        for q in params:
            q.grad = None
        loss = step(*data)
        # replay may run other GEMM kernels than eager (rounding differences), which the
        # difference quotient divides by fd_eps = 1e-3: compare at fd_forward's float32 accuracy
        assert torch.allclose(loss, want_loss, rtol=1e-4, atol=1e-6)
        assert max_rel_err([q.grad for q in params], want)[0] < 1e-3


@cuda
@pytest.mark.cuda
def test_graphed_step_refuses_capture_with_rng_preservation():
    loss_fn, inputs, params = _graphed_problem("cuda", preserve_rng_state=True)
    with pytest.raises(RuntimeError, match="preserve_rng_state=False"):
        sf.GraphedStep(loss_fn, inputs, params, fallback=False)
    with pytest.warns(RuntimeWarning, match="running the step eagerly"):
        step = sf.GraphedStep(loss_fn, inputs, params)
    assert not step.captured
    want_loss, _ = _eager_grads(loss_fn, inputs, params)
    assert torch.allclose(step(*inputs), want_loss)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kind,dropout,hint", [("lstm", 0.0, "nn.LSTM and nn.GRU decoders on GPUs need hvp='exact'"),
                                               ("mlp", 0.5, "active dropout on a GPU needs hvp='exact'")])
def test_jvp_names_cuda_ops_without_forward_derivative(kind, dropout, hint):
    """PyTorch's CUDA LSTM cell (used where cuDNN is not) and CUDA dropout's backward have no
    forward-mode derivative in the torch versions measured: hvp='jvp' must say so and name the
    way out, or, once PyTorch has them, agree with 'exact' (same dropout masks: same seed)."""
    p = make_problem(kind, torch.float32, batch=4, latent=3, steps=2, dropout=dropout).to(device="cuda")
    p.decoder.train()
    mu0 = p.mu0.clone().requires_grad_(True)

    def grads(hvp):
        torch.manual_seed(0)
        mu_k, lv_k = sf.refine(mu0, p.logvar0, p.nll_fn, p.params, steps=2, noise=p.noise, hvp=hvp)
        return torch.autograd.grad(p.elbo_loss(mu_k, lv_k), [mu0, *p.params])

    try:
        jvp = grads("jvp")
    except RuntimeError as exc:
        assert hint in str(exc), str(exc)
    else:
        assert max_rel_err(jvp, grads("exact"))[0] < 1e-4
