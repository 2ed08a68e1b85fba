"""The data of a training run, from its configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from savae_fast.app.data import images as image_data
from savae_fast.app.data import synthetic as synthetic_data
from savae_fast.app.data.text import TextCorpus, bucket_batches
from savae_fast.app.errors import DataError
from savae_fast.app.train.config import TrainConfig


@dataclass
class RunData:
    kind: str  # "text" | "image"
    splits: dict  # text: lists of token-id lists; images: [N, 1, H, W] tensors
    vocab_size: int = 0
    image_size: int = 0
    true_test_nll: float | None = None  # synthetic data: the generating model's NLL
    seed: int = 0

    def batches(self, split: str, batch_size: int, shuffle: bool, epoch: int = 0) -> list[torch.Tensor]:
        seed = self.seed * 1000003 + epoch
        if self.kind == "text":
            return bucket_batches(self.splits[split], batch_size, shuffle, seed)
        return image_data.image_batches(self.splits[split], batch_size, shuffle, seed)

    def num_tokens(self, split: str) -> int:
        """Predicted tokens (words + </s>) of a text split, for perplexity."""
        return sum(len(s) - 1 for s in self.splits[split]) if self.kind == "text" else 0


def load_data(cfg: TrainConfig) -> RunData:
    if cfg.dataset == "synthetic":
        spec = replace(synthetic_data.SyntheticSpec(), **cfg.synthetic)
        gen = synthetic_data.generate(spec)
        splits = {k: [row.tolist() for row in v] for k, v in gen["splits"].items()}
        return RunData("text", splits, vocab_size=spec.vocab_size, true_test_nll=gen["true_test_nll"], seed=cfg.seed)
    if cfg.dataset in ("text", "ptb"):
        if cfg.dataset == "ptb":
            corpus = TextCorpus.ptb(cfg.max_vocab, cfg.max_length)
        else:
            paths = {s: os.path.join(cfg.data_path, f"{s}.txt") for s in ("train", "valid", "test")}
            if not os.path.isdir(cfg.data_path):
                raise DataError(f"text data directory not found: {cfg.data_path}")
            corpus = TextCorpus.from_files(paths["train"], paths["valid"],
                                           paths["test"] if os.path.isfile(paths["test"]) else None,
                                           cfg.max_vocab, cfg.max_length)
        return RunData("text", corpus.splits, vocab_size=len(corpus.vocab), seed=cfg.seed)
    if cfg.dataset == "digits":
        splits = image_data.digits(cfg.seed)
    elif cfg.dataset == "omniglot":
        splits = image_data.omniglot(cfg.data_path, cfg.seed)
    else:
        splits = image_data.mnist(cfg.data_path)
    return RunData("image", splits, image_size=splits["train"].shape[-1], seed=cfg.seed)


def build_model(cfg: TrainConfig, data: RunData) -> torch.nn.Module:
    from savae_fast.models import ImageVAE, TextVAE

    latent = 0 if cfg.mode == "autoreg" else cfg.latent_dim
    if data.kind == "text":
        model = TextVAE(data.vocab_size, latent, cfg.embed_dim, cfg.hidden_dim, cfg.dropout)
    else:
        model = ImageVAE(latent, data.image_size, cfg.enc_channels, dec_channels=cfg.dec_channels,
                         kernels=tuple(cfg.kernels))
    if cfg.mode == "svi":
        model.encoder = None  # svi refines from a fixed initialisation: no encoder
    return model
