"""The SA-VAE synthetic experiment: sentences from a randomly initialised LSTM
generative model with a latent variable, generated deterministically from a
seed, with the true model's NLL for comparison.

Sizes (chosen to train in minutes on 2 CPU cores; the paper's exact sizes are
not published in full): vocabulary 100, length 10, latent 2, LSTM hidden 64,
embedding 32. A default-initialised random LSTM is nearly uniform and barely
uses z, so its weights are scaled: recurrent x4 (saturating states), the
latent's input and initial-state weights x8 more, the output layer x8. Then
-log p(x | z) is about 34 nats per sentence, -log p(x) about 37: z carries
about 3.5 nats of information that a collapsed posterior loses.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import asdict, dataclass

import torch

from savae_fast.models.text import LSTMDecoder

BOS, PAD = 1, 0  # token ids 0 (pad) and 1 (BOS) are never generated


@dataclass(frozen=True)
class SyntheticSpec:
    vocab_size: int = 100
    length: int = 10
    latent_dim: int = 2
    hidden_dim: int = 64
    embed_dim: int = 32
    rnn_scale: float = 4.0
    latent_scale: float = 8.0
    output_scale: float = 8.0
    train: int = 10000
    valid: int = 500
    test: int = 500
    seed: int = 0


def check_overrides(overrides: dict) -> SyntheticSpec:
    """The spec with ``overrides`` (field name -> value); ValueError naming a bad field."""
    fields = {f.name: f for f in dataclasses.fields(SyntheticSpec)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; known: {sorted(fields)}")
    for name, value in overrides.items():
        kind = type(getattr(SyntheticSpec, name))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        low = 0 if name in ("seed",) else (3 if name == "vocab_size" else 1)
        if not math.isfinite(value) or (value < low if kind is int else value <= 0):
            raise ValueError(f"{name} must be {'>= ' + str(low) if kind is int else '> 0'}, got {value!r}")
    return dataclasses.replace(SyntheticSpec(), **overrides)


def true_model(spec: SyntheticSpec) -> LSTMDecoder:
    """The generative model p(x | z), deterministically initialised from ``spec.seed``."""
    devnull = torch.random.fork_rng()
    with devnull:
        torch.manual_seed(spec.seed)
        model = LSTMDecoder(spec.vocab_size, spec.latent_dim, spec.embed_dim, spec.hidden_dim, dropout=0.0,
                            pad_index=PAD)
        with torch.no_grad():
            for w in model.rnn.parameters():
                w.mul_(spec.rnn_scale)
            model.rnn.weight_ih_l0[:, spec.embed_dim:].mul_(spec.latent_scale)
            model.latent_to_hidden.weight.mul_(spec.latent_scale)
            model.out.weight.mul_(spec.output_scale)
            model.out.bias[PAD] = -1e4  # never emit the padding or BOS tokens
            model.out.bias[BOS] = -1e4
    return model.eval()


@torch.no_grad()
def sample(model: LSTMDecoder, spec: SyntheticSpec, count: int, generator: torch.Generator):
    """``count`` sentences [count, length + 1] (BOS first) and their latents [count, latent]."""
    z = torch.randn((count, spec.latent_dim), generator=generator)
    x = torch.full((count, spec.length + 1), BOS, dtype=torch.long)
    hidden = model.latent_to_hidden(z).unsqueeze(0)
    state = (hidden, torch.zeros_like(hidden))
    token = x[:, :1]
    for t in range(spec.length):
        inp = torch.cat([model.embed(token), z.unsqueeze(1)], dim=2)
        out, state = model.rnn(inp, state)
        probs = torch.softmax(model.out(out[:, -1]), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)
        x[:, t + 1] = token[:, 0]
    return x, z


@torch.no_grad()
def true_nll(model: LSTMDecoder, x: torch.Tensor, spec: SyntheticSpec, grid: int = 48, samples: int = 2048,
             batch: int = 64) -> torch.Tensor:
    """-log p(x) under the true model, per sentence: for a 2-D latent, midpoint quadrature
    of p(x | z) p(z) on a [-5, 5]^2 grid (48 x 48: 0.2 spacing, below the posterior widths
    of these sentences); otherwise importance sampling from the prior."""
    if spec.latent_dim == 2:
        edges = torch.linspace(-5, 5, grid + 1)
        centers = 0.5 * (edges[1:] + edges[:-1])
        zz = torch.cartesian_prod(centers, centers)
        log_w = -0.5 * zz.pow(2).sum(1) - math.log(2 * math.pi) + 2 * math.log(10.0 / grid)
    else:
        gen = torch.Generator().manual_seed(spec.seed + 99)
        zz = torch.randn((samples, spec.latent_dim), generator=gen)
        log_w = torch.full((samples,), -math.log(samples))
    out = []
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        n, s = xb.shape[0], zz.shape[0]
        ll = -model.nll(xb.repeat_interleave(s, 0), zz.repeat(n, 1)).view(n, s)
        out.append(-torch.logsumexp(ll + log_w, dim=1))
    return torch.cat(out)


def generate(spec: SyntheticSpec = SyntheticSpec()) -> dict:
    """Train/valid/test splits (token tensors), the true model's test NLL, and the spec."""
    model = true_model(spec)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    splits = {}
    for name, count in (("train", spec.train), ("valid", spec.valid), ("test", spec.test)):
        splits[name], _ = sample(model, spec, count, gen)
    return {"splits": splits, "true_test_nll": float(true_nll(model, splits["test"], spec).mean()),
            "spec": asdict(spec), "vocab_size": spec.vocab_size}
