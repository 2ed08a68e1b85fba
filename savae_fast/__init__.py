"""savae_fast: fast, exact-enough differentiable SVI refinement for semi-amortized VAEs.

>>> import savae_fast as sf
>>> mu_K, logvar_K = sf.refine(mu, logvar, lambda z: decoder.nll(x, z), decoder.parameters())
"""

from savae_fast import nn, ops, reference
from savae_fast.refine import RefineStats, refine
from savae_fast.refine.graph import RefineGraph
from savae_fast.step_graph import GraphedStep

__version__ = "0.2.0"

__all__ = ["refine", "RefineStats", "RefineGraph", "GraphedStep", "nn", "ops", "reference", "__version__"]
