"""Pure-PyTorch reference implementations of the refinement.

* :func:`unrolled`: exact, autograd through every step (the ground truth).
* :func:`optim_n2n`: the SA-VAE authors' finite-difference algorithm as published.
"""

from savae_fast.reference.optim_n2n import optim_n2n
from savae_fast.gaussian import gaussian_kl
from savae_fast.reference.unrolled import unrolled

__all__ = ["unrolled", "optim_n2n", "gaussian_kl"]
