"""Test support of savae_fast (as torch.testing is PyTorch's): small decoders, the
SA-VAE problems and training step the tests, benchmarks and examples share,
argument builders of the fused operators, and relative-error measures.

Not needed at run time; imports nothing outside torch and savae_fast.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import savae_fast as sf
from savae_fast import nn as sfnn
from savae_fast.gaussian import gaussian_kl
from savae_fast.models import GatedPixelCNNDecoder, LSTMDecoder
from savae_fast.ops import torch_impl
from savae_fast.ops.constants import FD_CENTRAL, FD_EXACT, FD_FORWARD
from savae_fast.reference import unrolled

__all__ = [
    "MLPDecoder", "cpu_bfloat16_lstm", "Tf32MLPDecoder", "Tf32LSTMDecoder", "cpu_tf32_enabled", "round_to_tf32", "tf32_matmul",
    "make_decoder", "make_tokens", "Problem", "make_problem", "reached_parameters", "training_step",
    "refine_grads", "reference_grads", "step0_grad_norm", "rel_err", "max_rel_err", "relative_error",
    "OP_TOL", "op_state", "op_scalars", "forward_step_args", "reverse_direction_args", "reverse_update_args",
    "accumulate_case", "op_err", "assert_outputs_close", "assert_reverse_direction_close",
]


# ----------------------------------------------------------------------------- decoders
class MLPDecoder(nn.Module):
    """z -> tanh MLP -> independent categorical tokens (twice differentiable).

    Args:
        latent_dim: D.
        hidden: the hidden layer's size.
        vocab, length: tokens per example and their vocabulary.
        dropout: after the hidden layer (a :class:`savae_fast.nn.Dropout`).

    ``nll(x, z)``: tokens ``[B, length]``, ``z`` ``[B, D]`` or ``[n * B, D]`` -> ``[B]`` or ``[n * B]``.

    Example:
        >>> dec = MLPDecoder(4)
        >>> dec.nll(torch.randint(0, 9, (3, 6)), torch.zeros(3, 4)).shape
        torch.Size([3])
    """

    def __init__(self, latent_dim: int, hidden: int = 32, vocab: int = 9, length: int = 6, dropout: float = 0.0):
        super().__init__()
        self.vocab, self.length = vocab, length
        self.l1 = nn.Linear(latent_dim, hidden)
        self.l2 = nn.Linear(hidden, vocab * length)
        self.drop = sfnn.Dropout(dropout)  # nn.Dropout outside refine's stacked calls

    def nll(self, x, z):
        """[B] (or [n * B] for z holding n points per example, refine's stacked calls)."""
        logits = self.l2(self.drop(torch.tanh(self.l1(z)))).view(-1, self.length, self.vocab)
        x = sfnn.repeat_rows(x, z)
        return F.cross_entropy(logits.reshape(-1, self.vocab), x.reshape(-1), reduction="none").view(
            -1, self.length).sum(1)


# ----------------------------------------------------------------------------- CPU capabilities
_cpu_bf16_lstm: tuple | None = None


def cpu_bfloat16_lstm() -> tuple[bool, str]:
    """(whether nn.LSTM runs under CPU bfloat16 autocast here, why not). Autocast sends a float32
    LSTM to oneDNN's bfloat16 RNN, which needs AVX-512 (AVX-512 BF16, AMX or AVX512-core):
    on CPUs with AVX2 only (AMD Zen 3, older Intel) oneDNN has no such primitive and
    PyTorch raises "could not create a primitive descriptor for the LSTM forward propagation
    primitive". Tried once per process on a tiny LSTM.

    Returns:
        ``(supported, reason)``: ``reason`` is ``""`` where it runs, else one line for a
        ``pytest.skip``.

    Example:
        >>> ok, why = cpu_bfloat16_lstm()
        >>> ok or why.startswith("nn.LSTM")
        True
    """
    global _cpu_bf16_lstm
    if _cpu_bf16_lstm is None:
        lstm = nn.LSTM(4, 4, batch_first=True)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lstm(torch.zeros(1, 2, 4))
            _cpu_bf16_lstm = (True, "")
        except RuntimeError as exc:
            _cpu_bf16_lstm = (False, "nn.LSTM under CPU bfloat16 autocast needs oneDNN's bfloat16 RNN "
                                     f"(AVX-512), which this CPU lacks: {str(exc).splitlines()[0][:120]}")
    return _cpu_bf16_lstm


# ----------------------------------------------------------------------------- TF32 emulation
# A GPU computing a float32 matmul in TF32 rounds both inputs to a 10-bit mantissa
# and accumulates in float32, in the forward and in the backward pass. These decoders
# do the same on CPU while the CPU's own TF32 setting,
# torch.backends.mkldnn.matmul.fp32_precision, is "tf32", so that refine's
# precision detection, its TF32 steps and fp32_precision="ieee" can be tested here.


def cpu_tf32_enabled() -> bool:
    """Whether the CPU's TF32 setting (``torch.backends.mkldnn.matmul.fp32_precision``) is ``"tf32"``.

    Returns:
        ``True`` when :func:`tf32_matmul` rounds as a TF32 GPU would.

    Example:
        >>> isinstance(cpu_tf32_enabled(), bool)
        True
    """
    return getattr(torch.backends.mkldnn.matmul, "fp32_precision", "none") == "tf32"


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TF32 (10 explicit mantissa bits), to nearest, ties to even.

    Args:
        x: a float32 tensor.

    Returns:
        A new float32 tensor of TF32 values.

    Example:
        >>> round_to_tf32(torch.tensor([1 + 2 ** -12]))
        tensor([1.])
    """
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


class Tf32Matmul(torch.autograd.Function):
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
    (twice: the backward is made of the same products).

    Args:
        a, b: matrices (batched as ``@``).

    Returns:
        ``a @ b``, with TF32 rounding of both inputs where ``a`` is float32 and
        :func:`cpu_tf32_enabled`; plain ``a @ b`` otherwise.

    Example:
        >>> tf32_matmul(torch.eye(2), torch.ones(2, 2))
        tensor([[1., 1.],
                [1., 1.]])
    """
    if a.dtype != torch.float32 or not cpu_tf32_enabled():
        return a @ b
    return Tf32Matmul.apply(a, b)


class Tf32MLPDecoder(MLPDecoder):
    """:class:`MLPDecoder` with its products in TF32 (:func:`tf32_matmul`) under the CPU TF32 setting.

    Args:
        latent_dim, hidden, vocab, length, dropout: as :class:`MLPDecoder`.

    Example:
        >>> Tf32MLPDecoder(4).nll(torch.randint(0, 9, (3, 6)), torch.zeros(3, 4)).shape
        torch.Size([3])
    """

    def nll(self, x, z):
        h = torch.tanh(tf32_matmul(z, self.l1.weight.t()) + self.l1.bias)
        logits = (tf32_matmul(self.drop(h), self.l2.weight.t()) + self.l2.bias).view(-1, self.length, self.vocab)
        x = sfnn.repeat_rows(x, z)
        return F.cross_entropy(logits.reshape(-1, self.vocab), x.reshape(-1), reduction="none").view(
            -1, self.length).sum(1)


class Tf32LSTMDecoder(nn.Module):
    """The bundled LSTMDecoder's model (z concatenated to every input and mapped to the initial
    hidden state) with an LSTM cell written out, its products in TF32 (as cuDNN's).

    Args:
        vocab_size, latent_dim, embed_dim, hidden_dim: as :class:`savae_fast.models.LSTMDecoder`.
        init_scale: weights uniform in ``[-init_scale, init_scale]`` (default ``hidden_dim ** -0.5``).

    Example:
        >>> dec = Tf32LSTMDecoder(11, 2, 4, 8)
        >>> dec.nll(torch.randint(1, 11, (3, 5)), torch.zeros(3, 2)).shape
        torch.Size([3])
    """

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
        x = sfnn.repeat_rows(x, z)  # (stacked z: n points per example)
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
    """A small decoder of the tests.

    Args:
        kind: ``"mlp"``, ``"lstm"``, ``"pixelcnn"``, ``"tf32_mlp"`` or ``"tf32_lstm"``.
        latent_dim: D.
        dropout: the decoder's dropout (mlp, lstm).

    Returns:
        The decoder (an ``nn.Module`` with ``nll(x, z)``), float32.

    Raises:
        ValueError: an unknown ``kind``.

    Example:
        >>> type(make_decoder("lstm", 4)).__name__
        'LSTMDecoder'
    """
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
    raise ValueError(f"make_decoder: argument 'kind' must be one of mlp, lstm, pixelcnn, tf32_mlp, tf32_lstm, "
                     f"got {kind!r}")


def make_tokens(kind: str, batch: int) -> torch.Tensor:
    """Random data for a decoder of :func:`make_decoder`.

    Args:
        kind: the decoder's kind.
        batch: B.

    Returns:
        Tokens ``[B, T]`` (no padding), or 0/1 images ``[B, 1, 6, 6]`` (float64) for ``"pixelcnn"``.

    Example:
        >>> make_tokens("mlp", 3).shape
        torch.Size([3, 6])
    """
    if kind in ("mlp", "tf32_mlp"):
        return torch.randint(0, 9, (batch, 6))
    if kind == "pixelcnn":
        return (torch.rand(batch, 1, 6, 6) < 0.4).double()
    x = torch.randint(1, 11, (batch, 7))  # no padding (index 0) in the tests
    return x



# ----------------------------------------------------------------------------- problems
def reached_parameters(decoder: nn.Module, nll_fn: Callable[[Tensor], Tensor], z: Tensor) -> tuple[str, ...]:
    """Names of the decoder parameters the NLL depends on (a PixelCNN's last vertical
    stack feeds nothing: such parameters get no gradient and are left out).

    Args:
        decoder: the module whose parameters are named.
        nll_fn: ``z -> [B]`` using ``decoder``.
        z: a point to differentiate at.

    Returns:
        The names (``named_parameters`` order) of the parameters with a gradient.

    Example:
        >>> dec = make_decoder("mlp", 4)
        >>> x = make_tokens("mlp", 2)
        >>> reached_parameters(dec, lambda z: dec.nll(x, z), torch.zeros(2, 4))
        ('l1.weight', 'l1.bias', 'l2.weight', 'l2.bias')
    """
    names, tensors = zip(*decoder.named_parameters())
    z = z.detach().requires_grad_(True)
    grads = torch.autograd.grad(nll_fn(z).sum(), tensors, allow_unused=True)
    return tuple(n for n, g in zip(names, grads) if g is not None)


@dataclass
class Problem:
    """One SA-VAE training step's data: a decoder and its data x, the encoder's
    lambda_0 = (mu0, logvar0), the inner steps' noise [K, B, D] and the final sample's.

    Args:
        decoder, x: the decoder and its data.
        mu0, logvar0: lambda_0, ``[B, D]``.
        noise: ``[K, B, D]``.
        final_eps: ``[B, D]``, the outer objective's sample.
        param_names: the decoder parameters the NLL depends on (``None``: all).
        config: what built it (a benchmark configuration).

    ``params``, ``nll_fn``, ``elbo_loss(mu_K, logvar_K)``, ``to(dtype, device)``,
    ``examples(rows)`` and ``first_examples(n)`` give what a training step needs.

    Example:
        >>> p = make_problem("mlp", batch=4, latent=2, steps=3)
        >>> p.noise.shape, p.num_params() > 0
        (torch.Size([3, 4, 2]), True)
    """

    decoder: nn.Module
    x: Tensor
    mu0: Tensor
    logvar0: Tensor
    noise: Tensor
    final_eps: Tensor
    param_names: tuple | None = None  # the decoder parameters the NLL depends on (None: all)
    config: object = field(default=None, compare=False)  # what built it (a benchmark configuration)

    @property
    def params(self) -> list:
        if self.param_names is None:
            return list(self.decoder.parameters())
        names = set(self.param_names)
        return [q for n, q in self.decoder.named_parameters() if n in names]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

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
                       self.param_names, self.config)

    def examples(self, rows: slice) -> "Problem":
        """The same problem restricted to the examples ``rows`` (e.g. one process's share)."""
        return Problem(self.decoder, self.x[rows], self.mu0[rows], self.logvar0[rows], self.noise[:, rows],
                       self.final_eps[rows], self.param_names, self.config)

    def first_examples(self, n: int) -> "Problem":
        """The same problem restricted to its first n examples."""
        return self.examples(slice(0, n))


def make_problem(kind: str, dtype=torch.float64, batch: int = 32, latent: int = 8, steps: int = 10,
                 dropout: float = 0.0) -> Problem:
    """A small random problem of the tests (decoder kinds of :func:`make_decoder`).

    Args:
        kind: the decoder's kind (:func:`make_decoder`).
        dtype: of the decoder and the tensors.
        batch, latent, steps: B, D and K.
        dropout: the decoder's dropout.

    Returns:
        A :class:`Problem` with fresh random draws (from the default generator).

    Example:
        >>> make_problem("lstm", batch=4, latent=2).mu0.shape
        torch.Size([4, 2])
    """
    dec = make_decoder(kind, latent, dropout).to(dtype)
    x = make_tokens(kind, batch)
    x = x.to(dtype) if x.is_floating_point() else x
    names = reached_parameters(dec, lambda z: dec.nll(x, z), torch.zeros(batch, latent, dtype=dtype))
    return Problem(
        decoder=dec,
        x=x,
        param_names=names,
        mu0=0.5 * torch.randn(batch, latent, dtype=dtype),
        logvar0=0.3 * torch.randn(batch, latent, dtype=dtype),
        noise=torch.randn(steps, batch, latent, dtype=dtype),
        final_eps=torch.randn(batch, latent, dtype=dtype),
    )


def _objective(p: Problem, objective: str, mu_k, lv_k):
    if objective == "elbo":
        return p.elbo_loss(mu_k, lv_k)
    if objective != "linear":
        raise ValueError(f"objective must be 'elbo' or 'linear', got {objective!r}")
    # a fixed random linear functional of lambda_K: the refinement path only
    gen = torch.Generator().manual_seed(1234)
    w1 = torch.randn(mu_k.shape, generator=gen).to(mu_k)
    w2 = torch.randn(mu_k.shape, generator=gen).to(mu_k)
    return (w1 * mu_k).sum() + (w2 * lv_k).sum()


def _through(method: Callable, p: Problem, steps: int | None, objective: str, **kw):
    steps = p.noise.shape[0] if steps is None else steps
    mu0 = p.mu0.detach().clone().requires_grad_(True)
    lv0 = p.logvar0.detach().clone().requires_grad_(True)
    params = p.params
    mu_k, lv_k = method(mu0, lv0, p.nll_fn, params, steps=steps, noise=p.noise[:steps], **kw)
    loss = _objective(p, objective, mu_k, lv_k)
    return (mu_k.detach(), lv_k.detach()), torch.autograd.grad(loss, [mu0, lv0, *params])


def training_step(method: Callable, p: Problem, steps: int | None = None, objective: str = "elbo", **kw):
    """One SA-VAE training step through ``method`` (refine or a reference): refine lambda_0,
    the objective at lambda_K ("elbo": the negative ELBO; "linear": a fixed linear
    functional, the refinement path only), its gradients w.r.t. (mu0, logvar0, *params).

    Args:
        method: ``sf.refine``, ``reference.unrolled`` or ``reference.optim_n2n``.
        p: the problem.
        steps: K (default: all the problem's noise).
        objective: ``"elbo"`` or ``"linear"``.
        **kw: passed to ``method``.

    Returns:
        The gradients, a tuple of tensors.

    Raises:
        ValueError: an unknown ``objective``.

    Example:
        >>> import savae_fast as sf
        >>> p = make_problem("mlp", batch=4, latent=2, steps=3)
        >>> len(training_step(sf.refine, p)) == 2 + len(p.params)
        True
    """
    return _through(method, p, steps, objective, **kw)[1]


def refine_grads(p: Problem, objective="elbo", **kw):
    """One training step through ``sf.refine``, by default without its stabiliser (the exact gradient,
    which :func:`reference_grads` computes).

    Args:
        p: the problem.
        objective: as :func:`training_step`.
        **kw: refine's options (``hvp``, ``backend``, ``backward_clip``, ...).

    Returns:
        ``((mu_K, logvar_K), gradients w.r.t. (mu0, logvar0, *params))``.

    Example:
        >>> p = make_problem("mlp", batch=4, latent=2, steps=3)
        >>> (mu_k, lv_k), grads = refine_grads(p, hvp="fd_central")
        >>> relative_error(grads, reference_grads(p)[1]) < 1e-6
        True
    """
    # the exact gradient (refine's default stabiliser off), as reference_grads computes it, unless asked for
    kw.setdefault("backward_clip", None)
    return _through(sf.refine, p, None, objective, **kw)


def reference_grads(p: Problem, objective="elbo", **kw):
    """The same through ``reference.unrolled`` in float64 (the exact ground truth).

    Args:
        p: the problem (converted to float64).
        objective: as :func:`training_step`.
        **kw: refine's options; those of no meaning to the reference are dropped.

    Returns:
        ``((mu_K, logvar_K), gradients)`` in float64.

    Example:
        >>> p = make_problem("mlp", batch=4, latent=2, steps=3)
        >>> _, grads = reference_grads(p)
        >>> grads[0].dtype
        torch.float64
    """
    kw = {k: v for k, v in kw.items() if k not in ("hvp", "fd_eps", "backend", "preserve_rng_state")}
    return _through(unrolled, p.to(torch.float64), None, objective, **kw)


def step0_grad_norm(p: Problem) -> float:
    """Smaller of |g_mu| and |g_logvar| at the first inner step (mean reduction, beta 1).

    Args:
        p: the problem.

    Returns:
        The norm (to put a clip norm below or above it in a test).

    Example:
        >>> step0_grad_norm(make_problem("mlp", batch=4, latent=2)) > 0
        True
    """
    z = (p.mu0 + torch.exp(0.5 * p.logvar0) * p.noise[0]).detach().requires_grad_(True)
    (gz,) = torch.autograd.grad(p.nll_fn(z).sum(), z)
    s = 1.0 / p.mu0.shape[0]
    g_mu = s * (gz + p.mu0)
    g_lv = s * (0.5 * gz * p.noise[0] * torch.exp(0.5 * p.logvar0) + 0.5 * torch.expm1(p.logvar0))
    return min(g_mu.norm().item(), g_lv.norm().item())


# ----------------------------------------------------------------------------- errors
def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| when b vanishes).

    Args:
        a, b: tensors of one shape (b the reference).

    Returns:
        The relative error, a float.

    Example:
        >>> rel_err(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
        1.0
    """
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else (a - b).norm().item()


def max_rel_err(grads, ref) -> tuple[float, list[float]]:
    """The largest per-tensor relative error, and all of them.

    Args:
        grads, ref: sequences of tensors (ref the reference).

    Returns:
        ``(max, [rel_err per tensor])``.

    Example:
        >>> max_rel_err([torch.ones(2)], [torch.ones(2)])
        (0.0, [0.0])
    """
    errs = [rel_err(a, b) for a, b in zip(grads, ref)]
    return max(errs), errs


def relative_error(grads, ref) -> float:
    """||grads - ref|| / ||ref|| over all the tensors together, in float64.

    Args:
        grads, ref: sequences of tensors (ref the reference).

    Returns:
        The relative error of the concatenation, a float.

    Example:
        >>> relative_error([torch.ones(2), torch.zeros(1)], [torch.ones(2), torch.full((1,), 2.0)])
        0.8164965809277261
    """
    num = sum((a.double() - b.double()).pow(2).sum() for a, b in zip(grads, ref)) ** 0.5
    den = sum(b.double().pow(2).sum() for b in ref) ** 0.5
    return float(num / den)


# ----------------------------------------------------------------------------- operator arguments
# Tolerance of a fused operator against its pure-PyTorch formula (relative, op_err).
OP_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def op_state(shape, dtype, device="cpu"):
    """Random state whose ELBO gradients are not near-cancellations of their terms: on
    tiny shapes a chance cancellation makes g ill-conditioned in float32 whatever the
    implementation, and the clip Jacobian would magnify it (a test of the draw, not of
    the kernels).

    Args:
        shape: ``(B, D)``.
        dtype, device: of the tensors.

    Returns:
        A dict of ``mu``, ``logvar``, ``p_mu``, ``p_logvar``, ``eps``, ``grad_z``, ``eps_next``.

    Example:
        >>> " ".join(sorted(op_state((3, 2), torch.float64))[:3])
        'eps eps_next grad_z'
    """
    b, d = shape
    t = lambda scale=1.0: scale * torch.randn(b, d, dtype=dtype, device=device)  # noqa: E731
    while True:
        st = dict(mu=t(0.7), logvar=t(0.5), p_mu=t(0.2), p_logvar=t(0.2), eps=t(), grad_z=t(3.0), eps_next=t())
        sigma = torch.exp(0.5 * st["logvar"])
        terms_mu = st["grad_z"].abs() + 0.7 * st["mu"].abs()
        terms_lv = (0.5 * st["grad_z"] * st["eps"] * sigma).abs() + (0.35 * torch.expm1(st["logvar"])).abs()
        g_mu, g_lv = torch_impl.elbo_grad(st["grad_z"], st["mu"], st["logvar"], st["eps"], 1.0, 0.7)
        if g_mu.norm() >= 0.1 * terms_mu.norm() and g_lv.norm() >= 0.1 * terms_lv.norm():
            return st


def op_scalars(clip: str, state):
    """Hyper-parameters with the clip clearly inactive / active for both tensors.

    Args:
        clip: ``"off"``, ``"inactive"`` or ``"active"``.
        state: an :func:`op_state`.

    Returns:
        A dict of the operators' scalar arguments (``scale`` ... ``max_grad_norm``).

    Example:
        >>> op_scalars("off", op_state((3, 2), torch.float64))["max_grad_norm"]
        0.0
    """
    s, beta = 1.0 / state["mu"].shape[0], 0.7
    g_mu, g_lv = torch_impl.elbo_grad(state["grad_z"], state["mu"], state["logvar"], state["eps"], s, beta)
    n = min(g_mu.norm().item(), g_lv.norm().item())
    max_norm = {"off": 0.0, "inactive": 3.0 * max(g_mu.norm().item(), g_lv.norm().item()), "active": 0.5 * n}[clip]
    return dict(scale=s, kl_weight=beta, lr_mu=0.9, lr_logvar=0.6, momentum=0.5, max_grad_norm=max_norm)


def forward_step_args(shape, dtype, clip, with_next=True, device="cpu"):
    """Positional arguments of a ``forward_step`` operator call (its schema's order).

    Args:
        shape, dtype, device: as :func:`op_state`.
        clip: as :func:`op_scalars`.
        with_next: whether ``eps_next`` is given.

    Returns:
        The argument tuple.

    Example:
        >>> len(forward_step_args((3, 2), torch.float64, "active"))
        13
    """
    st = op_state(shape, dtype, device)
    sc = op_scalars(clip, st)
    return (st["mu"], st["logvar"], st["p_mu"], st["p_logvar"], st["eps"], st["grad_z"],
            st["eps_next"] if with_next else None, sc["scale"], sc["kl_weight"], sc["lr_mu"], sc["lr_logvar"],
            sc["momentum"], sc["max_grad_norm"])


def reverse_direction_args(shape, dtype, clip, fd_mode, device="cpu"):
    """Positional arguments of a ``reverse_direction`` operator call (one example with a zero
    direction where B > 1, for the u_b = 0 branch).

    Args:
        shape, dtype, device: as :func:`op_state`.
        clip: as :func:`op_scalars`.
        fd_mode: an ``FdMode`` value.

    Returns:
        The argument tuple.

    Example:
        >>> len(reverse_direction_args((3, 2), torch.float64, "off", 2))
        16
    """
    st = op_state(shape, dtype, device)
    sc = op_scalars(clip, st)
    g_mu, g_lv = torch_impl.elbo_grad(st["grad_z"], st["mu"], st["logvar"], st["eps"], sc["scale"], sc["kl_weight"])
    norms = torch.stack([g_mu.norm(), g_lv.norm()])
    lbar_mu, lbar_lv = torch.randn_like(st["mu"]), torch.randn_like(st["mu"])
    if shape[0] > 1:  # one example with a zero direction exercises the u_b = 0 branch
        lbar_mu[0], lbar_lv[0], st["p_mu"][0], st["p_logvar"][0] = 0, 0, 0, 0
    step = {FD_EXACT: 0.0, FD_FORWARD: 1e-3, FD_CENTRAL: 2e-3}[fd_mode]
    return (lbar_mu, lbar_lv, st["p_mu"], st["p_logvar"], st["mu"], st["logvar"], st["eps"], st["grad_z"], norms,
            sc["scale"], sc["kl_weight"], sc["lr_mu"], sc["lr_logvar"], sc["max_grad_norm"], fd_mode, step)


def reverse_update_args(shape, dtype, with_b=True, device="cpu"):
    """Positional arguments of a ``reverse_update`` operator call.

    Args:
        shape, dtype, device: as :func:`op_state`.
        with_b: whether ``hvp_b`` is given.

    Returns:
        The argument tuple.

    Example:
        >>> reverse_update_args((3, 2), torch.float64, with_b=False)[10] is None
        True
    """
    st = op_state(shape, dtype, device)
    t = lambda: torch.randn(shape, dtype=dtype, device=device)  # noqa: E731
    return (t(), t(), t(), t(), t(), t(), st["logvar"], st["eps"], st["grad_z"], t(), t() if with_b else None,
            333.0, 1.0 / shape[0], 0.7, 0.5)


def op_err(a, b, scale=1.0) -> float:
    """||a - b|| relative to max(||b||, RMS ``scale``): the inputs are O(1) random draws,
    and an output that cancels to almost nothing (the clip Jacobian on a 1x1 tensor)
    must be judged against the size of its terms, not its own size.

    Args:
        a, b: tensors (b the reference).
        scale: the RMS size of the terms.

    Returns:
        The error, a float.

    Example:
        >>> op_err(torch.zeros(4), torch.zeros(4))
        0.0
    """
    a, b = a.detach().double(), b.detach().double()
    return (a - b).norm().item() / max(b.norm().item(), scale * max(b.numel(), 1) ** 0.5)


def assert_outputs_close(out, ref, dtype, scales=None):
    """Assert each output within ``OP_TOL[dtype]`` of the reference's (:func:`op_err`).

    Args:
        out, ref: a tensor or a sequence of tensors each.
        dtype: selects the tolerance.
        scales: ``{output index: RMS scale}`` for :func:`op_err`.

    Returns:
        ``None``.

    Raises:
        AssertionError: a shape, dtype or value differs (the output's index named).

    Example:
        >>> assert_outputs_close(torch.ones(3), torch.ones(3), torch.float32)
    """
    out = out if isinstance(out, (tuple, list)) else (out,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    assert len(out) == len(ref)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        err = op_err(a, b, (scales or {}).get(i, 1.0))
        assert err <= OP_TOL[dtype], f"output {i}: error {err:.2e}"


def assert_reverse_direction_close(out, ref, args, dtype):
    """reverse_direction's outputs against the formula's. Row weights 1 / (2 r_b) =
    |u_b| / (2 h (1 + |z_b|)) live on the 1 / (2 h) scale. With a single element and the
    clip active, J v = c v 1e-6 / (n + 1e-6) cancels below float32 rounding: the sign of
    the direction u is rounding noise, and the central points z + r u, z - r u may come out
    in either order (about 3% of draws), so they are compared as a pair.

    Args:
        out, ref: the operator's outputs and the formula's.
        args: the call's positional arguments (:func:`reverse_direction_args`).
        dtype: selects the tolerance.

    Returns:
        ``None``.

    Raises:
        AssertionError: an output out of tolerance (named).

    Example:
        >>> from savae_fast.ops import torch_impl
        >>> args = reverse_direction_args((3, 2), torch.float64, "active", 2)
        >>> out = torch_impl.reverse_direction(*args)
        >>> assert_reverse_direction_close(out, out, args, torch.float64)
    """
    fd_mode, max_norm, norms = args[14], args[13], args[8]
    out, ref = list(out), list(ref)
    if (fd_mode == FD_CENTRAL and dtype == torch.float32 and args[4].numel() == 1
            and 0 < max_norm < norms.max().item()):
        out[5], ref[5] = out[5].sort(dim=0).values, ref[5].sort(dim=0).values
    assert_outputs_close(out, ref, dtype, scales={6: 0.5 / args[15]} if fd_mode == FD_CENTRAL else None)


def accumulate_case(dtype, shapes=((7,), (3, 4), (1,), (300, 5), (5000,))):
    """Arguments of an ``accumulate_`` call: random totals and values, one value ``None``.

    Args:
        dtype: of the tensors.
        shapes: one per tensor.

    Returns:
        ``(total, values)``.

    Example:
        >>> total, values = accumulate_case(torch.float32)
        >>> len(total), values[1] is None
        (5, True)
    """
    total = [torch.randn(s, dtype=dtype) for s in shapes]
    values = [torch.randn(s, dtype=dtype) for s in shapes]
    values[1] = None  # a parameter the loss did not use
    return total, values
