"""RefineGraph, mixed precision, sync-free CUDA paths (the CUDA parts need a GPU)."""

import pytest
import torch

import savae_fast as sf
from savae_fast.testing import make_problem, max_rel_err, reference_grads

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


@pytest.mark.parametrize("hvp,tol", [("fd_central", 5e-3), ("fd_forward", 3e-2), ("exact", 3e-3)])
def test_decoder_under_autocast(hvp, tol, seed):
    """Mixed precision: refine called inside a bfloat16 autocast region. The decoder runs in
    bfloat16; the variational state, the Gaussian math and the gradients stay float32, and
    the default finite-difference step follows the decoder's precision."""
    p = make_problem("lstm", torch.float32, batch=32, latent=8, steps=10)
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
