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


# ----------------------------------------------------------------------------- TF32 emulation
# A GPU computing a float32 matmul in TF32 rounds both inputs to a 10-bit mantissa
# and accumulates in float32, in the forward and in the backward pass. These decoders
# do the same on CPU while the CPU's own TF32 setting,
# torch.backends.mkldnn.matmul.fp32_precision, is "tf32", so that refine's
# precision detection, its TF32 steps and fp32_precision="ieee" can be tested here.


def cpu_tf32_enabled() -> bool:
    return getattr(torch.backends.mkldnn.matmul, "fp32_precision", "none") == "tf32"


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TF32 (10 explicit mantissa bits), to nearest, ties to even."""
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


class _Tf32Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return round_to_tf32(a) @ round_to_tf32(b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return tf32_matmul(grad, b.transpose(-1, -2)), tf32_matmul(a.transpose(-1, -2), grad)


def tf32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as a TF32 GPU computes it (float32 under the CPU TF32 setting), differentiable
    (twice: the backward is made of the same products)."""
    if a.dtype != torch.float32 or not cpu_tf32_enabled():
        return a @ b
    return _Tf32Matmul.apply(a, b)


class Tf32MLPDecoder(MLPDecoder):
    def nll(self, x, z):
        h = torch.tanh(tf32_matmul(z, self.l1.weight.t()) + self.l1.bias)
        logits = (tf32_matmul(self.drop(h), self.l2.weight.t()) + self.l2.bias).view(-1, self.length, self.vocab)
        return F.cross_entropy(logits.reshape(-1, self.vocab), x.reshape(-1), reduction="none").view(
            -1, self.length).sum(1)


class Tf32LSTMDecoder(nn.Module):
    """The bundled LSTMDecoder's model (z concatenated to every input and mapped to the initial
    hidden state) with an LSTM cell written out, its products in TF32 (as cuDNN's)."""

    def __init__(self, vocab_size: int, latent_dim: int, embed_dim: int, hidden_dim: int, init_scale: float | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.w_ih = nn.Parameter(torch.empty(embed_dim + latent_dim, 4 * hidden_dim))
        self.w_hh = nn.Parameter(torch.empty(hidden_dim, 4 * hidden_dim))
        self.bias = nn.Parameter(torch.empty(4 * hidden_dim))
        self.latent_to_hidden = nn.Linear(latent_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, vocab_size)
        a = init_scale if init_scale is not None else hidden_dim ** -0.5
        for p in self.parameters():
            nn.init.uniform_(p, -a, a)

    def nll(self, x, z):
        inputs = self.embed(x[:, :-1])
        batch, steps, _ = inputs.shape
        inputs = torch.cat([inputs, z.unsqueeze(1).expand(batch, steps, z.shape[1])], dim=2)
        h = torch.tanh(tf32_matmul(z, self.latent_to_hidden.weight.t()) + self.latent_to_hidden.bias)
        c = torch.zeros_like(h)
        pre = tf32_matmul(inputs, self.w_ih) + self.bias
        nll = 0
        for t in range(steps):
            i, f, g, o = (pre[:, t] + tf32_matmul(h, self.w_hh)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            logits = tf32_matmul(h, self.out.weight.t()) + self.out.bias
            nll = nll + F.cross_entropy(logits, x[:, t + 1], reduction="none")
        return nll


def make_decoder(kind: str, latent_dim: int, dropout: float = 0.0) -> nn.Module:
    if kind == "mlp":
        return MLPDecoder(latent_dim, dropout=dropout)
    if kind == "lstm":
        return LSTMDecoder(vocab_size=11, latent_dim=latent_dim, embed_dim=8, hidden_dim=16, dropout=dropout)
    if kind == "pixelcnn":
        return GatedPixelCNNDecoder(latent_dim, image_size=6, channels=6, kernels=(5, 3), cond_channels=2)
    if kind == "tf32_mlp":
        return Tf32MLPDecoder(latent_dim, dropout=dropout)
    if kind == "tf32_lstm":
        return Tf32LSTMDecoder(vocab_size=11, latent_dim=latent_dim, embed_dim=8, hidden_dim=16)
    raise ValueError(kind)


def make_tokens(kind: str, batch: int) -> torch.Tensor:
    if kind in ("mlp", "tf32_mlp"):
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
