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
