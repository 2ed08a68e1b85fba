"""The two references: unrolled (ground truth) and optim_n2n (the authors' algorithm)."""

import pytest
import torch

from savae_fast.reference import optim_n2n, unrolled
from savae_fast.testing import make_problem, max_rel_err, reference_grads, rel_err


def _n2n_grads(p, **kw):
    mu0 = p.mu0.clone().requires_grad_(True)
    lv0 = p.logvar0.clone().requires_grad_(True)
    mu_k, lv_k = optim_n2n(mu0, lv0, p.nll_fn, p.params, steps=p.noise.shape[0], noise=p.noise, **kw)
    return (mu_k.detach(), lv_k.detach()), torch.autograd.grad(p.elbo_loss(mu_k, lv_k), [mu0, lv0, *p.params])


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_optim_n2n_forward_is_the_same_optimiser(kind):
    p = make_problem(kind, torch.float64, batch=8, latent=4, steps=6)
    (mu_n, lv_n), _ = _n2n_grads(p, max_grad_norm=0.1)
    (mu_r, lv_r), _ = reference_grads(p, max_grad_norm=0.1)
    assert rel_err(mu_n, mu_r) < 1e-13 and rel_err(lv_n, lv_r) < 1e-13


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_optim_n2n_backward_approximates_exact_without_clipping(kind, seed):
    """Without clipping the authors' scheme is a plain lambda-space one-sided difference:
    in float64 with eps 1e-5 it is close to, but not exactly, the true gradient."""
    p = make_problem(kind, torch.float64, batch=8, latent=4, steps=6)
    _, grads = _n2n_grads(p, max_grad_norm=0.0)
    _, ref = reference_grads(p, max_grad_norm=0.0)
    worst, errs = max_rel_err(grads, ref)
    assert 1e-9 < worst < 1e-3, f"seed={seed} {errs}"


def test_unrolled_is_differentiable_through_every_step():
    p = make_problem("mlp", torch.float64, batch=4, latent=3, steps=3)
    mu0 = p.mu0.clone().requires_grad_(True)
    lv0 = p.logvar0.clone().requires_grad_(True)
    f = lambda m, l: sum(unrolled(m, l, p.nll_fn, steps=3, noise=p.noise, max_grad_norm=0.3)).sum()  # noqa: E731
    assert torch.autograd.gradcheck(f, (mu0, lv0))


def _independent_unroll(mu, logvar, nll_fn, noise, lr=1.0, momentum=0.5, max_norm=5.0):
    """The inner optimiser written out in this test, its inner gradients w.r.t. leaves of their
    own at every step (nothing of the caller's tensors can leak into them)."""
    from savae_fast.gaussian import gaussian_kl

    p_mu, p_lv = torch.zeros_like(mu), torch.zeros_like(logvar)
    scale = 1.0 / mu.shape[0]
    for k in range(noise.shape[0]):
        m, lv = mu.detach().requires_grad_(True), logvar.detach().requires_grad_(True)
        loss = scale * (nll_fn(m + torch.exp(0.5 * lv) * noise[k]) + gaussian_kl(m, lv)).sum()
        g_mu, g_lv = torch.autograd.grad(loss, (m, lv))
        g_mu = g_mu * min(1.0, max_norm / (g_mu.norm().item() + 1e-6))
        g_lv = g_lv * min(1.0, max_norm / (g_lv.norm().item() + 1e-6))
        p_mu, p_lv = momentum * p_mu - g_mu, momentum * p_lv - g_lv
        mu, logvar = mu + lr * p_mu, logvar + lr * p_lv
    return mu.detach(), logvar.detach()


def test_unrolled_with_mu_and_logvar_the_same_tensor():
    """unrolled(t, t): the same forward as with two copies, and t's gradient the sum of theirs."""
    p = make_problem("mlp", torch.float64, batch=6, latent=3, steps=4)
    t = (0.3 * torch.randn(6, 3, dtype=torch.float64)).requires_grad_(True)
    same = unrolled(t, t, p.nll_fn, steps=4, noise=p.noise)
    a, b = t.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)
    two = unrolled(a, b, p.nll_fn, steps=4, noise=p.noise)
    forward = _independent_unroll(t.detach(), t.detach(), p.nll_fn, p.noise)
    assert rel_err(same[0], forward[0]) < 1e-13 and rel_err(same[1], forward[1]) < 1e-13
    (g_same,) = torch.autograd.grad(p.elbo_loss(*same), t)
    g_a, g_b = torch.autograd.grad(p.elbo_loss(*two), (a, b))
    assert rel_err(g_same, g_a + g_b) < 1e-12


def test_unrolled_does_not_fire_a_hook_of_mu_inside_its_inner_gradients():
    p = make_problem("mlp", torch.float64, batch=6, latent=3, steps=4)
    leaf = p.mu0.clone().requires_grad_(True)
    mu = leaf * 1.0  # non-leaf, as an encoder's output
    calls = []
    mu.register_hook(lambda g: calls.append(1))
    out = unrolled(mu, p.logvar0, p.nll_fn, steps=4, noise=p.noise)
    assert calls == []
    p.elbo_loss(*out).backward()
    assert calls == [1]


def test_unrolled_when_nll_fn_closes_over_mu():
    """A decoder conditioned on a tensor computed from mu: the inner objective's gradient is the
    decoder's at fixed conditioning (the closure's dependence on mu reaches the caller's gradient,
    not the inner steps)."""
    p = make_problem("mlp", torch.float64, batch=6, latent=3, steps=4)
    leaf = p.mu0.clone().requires_grad_(True)
    cond = torch.tanh(leaf).sum(1, keepdim=True)  # computed from mu
    nll = lambda z: p.nll_fn(z) + (cond * z).sum(1)  # noqa: E731
    out = unrolled(leaf, p.logvar0, nll, steps=4, noise=p.noise)
    forward = _independent_unroll(leaf.detach(), p.logvar0, lambda z: p.nll_fn(z) + (cond.detach() * z).sum(1),
                                  p.noise)
    assert rel_err(out[0], forward[0]) < 1e-13 and rel_err(out[1], forward[1]) < 1e-13
    # the refinement with cond as one of its parameters gives the same gradient
    (g_ref,) = torch.autograd.grad(p.elbo_loss(*out), leaf, retain_graph=True)
    import savae_fast as sf

    mk, lk = sf.refine(leaf, p.logvar0, nll, [cond, *p.params], steps=4, noise=p.noise, hvp="exact")
    (g,) = torch.autograd.grad(p.elbo_loss(mk, lk), leaf)
    assert rel_err(g, g_ref) < 1e-10
