"""Text VAE of the SA-VAE paper: LSTM encoder, LSTM decoder conditioned on z.

Sentences are LongTensors ``x`` of shape ``[B, T]`` that start with BOS and
end with EOS, right-padded with ``pad_index``; the decoder predicts
``x[:, 1:]`` from ``x[:, :-1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from savae_fast.models.base import LatentVariableModel
from savae_fast.nn import Dropout, repeat_rows


def check_tokens(name: str, x: Tensor, vocab_size: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: argument 'x' must be a [batch, length] integer tensor of token ids, got "
                         f"{type(x).__name__ if not isinstance(x, Tensor) else (tuple(x.shape), x.dtype)}")
    if x.shape[1] < 2:
        raise ValueError(f"{name}: argument 'x' needs at least 2 tokens per sentence (<s> ... </s>), got {x.shape[1]}")
    # range check on CPU only: on a GPU it would be a host sync in every decoder call
    # of the refinement loop (the loaders build ids from the vocabulary)
    if x.device.type == "cpu" and x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
        raise ValueError(f"{name}: argument 'x' has token ids outside [0, {vocab_size})")


def check_latent(name: str, z: Tensor | None, batch: int, latent_dim: int) -> int:
    """z a float [n * batch, latent_dim] tensor (n >= 1: refine's stacked calls give several
    points per example, rows point-major); returns its rows."""
    if latent_dim == 0:
        return batch
    if z is None:
        raise ValueError(f"{name}: argument 'z' is required when latent_dim > 0")
    if (not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != latent_dim or not z.is_floating_point()
            or z.shape[0] < batch or z.shape[0] % max(batch, 1)):
        raise ValueError(f"{name}: argument 'z' must be a float [{batch}, {latent_dim}] tensor (or [n * {batch}, "
                         f"{latent_dim}]: n points per example), got "
                         f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
    return z.shape[0]


class LSTMDecoder(nn.Module):
    """p(x | z): LSTM language model with z concatenated to every input and
    z -> initial hidden state (Kim et al. 2018); ``latent_dim=0`` gives the
    plain LSTM language model (the autoregressive baseline).

    Args:
        vocab_size: V, including the padding token.
        latent_dim: D (0: no latent).
        embed_dim, hidden_dim: the word embedding and LSTM sizes.
        dropout: on the embeddings and the LSTM outputs (a :class:`savae_fast.nn.Dropout`:
            one mask per example in refine's stacked calls).
        pad_index: the padding token, ignored by the loss.

    ``nll(x, z)`` takes tokens ``[B, T]`` (begin and end tokens included) and ``z`` ``[B, D]``
    or ``[n * B, D]`` (stacked) and returns per-sentence NLLs (nats) ``[B]`` or ``[n * B]``.

    Raises:
        ValueError: at call time, tokens that are not a ``[B, T]`` integer tensor in
            ``[0, vocab_size)``, or ``z`` of the wrong shape or dtype (named).

    Example:
        >>> dec = LSTMDecoder(vocab_size=10, latent_dim=2, embed_dim=4, hidden_dim=8)
        >>> x = torch.randint(1, 10, (3, 5))
        >>> dec.nll(x, torch.zeros(3, 2)).shape, dec.nll(x, torch.zeros(6, 2)).shape
        (torch.Size([3]), torch.Size([6]))
    """

    def __init__(self, vocab_size: int, latent_dim: int, embed_dim: int = 512, hidden_dim: int = 1024,
                 dropout: float = 0.5, pad_index: int = 0):
        super().__init__()
        self.vocab_size, self.latent_dim, self.pad_index = vocab_size, latent_dim, pad_index
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.dropout = Dropout(dropout)  # nn.Dropout outside refine's stacked calls
        self.rnn = nn.LSTM(embed_dim + latent_dim, hidden_dim, batch_first=True)
        self.latent_to_hidden = nn.Linear(latent_dim, hidden_dim) if latent_dim > 0 else None
        self.out = nn.Linear(hidden_dim, vocab_size)

    def logits(self, x: Tensor, z: Tensor | None) -> Tensor:
        """Next-token logits ``[R, T-1, V]``: R = B, or n * B for z holding n points per example
        (refine's stacked calls): the embedded tokens are repeated, not the tokens re-embedded."""
        check_tokens("LSTMDecoder", x, self.vocab_size)
        rows = check_latent("LSTMDecoder", z, x.shape[0], self.latent_dim)
        inputs = self.dropout(self.embed(x[:, :-1]))  # one dropout mask per example
        if rows != x.shape[0]:
            inputs = repeat_rows(inputs, z)
        batch, steps, _ = inputs.shape
        hidden = inputs.new_zeros(1, batch, self.rnn.hidden_size)
        if self.latent_dim > 0:
            inputs = torch.cat([inputs, z.to(inputs.dtype).unsqueeze(1).expand(batch, steps, z.shape[1])], dim=2)
            hidden = self.latent_to_hidden(z.to(inputs.dtype)).unsqueeze(0)
        output, _ = self.rnn(inputs, (hidden, torch.zeros_like(hidden)))
        return self.out(self.dropout(output))

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """Same as :meth:`nll` (so the decoder works with torch.func.functional_call)."""
        return self.nll(x, z)

    def nll(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """Per-sentence negative log-likelihood (nats, summed over tokens), ``[B]`` (``[n * B]`` for
        z of n points per example, point-major)."""
        logits = self.logits(x, z)
        target = x[:, 1:] if logits.shape[0] == x.shape[0] else repeat_rows(x[:, 1:], logits)
        token_nll = F.cross_entropy(logits.reshape(-1, self.vocab_size), target.reshape(-1),
                                    ignore_index=self.pad_index, reduction="none")
        return token_nll.view(target.shape).sum(dim=1)


class LSTMEncoder(nn.Module):
    """q(z | x): embedding + LSTM, last hidden state -> (mu, logvar).

    Args:
        vocab_size, latent_dim, embed_dim, hidden_dim, pad_index: as :class:`LSTMDecoder`.

    Called on tokens ``[B, T]`` it returns ``(mu, logvar)``, ``[B, D]`` each (padding at the
    end of a sentence is skipped: packed sequences).

    Raises:
        ValueError: at call time, tokens that are not a ``[B, T]`` integer tensor in range.

    Example:
        >>> enc = LSTMEncoder(vocab_size=10, latent_dim=2, embed_dim=4, hidden_dim=8)
        >>> mu, logvar = enc(torch.randint(1, 10, (3, 5)))
        >>> mu.shape
        torch.Size([3, 2])
    """

    def __init__(self, vocab_size: int, latent_dim: int, embed_dim: int = 512, hidden_dim: int = 1024,
                 pad_index: int = 0):
        super().__init__()
        self.pad_index, self.vocab_size = pad_index, vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.to_params = nn.Linear(hidden_dim, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_tokens("LSTMEncoder", x, self.vocab_size)
        lengths = (x != self.pad_index).sum(dim=1).clamp_min(1)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(x), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        mu, logvar = self.to_params(h[-1]).chunk(2, dim=1)
        return mu, logvar


class TextVAE(LatentVariableModel):
    """The paper's text VAE (latent 32, word 512, hidden 1024, dropout 0.5 by default);
    ``latent_dim=0`` gives the LSTM language model (the autoregressive baseline).

    Args:
        vocab_size, latent_dim, embed_dim, hidden_dim, dropout, pad_index: as
            :class:`LSTMDecoder` (the encoder has no dropout).
        enc_hidden_dim: the encoder's LSTM size (default ``hidden_dim``).

    ``encode(x) -> (mu, logvar)``; ``nll(x, z) -> [B]`` (the decoder's).

    Raises:
        ValueError: at call time, bad tokens or latents (named); ``encode`` of the
            autoregressive model.

    Example:
        >>> import savae_fast as sf
        >>> model = TextVAE(vocab_size=10, latent_dim=2, embed_dim=4, hidden_dim=8)
        >>> x = torch.randint(1, 10, (3, 5))
        >>> mu, logvar = model.encode(x)
        >>> mu_k, logvar_k = sf.refine(mu, logvar, lambda z: model.nll(x, z), model.decoder.parameters(),
        ...                            steps=2)
        >>> mu_k.shape
        torch.Size([3, 2])
    """

    def __init__(self, vocab_size: int, latent_dim: int = 32, embed_dim: int = 512, hidden_dim: int = 1024,
                 dropout: float = 0.5, pad_index: int = 0, enc_hidden_dim: int | None = None):
        super().__init__(
            latent_dim,
            LSTMEncoder(vocab_size, latent_dim, embed_dim, enc_hidden_dim or hidden_dim, pad_index) if latent_dim
            else None,
            LSTMDecoder(vocab_size, latent_dim, embed_dim, hidden_dim, dropout, pad_index))
