"""The data of a training run, from its configuration."""

from __future__ import annotations

import array
import hashlib
import itertools
import os
from dataclasses import dataclass

import torch

from savae_fast.app.data import images as image_data
from savae_fast.app.data import synthetic as synthetic_data
from savae_fast.app.data.text import TextCorpus, bucket_batches
from savae_fast.app.errors import DataError, notice
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

    def fingerprint(self) -> str:
        """SHA-256 of the splits' content (token ids or image bits): a resumed run checks it."""
        h = hashlib.sha256(f"{self.kind}:{self.vocab_size}:{self.image_size}".encode())
        for name in sorted(self.splits):
            split = self.splits[name]
            h.update(name.encode())
            if self.kind == "text":
                h.update(array.array("q", [len(s) for s in split]).tobytes())
                h.update(array.array("q", itertools.chain.from_iterable(split)).tobytes())
            else:
                h.update(split.contiguous().numpy().tobytes())
        return h.hexdigest()

    def num_tokens(self, split: str) -> int:
        """Predicted tokens (words + </s>) of a text split, for perplexity."""
        return sum(len(s) - 1 for s in self.splits[split]) if self.kind == "text" else 0


def load_data(cfg: TrainConfig) -> RunData:
    if cfg.dataset == "synthetic":
        spec = synthetic_data.check_overrides(cfg.synthetic)
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
            special = [p for p in paths.values() if os.path.exists(p) and not os.path.isfile(p)]
            if special:  # a FIFO, a device, a directory: read as text it would block or fail
                raise DataError(f"{special[0]} is not a regular file (the text data must be files)")
            missing = [os.path.basename(p) for p in paths.values() if not os.path.isfile(p)]
            if missing:  # found now, not after training (the final evaluation reads test.txt)
                raise DataError(f"text data directory {cfg.data_path} lacks {', '.join(missing)} "
                                "(it needs train.txt, valid.txt and test.txt)")
            corpus = TextCorpus.from_files(paths["train"], paths["valid"], paths["test"], cfg.max_vocab,
                                           cfg.max_length)
        for line in corpus.notes:
            notice(line)
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
