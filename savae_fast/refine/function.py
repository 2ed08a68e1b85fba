"""The differentiable K-step SVI refinement as a torch.autograd.Function.

Forward: the authors' optimiser (ELBO gradient, per-tensor clipping, heavy-ball
momentum) driven by the fused ``forward_step`` operator, one decoder
evaluation per step.

Backward: the reverse pass through the K steps (docs/math.md, "Reverse pass"):
the clip Jacobian and the Gaussian second-order terms are exact (fused
``reverse_direction`` / ``reverse_update``); only the decoder's Hessian-vector
products ``Hzz u`` and the mixed term ``d(g_theta)/dz . u`` come from the
decoder, by the configured method of :mod:`savae_fast.refine.hvp`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from savae_fast.ops import Backend
from savae_fast.refine.config import NonFinite, RefineConfig
from savae_fast.refine.decoder import decoder_grads, decoder_precision_scope
from savae_fast.refine.hvp import ReverseRun
from savae_fast.refine.nonfinite import all_finite, nonfinite_error, zero_nonfinite
from savae_fast.refine.rng import RandomnessCheck, RngState
from savae_fast.refine.tape import Tape


def run_forward(cfg: RefineConfig, be: Backend, nll_fn: Callable, mu: Tensor, logvar: Tensor,
                noise: Tensor, params: Sequence[Tensor], record: bool):
    """K inner steps; returns (mu_K, logvar_K, tape or None)."""
    with decoder_precision_scope(cfg.full_fp32, mu.device):
        return _forward_steps(cfg, be, nll_fn, mu, logvar, noise, params, record)


def _forward_steps(cfg: RefineConfig, be: Backend, nll_fn: Callable, mu: Tensor, logvar: Tensor,
                   noise: Tensor, params: Sequence[Tensor], record: bool):
    steps, policy = cfg.steps, cfg.on_nonfinite
    sum_param_grads = record and cfg.hvp.sums_param_grads_in_forward and len(params) > 0
    keep = record or policy is NonFinite.RAISE  # the raise check names the first bad step from the tape
    tape = Tape.for_params(params, sum_param_grads) if keep else None
    save_rng = record and cfg.preserve_rng_state
    decoder_params = params if sum_param_grads else ()
    scalars = cfg.scalars.for_forward_step()
    p_mu = torch.zeros_like(mu)
    p_logvar = torch.zeros_like(logvar)
    eps = noise.unbind(0)
    z = be.sample(mu, logvar, eps[0])
    undecided = save_rng  # whether the decoder draws random numbers (rng.RandomnessCheck)
    for k in range(steps):
        step_fn = nll_fn
        if save_rng:
            tape.rng.append(RngState(mu.device))
            if undecided:  # the first step, or the next one with the probe when it could not tell
                step_fn = RandomnessCheck(nll_fn, tape.rng[k], probe=k > 0)
        grad_z, param_grads = decoder_grads(step_fn, z, decoder_params)
        if step_fn is not nll_fn:
            undecided = step_fn.found is None
            if step_fn.found is False:
                # a decoder without random draws needs no replay: never set the process-wide generators
                save_rng, tape.rng = False, None
        if policy is NonFinite.ZERO:
            grad_z = zero_nonfinite(grad_z)
            param_grads = [zero_nonfinite(g) for g in param_grads]
        if sum_param_grads:
            tape.accumulate_param_grads(param_grads)
        param_grads = None  # not alive during the next decoder pass
        mu_n, logvar_n, p_mu, p_logvar, z, norms = be.forward_step(
            mu, logvar, p_mu, p_logvar, eps[k], grad_z, eps[k + 1] if k + 1 < steps else None, *scalars)
        if keep:
            tape.record_step(mu, logvar, grad_z, norms)
        mu, logvar = mu_n, logvar_n
    # (the clip norms too: a gradient norm that overflows, e.g. float32 logvar above ~44, makes
    # the clip factor 0, and the state stops moving while staying finite)
    if policy is NonFinite.RAISE and steps > 0 and not all_finite(mu, logvar, torch.stack(tape.grad_norms)):
        tape.mu.append(mu)
        tape.logvar.append(logvar)
        raise nonfinite_error(tape.first_nonfinite_step())
    return mu, logvar, (tape if record else None)


def _no_replay() -> None:
    pass


def reverse_pass(cfg: RefineConfig, be: Backend, nll_fn: Callable, noise: Tensor, tape: Tape,
                 params: Sequence[Tensor], lbar_mu: Tensor, lbar_logvar: Tensor):
    """(dF/dmu_0, dF/dlogvar_0, refinement part of dF/dtheta) from dF/dlambda_K."""
    method, policy = cfg.hvp, cfg.on_nonfinite
    run = ReverseRun(cfg, be, nll_fn, params, tape)
    lbar_mu, lbar_logvar = method.begin(run, lbar_mu, lbar_logvar)
    direction_scalars = (*cfg.scalars.for_reverse_direction(), int(method.fd_mode), cfg.fd_eps)
    update_scalars = cfg.scalars.for_reverse_update()
    pbar_mu = torch.zeros_like(lbar_mu)
    pbar_logvar = torch.zeros_like(lbar_logvar)
    eps = noise.unbind(0)
    # raise: the decoder's second-order terms of every reverse step, kept (K x [B, D],
    # like the tape) and looked at only if the result is not finite, to name the step
    screened = []
    replays = cfg.preserve_rng_state and bool(tape.rng)
    caller_rng = RngState(lbar_mu.device) if replays else None
    try:
        for k in reversed(range(cfg.steps)):
            logvar_k, eps_k, grad_z_k = tape.logvar[k], eps[k], tape.grad_z[k]
            pbar_mu, pbar_logvar, v_mu, v_logvar, u, z_eval, row_weight = be.reverse_direction(
                lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, tape.mu[k], logvar_k, eps_k, grad_z_k,
                tape.grad_norms[k], *direction_scalars)
            replay = tape.rng[k].restore if replays else _no_replay
            terms = method.decoder_terms(run, k, z_eval, u, row_weight, replay)
            hvp_a, hvp_b, hvp_scale = terms.hvp_a, terms.hvp_b, terms.hvp_scale
            if policy is NonFinite.ZERO:  # a non-finite second-order term contributes nothing
                ok = torch.isfinite(hvp_a) if hvp_b is None else torch.isfinite(hvp_a) & torch.isfinite(hvp_b)
                hvp_a = torch.where(ok, hvp_a, 0.0)
                hvp_b = None if hvp_b is None else torch.where(ok, hvp_b, 0.0)
            elif policy is NonFinite.RAISE:
                screened.append(terms.screened)
            lbar_mu, lbar_logvar, pbar_mu, pbar_logvar = be.reverse_update(
                lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, v_mu, v_logvar, logvar_k, eps_k, grad_z_k, hvp_a, hvp_b,
                hvp_scale, *update_scalars)
    finally:
        if caller_rng is not None:
            caller_rng.restore()

    lbar_mu, lbar_logvar, theta_bar = method.finish(run, lbar_mu, lbar_logvar)
    # float32 buffers of float16/bfloat16 parameters back to the parameters' dtype
    theta_bar = [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(theta_bar, params)]
    if policy is NonFinite.ZERO:
        lbar_mu, lbar_logvar = zero_nonfinite(lbar_mu), zero_nonfinite(lbar_logvar)
        theta_bar = [zero_nonfinite(t) for t in theta_bar]
    elif policy is NonFinite.RAISE and not all_finite(lbar_mu, lbar_logvar, *theta_bar):
        bad = [k for k, terms in zip(reversed(range(cfg.steps)), screened) if not all_finite(*terms)]
        if bad:
            raise nonfinite_error(f"the decoder's second-order terms at inner step {max(bad)} are not finite "
                                  "(in the backward pass)")
        raise nonfinite_error("the gradient of the refinement w.r.t. mu, logvar or the decoder parameters is "
                              "not finite (in the backward pass)")
    return lbar_mu, lbar_logvar, theta_bar


class RefineFunction(torch.autograd.Function):
    """apply(cfg, backend, nll_fn, noise, mu0, logvar0, *params) -> (mu_K, logvar_K)."""

    @staticmethod
    def forward(ctx, cfg: RefineConfig, be: Backend, nll_fn: Callable, noise: Tensor, mu0: Tensor,
                logvar0: Tensor, *params: Tensor):
        diff_params = [p for p in params if p.requires_grad]
        mu_k, logvar_k, tape = run_forward(cfg, be, nll_fn, mu0, logvar0, noise, diff_params, record=True)
        ctx.cfg, ctx.be, ctx.nll_fn, ctx.noise = cfg, be, nll_fn, noise
        ctx.tape = tape
        ctx.diff_params = diff_params
        ctx.param_requires_grad = [p.requires_grad for p in params]
        return mu_k, logvar_k

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mu: Tensor | None, grad_logvar: Tensor | None):
        tape: Tape | None = ctx.tape
        if tape is None:
            raise RuntimeError(
                "refine: trying to backward through the refinement a second time; its saved state "
                "was freed after the first backward (call refine again instead of retain_graph=True)"
            )
        ctx.tape = None
        cfg = ctx.cfg
        ref = tape.mu[0]
        lbar_mu = grad_mu.contiguous() if grad_mu is not None else torch.zeros_like(ref)
        lbar_logvar = grad_logvar.contiguous() if grad_logvar is not None else torch.zeros_like(ref)
        lbar_mu, lbar_logvar = lbar_mu.to(ref.dtype), lbar_logvar.to(ref.dtype)
        with decoder_precision_scope(cfg.full_fp32, ref.device):
            lbar_mu, lbar_logvar, theta_bar = reverse_pass(cfg, ctx.be, ctx.nll_fn, ctx.noise, tape,
                                                           ctx.diff_params, lbar_mu, lbar_logvar)
        it = iter(theta_bar)
        out_params = [next(it) if needs else None for needs in ctx.param_requires_grad]
        return (None, None, None, None, lbar_mu, lbar_logvar, *out_params)
