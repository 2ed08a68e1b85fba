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

import functools
import threading
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

from savae_fast.ops import Backend
from savae_fast.refine.config import NonFinite, RefineConfig
from savae_fast.refine.decoder import decoder_grads, decoder_precision_scope
from savae_fast.refine.hvp import ReverseRun
from savae_fast.refine.nonfinite import all_finite, nonfinite_error, zero_nonfinite
from savae_fast.refine.probe import (DecoderProbe, DecoderState, check_read_unchanged, hooked,
                                    suspended_tensor_hooks)
from savae_fast.refine.rng import RngState
from savae_fast.refine.stabilize import EXPLODING_GAIN, RefineStats, ReverseMonitor, warn_exploding
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
    # the first decoder call of a differentiable refinement runs under the probe (refine/probe.py)
    probe = DecoderProbe(params) if record and cfg.check_decoder else None
    state = None  # the tensors the decoder writes in place, saved before every step
    if record and cfg.hvp.points_per_step > 1:
        tape.stack_points = cfg.stack_points
    if record and cfg.batch_coupled:  # declared: honoured whether or not the probe runs
        tape.coupled = True
        if tape.stack_points:
            warn_unstacked("batch_coupled=True")
            tape.stack_points = 0
    first_reversed = steps - cfg.backward_steps  # truncation: the reverse pass starts no lower
    for k in range(steps):
        step_fn = nll_fn
        if save_rng:
            tape.rng.append(RngState(mu.device))
        if state is not None:
            state.snapshot()
        if k == 0 and probe is not None:
            step_fn = functools.partial(probe.run, nll_fn)
        grad_z, param_grads = decoder_grads(step_fn, z, decoder_params)
        if step_fn is not nll_fn:
            probe.check()
            tape.read = probe.read_versions()
            tape.coupled = cfg.batch_coupled if cfg.batch_coupled is not None else probe.coupling is not None
            if probe.written:
                state = tape.state = DecoderState(probe.written)
            # batch norm in training mode over one example couples the n points of a stacked call
            if tape.stack_points and (tape.coupled or probe.batch_statistics):
                warn_unstacked(probe.coupling or probe.batch_statistics or "batch_coupled=True")
                tape.stack_points = 0
            if tape.stack_points:
                probe.check_stackable()
        if policy is NonFinite.ZERO:
            grad_z = zero_nonfinite(grad_z)
            param_grads = [zero_nonfinite(g) for g in param_grads]
        if sum_param_grads and k >= first_reversed:
            tape.accumulate_param_grads(param_grads)
        param_grads = None  # not alive during the next decoder pass
        mu_n, logvar_n, p_mu, p_logvar, z, norms = be.forward_step(
            mu, logvar, p_mu, p_logvar, eps[k], grad_z, eps[k + 1] if k + 1 < steps else None, *scalars)
        if keep:
            tape.record_step(mu, logvar, grad_z, norms)
        mu, logvar = mu_n, logvar_n
    if save_rng and not _decoder_drew(tape.rng, probe):
        tape.rng = None  # a decoder without random draws needs no replay: never set the process-wide generators
    if save_rng and tape.rng and tape.stack_points and probe is None:
        raise RuntimeError("refine: stack_points with a decoder that draws random numbers needs check_decoder=True, "
                           "which finds out whether its draws come from savae_fast.nn.Dropout (the same at every "
                           "point of an example) or not")
    # (the clip norms too: a gradient norm that overflows, e.g. float32 logvar above ~44, makes
    # the clip factor 0, and the state stops moving while staying finite)
    if policy is NonFinite.RAISE and steps > 0 and not all_finite(mu, logvar, torch.stack(tape.grad_norms)):
        tape.mu.append(mu)
        tape.logvar.append(logvar)
        raise nonfinite_error(tape.first_nonfinite_step())
    return mu, logvar, (tape if record else None)


_warned_unstacked = False


def warn_unstacked(cause: str) -> None:
    """Once per process: stack_points ignored for a decoder that couples the examples."""
    global _warned_unstacked
    if _warned_unstacked:
        return
    _warned_unstacked = True
    warnings.warn(f"refine: stack_points ignored: the decoder couples the examples of the batch ({cause}), and "
                  "batch statistics over stacked points would mix an example's points; its difference points are "
                  "evaluated one call each", UserWarning, stacklevel=4)


def _decoder_drew(states: list, probe: DecoderProbe | None) -> bool:
    """Whether the forward's decoder calls drew random numbers, given the generator states
    before each call. The probe sees the first call's operators; a later call that draws
    moves the generators past their state before the second call. With other threads alive a
    move may be theirs: then the probe's answer stands (without a probe, a move counts)."""
    if probe is not None and probe.draws:
        return True
    first = 1 if probe is not None else 0
    if len(states) <= first or states[first].is_current():
        return False
    return probe is None or threading.active_count() == 1


def _no_replay() -> None:
    pass


def _replay(tape: Tape, k: int, rng: bool) -> Callable[[], None]:
    """What to do before each decoder evaluation of reverse step k: the random-number state
    and the decoder's own state (tensors it writes in place) of forward step k."""
    if tape.state is None:
        return tape.rng[k].restore if rng else _no_replay

    def replay():
        if rng:
            tape.rng[k].restore()
        tape.state.restore_step(k)

    return replay


def reverse_pass(cfg: RefineConfig, be: Backend, nll_fn: Callable, noise: Tensor, tape: Tape,
                 params: Sequence[Tensor], lbar_mu: Tensor, lbar_logvar: Tensor, stats: RefineStats | None = None):
    """(dF/dmu_0, dF/dlogvar_0, refinement part of dF/dtheta) from dF/dlambda_K.

    Truncated (cfg.backward_steps < K): the reverse steps of the last backward_steps inner steps,
    and the adjoint at that point returned as dF/dlambda_0. The monitor (refine/stabilize.py)
    measures the adjoint's growth after every reverse step and applies cfg.backward_clip."""
    method, policy = cfg.hvp, cfg.on_nonfinite
    run = ReverseRun(cfg, be, nll_fn, params, tape)
    lbar_mu, lbar_logvar = method.begin(run, lbar_mu, lbar_logvar)
    # (relative to the incoming adjoint: fd_forward's normalisation above changes nothing)
    # statistics where asked for, or for the warning (its host read) where nothing bounds the growth
    warns = policy is not NonFinite.IGNORE and not 0 < cfg.backward_clip <= EXPLODING_GAIN
    monitor = ReverseMonitor.start(cfg, lbar_mu, lbar_logvar, records=stats is not None or warns)
    direction_scalars = (*cfg.scalars.for_reverse_direction(), int(method.direction_fd_mode(tape)), cfg.fd_eps)
    update_scalars = cfg.scalars.for_reverse_update()
    pbar_mu = torch.zeros_like(lbar_mu)
    pbar_logvar = torch.zeros_like(lbar_logvar)
    eps = noise.unbind(0)
    # raise: the decoder's second-order terms of every reverse step, kept (K x [B, D],
    # like the tape) and looked at only if the result is not finite, to name the step
    screened = []
    replays = cfg.preserve_rng_state and bool(tape.rng)
    caller_rng = RngState(lbar_mu.device) if replays else None
    caller_state = tape.state.current() if tape.state is not None else None
    try:
        for k in reversed(range(cfg.steps - cfg.backward_steps, cfg.steps)):
            logvar_k, eps_k, grad_z_k = tape.logvar[k], eps[k], tape.grad_z[k]
            pbar_mu, pbar_logvar, v_mu, v_logvar, u, z_eval, row_weight = be.reverse_direction(
                lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, tape.mu[k], logvar_k, eps_k, grad_z_k,
                tape.grad_norms[k], *direction_scalars)
            replay = _replay(tape, k, replays)
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
            if monitor is not None:
                lbar_mu, lbar_logvar, pbar_mu, pbar_logvar = monitor.after_step(lbar_mu, lbar_logvar, pbar_mu,
                                                                                pbar_logvar)
    finally:
        if caller_rng is not None:
            caller_rng.restore()
        if caller_state is not None:
            tape.state.restore(caller_state)

    if monitor is not None:
        lbar_mu, lbar_logvar = monitor.finish(lbar_mu, lbar_logvar)
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
    if monitor is not None:
        monitor.fill(stats)
        exploding = monitor.exploding() if warns else None  # (no host read where a graph is captured)
        if exploding is not None:
            warn_exploding(*exploding, monitor.steps)
    return lbar_mu, lbar_logvar, theta_bar


_TWICE = (b"refine: differentiating the gradient of a refinement (a second derivative through refine, e.g. "
          b"autograd.grad(..., create_graph=True) and then a gradient of that) is not supported: refine's backward "
          b"is itself a reverse pass with difference quotients, not a differentiable graph. For higher-order "
          b"derivatives use savae_fast.reference.unrolled")


def _differentiable_once(backward):
    """torch.autograd.function.once_differentiable with an error that names refine: a backward
    under create_graph=True returns gradients whose own gradient raises it."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled() or not any(isinstance(g, Tensor) and g.requires_grad for g in grads):
            return outputs

        def alias(t):
            if t is None:
                return None
            t = t.detach()
            t.requires_grad = True
            return t

        return torch._C._functions.DelayedError(_TWICE, len(outputs))(*[alias(t) for t in outputs])

    return wrapper


def _refuse_batched_grads(*grads) -> None:
    from torch._C import _functorch

    # autograd.grad(is_grads_batched=True) runs the backward under the legacy vmap
    batched = (_functorch.is_batchedtensor, getattr(_functorch, "is_legacy_batchedtensor", lambda t: False))
    if any(isinstance(g, Tensor) and any(f(g) for f in batched) for g in grads):
        raise RuntimeError(
            "refine: its backward does not support batched gradients (autograd.grad(..., is_grads_batched=True) "
            "or torch.func.vmap over a backward): call autograd.grad once per gradient output")


class RefineFunction(torch.autograd.Function):
    """apply(cfg, backend, nll_fn, noise, stats, mu0, logvar0, *params) -> (mu_K, logvar_K).

    Saves noise, mu0, logvar0 and the parameters for backward, so that changing any of them
    in place before the backward is autograd's usual error, not a wrong gradient. The hooks
    registered on the parameters (Tensor.register_hook) do not fire in refine's own
    gradient computations: they see the parameters' whole gradient once, as without refine.
    """

    @staticmethod
    def forward(ctx, cfg: RefineConfig, be: Backend, nll_fn: Callable, noise: Tensor, stats: RefineStats | None,
                mu0: Tensor, logvar0: Tensor, *params: Tensor):
        diff_params = [p for p in params if p.requires_grad]
        with suspended_tensor_hooks(hooked(diff_params)):
            mu_k, logvar_k, tape = run_forward(cfg, be, nll_fn, mu0, logvar0, noise, diff_params, record=True)
        ctx.cfg, ctx.be, ctx.nll_fn, ctx.stats = cfg, be, nll_fn, stats
        ctx.tape = tape
        ctx.save_for_backward(noise, mu0, logvar0, *params)
        ctx.param_requires_grad = [p.requires_grad for p in params]
        return mu_k, logvar_k

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_mu: Tensor | None, grad_logvar: Tensor | None):
        _refuse_batched_grads(grad_mu, grad_logvar)
        tape: Tape | None = ctx.tape
        if tape is None:
            raise RuntimeError(
                "refine: trying to backward through the refinement a second time; its saved state "
                "was freed after the first backward (call refine again instead of retain_graph=True)"
            )
        noise, _, _, *params = ctx.saved_tensors  # (autograd's version check of what backward reads)
        check_read_unchanged(tape.read)  # (the same for the tensors nll_fn reads)
        ctx.tape = None
        diff_params = [p for p, needs in zip(params, ctx.param_requires_grad) if needs]
        cfg = ctx.cfg
        ref = tape.mu[0]
        lbar_mu = grad_mu.contiguous() if grad_mu is not None else torch.zeros_like(ref)
        lbar_logvar = grad_logvar.contiguous() if grad_logvar is not None else torch.zeros_like(ref)
        lbar_mu, lbar_logvar = lbar_mu.to(ref.dtype), lbar_logvar.to(ref.dtype)
        with decoder_precision_scope(cfg.full_fp32, ref.device), suspended_tensor_hooks(hooked(diff_params)):
            lbar_mu, lbar_logvar, theta_bar = reverse_pass(cfg, ctx.be, ctx.nll_fn, noise, tape, diff_params,
                                                           lbar_mu, lbar_logvar, ctx.stats)
        it = iter(theta_bar)
        out_params = [next(it) if needs else None for needs in ctx.param_requires_grad]
        return (None, None, None, None, None, lbar_mu, lbar_logvar, *out_params)
