"""What the paper's models have in common: an amortised encoder x -> (mu, logvar) and a
decoder giving per-example negative log-likelihoods -log p(x | z)."""

from __future__ import annotations

from torch import Tensor, nn


class LatentVariableModel(nn.Module):
    """``encode(x) -> (mu, logvar)`` and ``nll(x, z) -> [B]``. ``latent_dim=0`` (no
    encoder): the decoder alone, an autoregressive model, ``nll(x)``."""

    def __init__(self, latent_dim: int, encoder: nn.Module | None, decoder: nn.Module):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.encoder is None:
            raise ValueError(f"{type(self).__name__}: the autoregressive model (latent_dim=0) has no encoder")
        return self.encoder(x)

    def nll(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return self.decoder.nll(x, z)
