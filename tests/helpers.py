"""Decoders, problems and error measures shared by the tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import savae_fast as sf
from savae_fast.models import GatedPixelCNNDecoder, LSTMDecoder
from savae_fast.reference import gaussian_kl, unrolled


class MLPDecoder(nn.Module):
    """z -> tanh MLP -> independent categorical tokens (twice differentiable)."""

    def __init__(self, latent_dim: int, hidden: int = 32, vocab: int = 9, length: int = 6, dropout: float = 0.0):
        super().__init__()
        self.vocab, self.length = vocab, length
        self.l1 = nn.Linear(latent_dim, hidden)
        self.l2 = nn.Linear(hidden, vocab * length)
        self.drop = nn.Dropout(dropout)

    def nll(self, x, z):
        logits = self.l2(self.drop(torch.tanh(self.l1(z)))).view(-1, self.length, self.vocab)
        return F.cross_entropy(logits.reshape(-1, self.vocab), x.reshape(-1), reduction="none").view(
            -1, self.length).sum(1)


def make_decoder(kind: str, latent_dim: int, dropout: float = 0.0) -> nn.Module:
    if kind == "mlp":
        return MLPDecoder(latent_dim, dropout=dropout)
    if kind == "lstm":
        return LSTMDecoder(vocab_size=11, latent_dim=latent_dim, embed_dim=8, hidden_dim=16, dropout=dropout)
    if kind == "pixelcnn":
        return GatedPixelCNNDecoder(latent_dim, image_size=6, channels=6, kernels=(5, 3), cond_channels=2)
    raise ValueError(kind)


def make_tokens(kind: str, batch: int) -> torch.Tensor:
    if kind == "mlp":
        return torch.randint(0, 9, (batch, 6))
    if kind == "pixelcnn":
        return (torch.rand(batch, 1, 6, 6) < 0.4).double()
    x = torch.randint(1, 11, (batch, 7))  # no padding (index 0) in the tests
    return x


@dataclass
class Problem:
    decoder: nn.Module
    x: torch.Tensor
    mu0: torch.Tensor
    logvar0: torch.Tensor
    noise: torch.Tensor
    final_eps: torch.Tensor
    unused: frozenset = frozenset()  # names of parameters the NLL does not depend on

    @property
    def params(self):
        return [q for n, q in self.decoder.named_parameters() if n not in self.unused]

    def nll_fn(self, z):
        return self.decoder.nll(self.x, z)

    def elbo_loss(self, mu_k, logvar_k):
        """The SA-VAE outer objective: single-sample negative ELBO at lambda_K."""
        z = mu_k + torch.exp(0.5 * logvar_k) * self.final_eps.to(mu_k.dtype)
        return (self.decoder.nll(self.x, z) + gaussian_kl(mu_k, logvar_k)).mean()

    def to(self, dtype=None, device=None) -> "Problem":
        dtype = dtype or self.mu0.dtype
        dec = copy.deepcopy(self.decoder).to(dtype=dtype, device=device)
        x = (self.x.to(dtype) if self.x.is_floating_point() else self.x).to(device)

        def move(t):
            return t.detach().to(dtype=dtype, device=device)

        return Problem(dec, x, move(self.mu0), move(self.logvar0), move(self.noise), move(self.final_eps),
                       self.unused)


def make_problem(kind: str, dtype=torch.float64, batch: int = 32, latent: int = 8, steps: int = 10,
                 dropout: float = 0.0) -> Problem:
    dec = make_decoder(kind, latent, dropout).to(dtype)
    x = make_tokens(kind, batch)
    x = x.to(dtype) if x.is_floating_point() else x
    # parameters the NLL does not reach (a PixelCNN's last vertical stack) get no gradient
    z = torch.zeros(batch, latent, dtype=dtype, requires_grad=True)
    names, tensors = zip(*dec.named_parameters())
    grads = torch.autograd.grad(dec.nll(x, z).sum(), tensors, allow_unused=True)
    return Problem(
        decoder=dec,
        x=x,
        unused=frozenset(n for n, g in zip(names, grads) if g is None),
        mu0=0.5 * torch.randn(batch, latent, dtype=dtype),
        logvar0=0.3 * torch.randn(batch, latent, dtype=dtype),
        noise=torch.randn(steps, batch, latent, dtype=dtype),
        final_eps=torch.randn(batch, latent, dtype=dtype),
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both vanish)."""
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else (a - b).norm().item()


def step0_grad_norm(p: Problem) -> float:
    """Smaller of |g_mu| and |g_logvar| at the first inner step (mean reduction, beta 1)."""
    z = (p.mu0 + torch.exp(0.5 * p.logvar0) * p.noise[0]).detach().requires_grad_(True)
    (gz,) = torch.autograd.grad(p.nll_fn(z).sum(), z)
    s = 1.0 / p.mu0.shape[0]
    g_mu = s * (gz + p.mu0)
    g_lv = s * (0.5 * gz * p.noise[0] * torch.exp(0.5 * p.logvar0) + 0.5 * torch.expm1(p.logvar0))
    return min(g_mu.norm().item(), g_lv.norm().item())


def refine_grads(p: Problem, objective="elbo", **kw):
    """Gradients of the objective w.r.t. (mu0, logvar0, *params) through sf.refine."""
    mu0 = p.mu0.detach().clone().requires_grad_(True)
    lv0 = p.logvar0.detach().clone().requires_grad_(True)
    mu_k, lv_k = sf.refine(mu0, lv0, p.nll_fn, p.params, steps=p.noise.shape[0], noise=p.noise, **kw)
    loss = _objective(p, objective, mu_k, lv_k)
    return (mu_k.detach(), lv_k.detach()), torch.autograd.grad(loss, [mu0, lv0, *p.params])


def reference_grads(p: Problem, objective="elbo", **kw):
    """The same through reference.unrolled, in float64 (exact ground truth)."""
    q = p.to(torch.float64)
    mu0 = q.mu0.clone().requires_grad_(True)
    lv0 = q.logvar0.clone().requires_grad_(True)
    kw = {k: v for k, v in kw.items() if k not in ("hvp", "fd_eps", "backend", "preserve_rng_state")}
    mu_k, lv_k = unrolled(mu0, lv0, q.nll_fn, q.params, steps=q.noise.shape[0], noise=q.noise, **kw)
    loss = _objective(q, objective, mu_k, lv_k)
    return (mu_k.detach(), lv_k.detach()), torch.autograd.grad(loss, [mu0, lv0, *q.params])


def _objective(p: Problem, objective, mu_k, lv_k):
    if objective == "elbo":
        return p.elbo_loss(mu_k, lv_k)
    # a fixed random linear functional of lambda_K: the refinement path only
    gen = torch.Generator().manual_seed(1234)
    w1 = torch.randn(mu_k.shape, generator=gen).to(mu_k)
    w2 = torch.randn(mu_k.shape, generator=gen).to(mu_k)
    return (w1 * mu_k).sum() + (w2 * lv_k).sum()


def max_rel_err(grads, ref) -> tuple[float, list[float]]:
    errs = [rel_err(a, b) for a, b in zip(grads, ref)]
    return max(errs), errs
