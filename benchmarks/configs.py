"""Decoder configurations of the benchmarks and the problems built from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import os

import torch

from savae_fast.models import LSTMDecoder
from savae_fast.testing import Problem, reached_parameters


@dataclass(frozen=True)
class DecoderConfig:
    name: str
    kind: str  # "lstm" | "pixelcnn"
    batch: int
    latent: int
    steps: int
    model: dict = field(default_factory=dict)
    length: int = 12  # tokens per sentence (lstm)
    devices: tuple = ("cpu", "cuda")
    max_rounds: int | None = None  # cap on timing rounds (slow decoders)
    note: str = ""
    # every decoder parameter drawn uniform in [-a, a]: weights of the size trained decoders
    # have (strongly curved gradients, where difference quotients lose accuracy)
    init_uniform: float | None = None

    def with_(self, **kw) -> "DecoderConfig":
        return DecoderConfig(**{**self.__dict__, **kw})


CONFIGS = {
    # The main CPU config: small enough that the refinement's overhead matters.
    "small_lstm": DecoderConfig("small_lstm", "lstm", batch=32, latent=16, steps=20, length=12,
                                model=dict(vocab_size=200, embed_dim=32, hidden_dim=64)),
    # An LSTM decoder with almost no work (V 8, E 4, H 4, 2 tokens): its step over the floor,
    # per inner step, is the host time of the refinement's own calls on that machine.
    "tiny_lstm": DecoderConfig("tiny_lstm", "lstm", batch=32, latent=16, steps=20, length=2,
                               model=dict(vocab_size=8, embed_dim=4, hidden_dim=4)),
    # The SA-VAE synthetic experiment's generative model size (see savae_fast.app.data.synthetic).
    "synthetic_lstm": DecoderConfig("synthetic_lstm", "lstm", batch=32, latent=2, steps=20, length=10,
                                    model=dict(vocab_size=1000, embed_dim=100, hidden_dim=100)),
    # The paper's Yahoo text model: word 512, hidden 1024, vocab 20k (GPU only).
    "yahoo_lstm": DecoderConfig("yahoo_lstm", "lstm", batch=32, latent=32, steps=20, length=40,
                                model=dict(vocab_size=20000, embed_dim=512, hidden_dim=1024), devices=("cuda",)),
    # A gated PixelCNN image decoder (binary 28x28 images), small enough for CPU runs.
    "pixelcnn_small": DecoderConfig("pixelcnn_small", "pixelcnn", batch=16, latent=32, steps=20, max_rounds=5,
                                    model=dict(image_size=28, channels=16, kernels=(7, 7, 5, 5, 3, 3),
                                               cond_channels=4)),
    # The paper's image model size: 12 gated layers, 32 channels (GPU only).
    "pixelcnn_omniglot": DecoderConfig("pixelcnn_omniglot", "pixelcnn", batch=32, latent=32, steps=20,
                                       model=dict(image_size=28, channels=32,
                                                  kernels=(9, 9, 9, 7, 7, 7, 5, 5, 5, 3, 3, 3), cond_channels=4),
                                       devices=("cuda",)),
    # The authors' text decoder at the sizes of the gradient-fidelity measurements (V 50, E 16,
    # H 32), with weights as large as trained decoders have (uniform in [-0.5, 0.5]) and
    # 30-token sentences: accuracy only.
    "large_weight_lstm": DecoderConfig("large_weight_lstm", "lstm", batch=8, latent=8, steps=10, length=30,
                                       model=dict(vocab_size=50, embed_dim=16, hidden_dim=32), init_uniform=0.5),
    # The decoder of the demo's SA-VAE text row after training (benchmarks/trained_decoder.py
    # makes the fixture): accuracy only.
    "trained_synthetic_lstm": DecoderConfig("trained_synthetic_lstm", "trained", batch=8, latent=2, steps=10,
                                            model=dict(fixture="trained_synthetic_savae.pt")),
    # A short SA-VAE run on Penn Treebank (2,000 words, latent 8, E 32, H 64; the same script): accuracy only.
    "trained_ptb_lstm": DecoderConfig("trained_ptb_lstm", "trained", batch=8, latent=8, steps=10,
                                      model=dict(fixture="trained_ptb_savae.pt")),
    # A >= 5M-parameter decoder for the memory comparison.
    "lstm_5m": DecoderConfig("lstm_5m", "lstm", batch=16, latent=16, steps=20, length=8,
                             model=dict(vocab_size=10000, embed_dim=256, hidden_dim=256)),
}


def trained_fixture(cfg: DecoderConfig) -> str:
    """The fixture file of a "trained" config (benchmarks/trained_decoder.py makes them)."""
    from benchmarks.trained_decoder import FIXTURES

    return os.path.join(FIXTURES, cfg.model["fixture"])


def build_decoder(cfg: DecoderConfig) -> torch.nn.Module:
    if cfg.kind == "lstm":
        return LSTMDecoder(latent_dim=cfg.latent, dropout=0.0, **cfg.model)
    if cfg.kind == "pixelcnn":
        from savae_fast.models import GatedPixelCNNDecoder

        return GatedPixelCNNDecoder(latent_dim=cfg.latent, **cfg.model)
    if cfg.kind == "trained":
        from benchmarks.trained_decoder import load

        # train mode (the fixture has no dropout, so the same function): cuDNN computes
        # RNN gradients only in training mode
        return load(path=trained_fixture(cfg))[0].train()
    raise ValueError(cfg.kind)


def make_problem(cfg: DecoderConfig, device: str, dtype=torch.float32, seed: int = 0, steps: int | None = None,
                 batch: int | None = None) -> Problem:
    steps = cfg.steps if steps is None else steps
    batch = cfg.batch if batch is None else batch
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    decoder = build_decoder(cfg)
    if cfg.init_uniform is not None:
        with torch.no_grad():
            for param in decoder.parameters():
                param.uniform_(-cfg.init_uniform, cfg.init_uniform, generator=gen)
    decoder = decoder.to(device=device, dtype=dtype)
    if cfg.kind == "lstm":
        x = torch.randint(1, cfg.model["vocab_size"], (batch, cfg.length), generator=gen)
    elif cfg.kind == "trained":  # test sentences of the decoder's own data, a different set per seed
        from benchmarks.trained_decoder import load

        sentences = load(path=trained_fixture(cfg))[1]
        x = sentences[torch.randperm(len(sentences), generator=gen)[:batch]]
    else:
        size = cfg.model.get("image_size", 28)
        x = (torch.rand((batch, 1, size, size), generator=gen) < 0.3).to(dtype)
    shape = (batch, cfg.latent)
    draw = lambda *s: torch.randn(s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    mu0, logvar0, noise, final_eps = 0.5 * draw(*shape), 0.3 * draw(*shape), draw(steps, *shape), draw(*shape)
    x = x.to(device)
    # e.g. the last gated layer's vertical stack feeds nothing: leave such parameters out
    names = reached_parameters(decoder, lambda z: decoder.nll(x, z), mu0)
    return Problem(decoder, x, mu0, logvar0, noise, final_eps, names, config=cfg)
