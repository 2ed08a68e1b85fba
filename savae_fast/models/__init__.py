"""Thin model layer: the paper's VAEs as plain nn.Modules.

Every model exposes ``encode(x) -> (mu, logvar)`` and ``nll(x, z) -> [B]`` so
that it plugs into :func:`savae_fast.refine`.
"""

from savae_fast.models.text import LSTMDecoder, LSTMEncoder

__all__ = ["LSTMDecoder", "LSTMEncoder"]
