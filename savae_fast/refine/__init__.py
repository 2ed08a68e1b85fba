"""Differentiable K-step SVI refinement (the semi-amortized part of SA-VAE)."""

from savae_fast.refine.api import refine
from savae_fast.refine.config import NonFinite, RefineConfig
from savae_fast.refine.graph import RefineGraph
from savae_fast.refine.hvp import HVP_METHODS, HvpMethod
from savae_fast.refine.stabilize import RefineStats
from savae_fast.refine.validation import DEFAULT_FD_EPS, DEFAULTS

HVP_MODES = tuple(HVP_METHODS)  # the names refine's ``hvp`` argument accepts

__all__ = ["refine", "RefineGraph", "RefineStats", "RefineConfig", "NonFinite", "HvpMethod", "HVP_METHODS", "HVP_MODES",
           "DEFAULT_FD_EPS", "DEFAULTS"]
