"""The training objectives of the paper's six rows.

* ``autoreg``: the decoder alone (LSTM language model / PixelCNN), no latent.
* ``vae``: the ELBO at the encoder's posterior lambda_0.
* ``svi``: no encoder; K SVI steps from lambda = 0 (no gradient through them);
  the decoder is trained on the ELBO at lambda_K.
* ``vae+svi``: the encoder is trained on the ELBO at lambda_0 (decoder held
  fixed in that term), the decoder on the ELBO at the refined lambda_K.
* ``vae+svi+kl``: as ``vae+svi`` but the encoder is trained towards the refined
  posterior, minimising KL(q_{lambda_K} || q_{lambda_0}).
* ``savae``: the ELBO at lambda_K with gradients through the K steps into the
  encoder and the decoder (:func:`savae_fast.refine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from savae_fast.gaussian import gaussian_kl, gaussian_kl_between, sample
from savae_fast.refine import RefineStats, refine
from savae_fast.app.train.config import OPTIM_N2N, TrainConfig
from savae_fast.reference import optim_n2n


@dataclass
class StepStats:
    loss: Tensor  # scalar to minimise
    nll: Tensor  # [B], at the posterior of the reported bound (detached)
    kl: Tensor  # [B] (detached)


class Objective(nn.Module):
    """forward(x, beta) -> StepStats. Wrapping the whole computation in one module lets
    DistributedDataParallel synchronise every parameter's gradient."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, process_group=None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.process_group = process_group
        # how much refine's backward amplified its vector, read after each backward (savae mode)
        self.refine_stats = RefineStats()

    def draw_eps(self, mu: Tensor) -> Tensor:
        """Standard-normal draws of mu's shape for the ELBO's sample (a data-parallel
        objective draws the global batch's and keeps its share)."""
        return torch.randn_like(mu)

    def refine_noise(self) -> Tensor | None:
        """The inner steps' noise for refine (None: refine draws it)."""
        return None

    def refine_kwargs(self, beta: float) -> dict:
        return dict(self.cfg.refine_options(beta), process_group=self.process_group, noise=self.refine_noise())

    def elbo_terms(self, x, mu, logvar, frozen_decoder: bool = False):
        """(NLL, KL) per example at one sample of N(mu, exp(logvar)); ``frozen_decoder``:
        no gradient into the decoder's parameters (the vae+svi encoder term)."""
        z = sample(mu, logvar, self.draw_eps(mu))
        if frozen_decoder:
            dec = self.model.decoder
            params = {name: p.detach() for name, p in dec.named_parameters()}
            nll = functional_call(dec, params, (x, z))
        else:
            nll = self.model.nll(x, z)
        return nll, gaussian_kl(mu, logvar)

    def forward(self, x: Tensor, beta: float) -> StepStats:
        mode, model = self.cfg.mode, self.model
        if mode == "autoreg":
            nll = model.nll(x)
            return StepStats(nll.mean(), nll.detach(), torch.zeros_like(nll))
        nll_fn = lambda z: model.nll(x, z)  # noqa: E731
        if mode == "vae":
            mu, logvar = model.encode(x)
            nll, kl = self.elbo_terms(x, mu, logvar)
            return StepStats((nll + beta * kl).mean(), nll.detach(), kl.detach())
        if mode == "svi":
            zeros = torch.zeros((x.shape[0], self.cfg.latent_dim), device=x.device)
            mu0, logvar0 = zeros, zeros
        else:
            mu0, logvar0 = model.encode(x)
        if mode == "savae":
            if self.cfg.hvp == OPTIM_N2N:  # the published algorithm, for comparison (reference.optim_n2n)
                mu_k, logvar_k = optim_n2n(mu0, logvar0, nll_fn, model.decoder.parameters(), noise=self.refine_noise(),
                                           **self.cfg.optimiser_options(beta))
            else:
                mu_k, logvar_k = refine(mu0, logvar0, nll_fn, model.decoder.parameters(), stats=self.refine_stats,
                                        **self.refine_kwargs(beta))
            nll, kl = self.elbo_terms(x, mu_k, logvar_k)
            return StepStats((nll + beta * kl).mean(), nll.detach(), kl.detach())
        with torch.no_grad():
            mu_k, logvar_k = refine(mu0.detach(), logvar0.detach(), nll_fn, **self.refine_kwargs(beta))
        nll, kl = self.elbo_terms(x, mu_k, logvar_k)
        loss = (nll + beta * kl).mean()
        if mode == "vae+svi":
            nll0, kl0 = self.elbo_terms(x, mu0, logvar0, frozen_decoder=True)
            loss = loss + (nll0 + beta * kl0).mean()
        elif mode == "vae+svi+kl":
            loss = loss + gaussian_kl_between(mu_k, logvar_k, mu0, logvar0).mean()
        return StepStats(loss, nll.detach(), kl.detach())
