"""Evaluation of a trained model: ELBO bound of the NLL (with test-time refinement
for the svi rows, as in the paper), KL, perplexity (text), an importance-weighted
NLL estimate from S samples of the (refined) posterior, the mutual information
I(x; z) and the number of active units (He et al. 2019)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from savae_fast.gaussian import LOG_2PI, gaussian_kl, gaussian_log_density, standard_normal_log_density
from savae_fast.refine import refine


@torch.no_grad()
def posterior(model, cfg, x: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor] | None:
    """The posterior the reported bound uses: the encoder's (vae), refined from zeros (svi)
    or refined from the encoder's (vae+svi, vae+svi+kl, savae); None for autoreg."""
    if cfg.mode == "autoreg":
        return None
    if cfg.mode == "svi":
        mu = torch.zeros((x.shape[0], cfg.latent_dim), device=x.device)
        logvar = torch.zeros_like(mu)
    else:
        mu, logvar = model.encode(x)
    if cfg.uses_refinement:
        mu, logvar = refine(mu, logvar, lambda z: model.nll(x, z), **cfg.refine_options(beta))
    return mu, logvar


@torch.no_grad()
def evaluate(model, cfg, batches: list[Tensor], device, num_tokens: int = 0, iw_samples: int | None = None,
             elbo_samples: int | None = None, full: bool = True, progress=None) -> dict:
    """Metrics over ``batches`` (model in eval mode). ``full=False`` skips the costly IW/MI/AU.
    ``progress``: an object with ``update()`` called after each batch (metrics.Progress)."""
    was_training = model.training
    model.eval()
    iw_samples = cfg.eval_samples if iw_samples is None else iw_samples
    elbo_samples = cfg.eval_elbo_samples if elbo_samples is None else elbo_samples
    n, nll_sum, kl_sum, iw_sum = 0, 0.0, 0.0, 0.0
    mus, logvars = [], []
    for x in batches:
        x = x.to(device)
        q = posterior(model, cfg, x)
        if q is None:
            nll = model.nll(x)
            nll_sum += float(nll.sum())
            iw_sum += float(nll.sum())
        else:
            mu, logvar = q
            kl = gaussian_kl(mu, logvar)
            rec = torch.stack([model.nll(x, mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
                               for _ in range(elbo_samples)]).mean(0)
            nll_sum += float((rec + kl).sum())
            kl_sum += float(kl.sum())
            if full:
                iw_sum += float(importance_weighted_nll(model, x, mu, logvar, iw_samples,
                                                        heartbeat=getattr(progress, "beat", None)).sum())
                mus.append(mu.cpu())
                logvars.append(logvar.cpu())
        n += x.shape[0]
        if progress is not None:
            progress.update()
    model.train(was_training)
    out = {"examples": n, "nll_bound": nll_sum / n, "kl": kl_sum / n}
    if num_tokens:
        out["ppl_bound"] = math.exp(nll_sum / num_tokens)
    if full:
        out["iw_nll"] = iw_sum / n
        if num_tokens:
            out["iw_ppl"] = math.exp(iw_sum / num_tokens)
        if mus:
            mu, logvar = torch.cat(mus), torch.cat(logvars)
            out["mutual_info"], out["mutual_info_se"] = mutual_information_se(mu, logvar)
            out["active_units"] = active_units(mu)
    return out


@torch.no_grad()
def importance_weighted_nll(model, x: Tensor, mu: Tensor, logvar: Tensor, samples: int,
                            chunk: int = 50, heartbeat=None) -> Tensor:
    """-log (1/S sum_s p(x|z_s) p(z_s) / q(z_s)), z_s ~ q = N(mu, exp(logvar)); per example.
    ``heartbeat(fraction)``: called after each chunk of samples (progress within a long batch)."""
    log_ws = []
    batch, latent = mu.shape
    for start in range(0, samples, chunk):
        s = min(chunk, samples - start)
        z = mu.unsqueeze(0) + torch.exp(0.5 * logvar).unsqueeze(0) * torch.randn((s, batch, latent), device=mu.device)
        xs = x.unsqueeze(0).expand(s, *x.shape).reshape(s * batch, *x.shape[1:])
        log_px_z = -model.nll(xs, z.reshape(s * batch, latent)).view(s, batch)
        log_pz = standard_normal_log_density(z)
        log_qz = gaussian_log_density(z, mu.unsqueeze(0), logvar.unsqueeze(0))
        log_ws.append(log_px_z + log_pz - log_qz)
        if heartbeat is not None:
            heartbeat((start + s) / samples)
    log_w = torch.cat(log_ws)
    return -(torch.logsumexp(log_w, dim=0) - math.log(samples))


def mutual_information_terms(mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-example terms of the I(x; z) estimate: -H(q(z|x_i)) - log q(z_i), z_i ~ q(z|x_i)."""
    n, latent = mu.shape
    neg_entropy = -0.5 * latent * LOG_2PI - 0.5 * (1 + logvar).sum(1)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    log_q = torch.stack([gaussian_log_density(z[i:i + 1], mu, logvar) for i in range(n)])  # [n, n]
    log_qz = torch.logsumexp(log_q, dim=1) - math.log(n)
    return neg_entropy - log_qz


def mutual_information(mu: Tensor, logvar: Tensor) -> float:
    """I(x; z) under q(z|x) p_data(x) (He et al. 2019): E[log q(z|x)] - E[log q(z)], with the
    aggregate posterior q(z) the mixture of the test set's posteriors, one z per example. The
    estimate is biased at small sample sizes (the mixture includes each example's own posterior)
    and noisy: it can come out below 0, which the true value never is (see
    :func:`mutual_information_se`)."""
    return float(mutual_information_terms(mu, logvar).mean())


def mutual_information_se(mu: Tensor, logvar: Tensor) -> tuple[float, float]:
    """(the estimate of :func:`mutual_information`, its standard error over the examples)."""
    terms = mutual_information_terms(mu, logvar)
    se = float(terms.std() / math.sqrt(terms.numel())) if terms.numel() > 1 else float("nan")
    return float(terms.mean()), se


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across the data: Cov_x(E_q[z_d]) > threshold."""
    if mu.shape[0] < 2:
        return 0
    return int((mu.var(dim=0) > threshold).sum())
