"""Thin model layer: the paper's VAEs as plain nn.Modules.

Every model exposes ``encode(x) -> (mu, logvar)`` and ``nll(x, z) -> [B]`` so
that it plugs into :func:`savae_fast.refine`; ``latent_dim=0`` gives the
autoregressive baseline (LSTM language model, PixelCNN).
"""

from savae_fast.models.image import GatedPixelCNNDecoder, ImageVAE, ResidualEncoder
from savae_fast.models.text import LSTMDecoder, LSTMEncoder, TextVAE

__all__ = ["LSTMDecoder", "LSTMEncoder", "TextVAE", "GatedPixelCNNDecoder", "ResidualEncoder", "ImageVAE"]
