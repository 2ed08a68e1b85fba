"""Differentiable K-step SVI refinement (the semi-amortized part of SA-VAE)."""

from savae_fast.refine.api import DEFAULT_FD_EPS, refine
from savae_fast.refine.function import HVP_MODES, RefineConfig
from savae_fast.refine.graph import RefineGraph

__all__ = ["refine", "RefineGraph", "RefineConfig", "HVP_MODES", "DEFAULT_FD_EPS"]
