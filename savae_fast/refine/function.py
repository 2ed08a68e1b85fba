"""The differentiable K-step SVI refinement as a torch.autograd.Function.

Forward: the authors' optimiser (ELBO gradient, per-tensor clipping, heavy-ball
momentum) driven by the fused ``forward_step`` operator, one decoder
evaluation per step.

Backward: the reverse pass through the K steps (see the math notes in the
README): the clip Jacobian and the Gaussian second-order terms are exact
(fused ``reverse_direction`` / ``reverse_update``); only the decoder's
Hessian-vector products ``Hzz u`` and the mixed term ``d(g_theta)/dz . u`` come
from the decoder, by

* ``fd_forward``: one-sided difference in z-space, one decoder pass per
  reverse step. The forward sums the base-point parameter gradients into one
  buffer (|theta| values), never K copies; the reverse pass is linear in its
  incoming gradient, which is normalised so that a step size fixed in advance
  is well conditioned, then scaled back;
* ``fd_central``: two-sided difference in z-space with a per-example step,
  two decoder passes per reverse step, nothing parameter-sized kept between
  steps but the gradient being built;
* ``exact``: double backward through the decoder.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from savae_fast.ops import Backend
from savae_fast.ops.constants import FD_CENTRAL, FD_EXACT, FD_FORWARD
from savae_fast.refine.cudnn import TwiceDifferentiable
from savae_fast.refine.precision import full_fp32
from savae_fast.refine.rng import RngState

HVP_MODES = {"fd_forward": FD_FORWARD, "fd_central": FD_CENTRAL, "exact": FD_EXACT}


@dataclass(frozen=True)
class RefineConfig:
    """Validated hyper-parameters of one refine call."""

    steps: int
    lr_mu: float
    lr_logvar: float
    momentum: float
    max_grad_norm: float
    kl_weight: float
    scale: float  # s in L = s * sum_b [NLL_b + beta KL_b]
    hvp: str
    fd_eps: float
    preserve_rng_state: bool
    process_group: object = None  # data parallel: batch-coupled reductions summed over its processes
    global_batch: int = 0  # examples over all processes (0: this batch only)
    on_nonfinite: str = "raise"  # "raise" | "zero" | "ignore"
    full_fp32: bool = False  # decoder evaluations with TF32 switched off (fp32_precision="ieee")

    @property
    def fd_mode(self) -> int:
        return HVP_MODES[self.hvp]


@dataclass
class _Tape:
    """What the reverse pass needs from each forward step k (all [B, D] but norms [2])."""

    mu: list
    logvar: list
    grad_z: list
    grad_norms: list
    rng: list
    # fd_forward: sum over the steps of dNLL/dtheta at z_k, one buffer per parameter
    # (float32 for float16/bfloat16 parameters). A plain sum: compensated summation
    # (twice the memory) measured 4.0e-5 instead of 5.1e-5 relative gradient error on
    # the small LSTM benchmark, where the difference quotient itself dominates.
    param_grad_sum: list | None
    cast_param_grads: bool = False

    def accumulate_param_grads(self, be: Backend, grads) -> None:
        """param_grad_sum += grads; None entries (parameters the loss does not use) skipped."""
        if self.cast_param_grads:
            grads = [None if g is None else g.to(b.dtype) for g, b in zip(grads, self.param_grad_sum)]
        be.accumulate_(self.param_grad_sum, grads)


def _accumulation_dtype(p: Tensor) -> torch.dtype:
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


NONFINITE_MODES = ("raise", "zero", "ignore")


def _zero_nonfinite(t: Tensor | None) -> Tensor | None:
    return None if t is None else torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _all_finite(*tensors) -> bool:
    """One host read for all the tensors. A sum is non-finite when any term is, so one
    reduction per tensor screens them; only a failed screen (or a sum of finite terms
    that overflowed) pays for the exact element-wise test."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float64) for t in tensors])).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _first_bad_step(tape: "_Tape") -> str:
    for k in range(len(tape.grad_z)):
        if not _all_finite(tape.grad_z[k]):
            return f"the decoder's gradient dNLL/dz at inner step {k} is not finite"
        if k + 1 < len(tape.mu) and not _all_finite(tape.mu[k + 1], tape.logvar[k + 1]):
            return f"the variational parameters after inner step {k} are not finite"
    return "the variational parameters after the last inner step are not finite"


def nonfinite_error(what: str) -> FloatingPointError:
    return FloatingPointError(
        f"refine: {what}. Check the decoder (and the scale of mu/logvar: logvar is used as "
        "exp(logvar/2)); pass on_nonfinite='zero' to treat non-finite decoder derivatives as zero, "
        "or on_nonfinite='ignore' to skip the checks")


def _check_nll(nll: Tensor, batch: int) -> None:
    if not isinstance(nll, Tensor):
        raise TypeError(f"refine: nll_fn must return a Tensor of per-example NLL, got {type(nll).__name__}")
    if nll.shape != (batch,):
        raise ValueError(
            f"refine: nll_fn must return per-example negative log-likelihoods of shape [{batch}], "
            f"got shape {tuple(nll.shape)} (do not reduce over the batch)"
        )
    if not nll.is_floating_point():
        raise TypeError(f"refine: nll_fn must return a floating-point tensor, got {nll.dtype}")


_set_grad_enabled = torch._C._set_grad_enabled


def decoder_grads(nll_fn: Callable, z: Tensor, params: Sequence[Tensor], weight: Tensor | None = None):
    """dL/dz and dL/dtheta of L = sum_b w_b NLL_b(z_b) (w = 1 when ``weight`` is None).

    Returns (grad_z, param_grads) with None for parameters the loss does not use.
    """
    batch = z.shape[0]
    # The grad-mode switch of torch.enable_grad without its Python context manager:
    # this runs 2K times per refine call, next to the decoder passes.
    grad_was_enabled = torch.is_grad_enabled()
    _set_grad_enabled(True)
    try:
        z = z.detach().requires_grad_(True)
        nll = nll_fn(z)
        _check_nll(nll, batch)
        loss = nll.sum() if weight is None else (nll * weight.to(nll.dtype)).sum()
        if not loss.requires_grad:  # decoder ignores z and has no trainable parameters
            return torch.zeros_like(z), [None] * len(params)
        grads = torch.autograd.grad(loss, (z, *params), allow_unused=True)
    finally:
        _set_grad_enabled(grad_was_enabled)
    grad_z = grads[0] if grads[0] is not None else torch.zeros_like(z)
    return grad_z, list(grads[1:])


def decoder_hvp(nll_fn: Callable, z: Tensor, u: Tensor, params: Sequence[Tensor], evaluations: TwiceDifferentiable):
    """Exact (Hzz u, d/dtheta (g_z . u)) by double backward through the decoder
    (``evaluations`` runs the decoder without cuDNN where its RNNs would forbid that)."""
    batch = z.shape[0]
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        nll = evaluations.evaluate(functools.partial(nll_fn, z))
        _check_nll(nll, batch)
        if not nll.requires_grad:
            return torch.zeros_like(z), [None] * len(params)
        advice = ("Use hvp='fd_central' or hvp='fd_forward', or make the decoder twice differentiable "
                  "(once_differentiable functions are not; cuDNN RNNs are run without cuDNN for this)")
        try:
            (grad_z,) = torch.autograd.grad(nll.sum(), z, create_graph=True, allow_unused=True)
            if grad_z is None:  # the decoder ignores z: no second-order terms
                return torch.zeros_like(z), [None] * len(params)
            if not grad_z.requires_grad or evaluations.went_through_once_differentiable(grad_z):
                # Either the NLL is linear in z with no trainable parameters, or the
                # backward is not differentiable; autograd cannot tell them apart, and
                # returning zeros for the second case would be a silent wrong answer.
                raise RuntimeError("the decoder's gradient w.r.t. z has no autograd graph under "
                                   "create_graph=True, or went through a once_differentiable backward")
            grads = torch.autograd.grad(grad_z, (z, *params), grad_outputs=u, allow_unused=True)
        except RuntimeError as exc:
            raise RuntimeError(
                f"refine(hvp='exact') differentiates the decoder twice, and this decoder does not support "
                f"double backward. {advice} (original error: {exc})"
            ) from exc
    hzz_u = grads[0] if grads[0] is not None else torch.zeros_like(z)
    return hzz_u, list(grads[1:])


def decoder_precision_scope(cfg: RefineConfig, device: torch.device):
    """Where refine's decoder evaluations run: in full float32 for fp32_precision="ieee"."""
    return full_fp32(device.type) if cfg.full_fp32 else contextlib.nullcontext()


def run_forward(cfg: RefineConfig, be: Backend, nll_fn: Callable, mu: Tensor, logvar: Tensor,
                noise: Tensor, params: Sequence[Tensor], record: bool):
    """K inner steps; returns (mu_K, logvar_K, tape or None)."""
    with decoder_precision_scope(cfg, mu.device):
        return _run_forward(cfg, be, nll_fn, mu, logvar, noise, params, record)


def _run_forward(cfg: RefineConfig, be: Backend, nll_fn: Callable, mu: Tensor, logvar: Tensor,
                 noise: Tensor, params: Sequence[Tensor], record: bool):
    steps = cfg.steps
    acc_params = record and cfg.hvp == "fd_forward" and len(params) > 0
    tape = None
    keep = record or cfg.on_nonfinite == "raise"  # the raise check names the first bad step from the tape
    if keep:
        sums = [torch.zeros_like(p, dtype=_accumulation_dtype(p), memory_format=torch.contiguous_format)
                for p in params] if acc_params else None
        tape = _Tape([], [], [], [], [], sums, acc_params and any(b.dtype != p.dtype for b, p in zip(sums, params)))
    p_mu = torch.zeros_like(mu)
    p_logvar = torch.zeros_like(logvar)
    eps = noise.unbind(0)
    z = be.sample(mu, logvar, eps[0])
    save_rng = record and cfg.preserve_rng_state
    decoder_params = params if acc_params else ()
    for k in range(steps):
        if save_rng:
            tape.rng.append(RngState(mu.device))
        grad_z, param_grads = decoder_grads(nll_fn, z, decoder_params)
        if cfg.on_nonfinite == "zero":
            grad_z = _zero_nonfinite(grad_z)
            param_grads = [_zero_nonfinite(g) for g in param_grads]
        if acc_params:
            tape.accumulate_param_grads(be, param_grads)
        param_grads = None  # not alive during the next decoder pass
        mu_n, logvar_n, p_mu, p_logvar, z, norms = be.forward_step(
            mu, logvar, p_mu, p_logvar, eps[k], grad_z, eps[k + 1] if k + 1 < steps else None, cfg.scale,
            cfg.kl_weight, cfg.lr_mu, cfg.lr_logvar, cfg.momentum, cfg.max_grad_norm)
        if keep:
            tape.mu.append(mu)
            tape.logvar.append(logvar)
            tape.grad_z.append(grad_z)
            tape.grad_norms.append(norms)
        mu, logvar = mu_n, logvar_n
    if cfg.on_nonfinite == "raise" and steps > 0 and not _all_finite(mu, logvar):
        tape.mu.append(mu)
        tape.logvar.append(logvar)
        raise nonfinite_error(_first_bad_step(tape))
    return mu, logvar, (tape if record else None)


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
        tape: _Tape | None = ctx.tape
        if tape is None:
            raise RuntimeError(
                "refine: trying to backward through the refinement a second time; its saved state "
                "was freed after the first backward (call refine again instead of retain_graph=True)"
            )
        ctx.tape = None
        cfg, be, nll_fn, noise = ctx.cfg, ctx.be, ctx.nll_fn, ctx.noise
        params = ctx.diff_params
        ref = tape.mu[0]
        lbar_mu = grad_mu.contiguous() if grad_mu is not None else torch.zeros_like(ref)
        lbar_logvar = grad_logvar.contiguous() if grad_logvar is not None else torch.zeros_like(ref)
        lbar_mu, lbar_logvar = lbar_mu.to(ref.dtype), lbar_logvar.to(ref.dtype)

        with decoder_precision_scope(cfg, ref.device):
            grad_params = _reverse_pass(cfg, be, nll_fn, noise, tape, params, lbar_mu, lbar_logvar)
        lbar_mu, lbar_logvar, theta_bar = grad_params
        it = iter(theta_bar)
        out_params = [next(it) if needs else None for needs in ctx.param_requires_grad]
        return (None, None, None, None, lbar_mu, lbar_logvar, *out_params)


def _no_replay() -> None:
    pass


def _add_param_grads(theta_bar: list, grads: list, alpha: float, zero_nonfinite: bool) -> None:
    """theta_bar += alpha * grads in place; None entries (unused parameters) skipped."""
    for tb, g in zip(theta_bar, grads):
        if g is not None:
            tb.add_(_zero_nonfinite(g) if zero_nonfinite else g, alpha=alpha)


def _reverse_pass(cfg: RefineConfig, be: Backend, nll_fn: Callable, noise: Tensor, tape: _Tape,
                  params: Sequence[Tensor], lbar_mu: Tensor, lbar_logvar: Tensor):
    """dF/dlambda_0 and the refinement part of dF/dtheta from dF/dlambda_K."""
    mode = cfg.fd_mode
    batch = lbar_mu.shape[0]
    s = cfg.scale

    # fd_forward: normalise the incoming adjoint to per-example RMS norm 1, so that
    # the fixed step r = fd_eps perturbs every z by about r; scale back at the end.
    # Device arithmetic only (no host read): the backward stays graph-capturable.
    # A zero adjoint stays zero (the reverse pass is linear).
    out_scale = None
    if mode == FD_FORWARD:
        sq = lbar_mu.square().sum() + lbar_logvar.square().sum()
        if cfg.process_group is not None:  # the same step on every process of a data-parallel run
            from savae_fast.refine.distributed import all_reduce_sum

            sq, batch = all_reduce_sum(sq, cfg.process_group), cfg.global_batch
        out_scale = sq.sqrt() / math.sqrt(batch)
        divisor = torch.where(out_scale > 0, out_scale, torch.ones_like(out_scale))
        lbar_mu = lbar_mu / divisor
        lbar_logvar = lbar_logvar / divisor

    # fd_forward: the forward's sum turns into sum_k [g(z_k + r u_k) - g(z_k)].
    theta_acc = tape.param_grad_sum
    if theta_acc is not None:
        torch._foreach_neg_(theta_acc)
    # fd_central / exact: built in place (float32 for float16/bfloat16 parameters)
    theta_bar = [torch.zeros_like(p, dtype=_accumulation_dtype(p)) for p in params] if mode != FD_FORWARD else None

    pbar_mu = torch.zeros_like(lbar_mu)
    pbar_logvar = torch.zeros_like(lbar_logvar)
    eps = noise.unbind(0)
    # raise mode: the decoder's second-order terms of every reverse step, kept (K x [B, D],
    # like the tape) and looked at only if the result is not finite, to name the step
    step_terms = []
    caller_rng = RngState(lbar_mu.device) if cfg.preserve_rng_state else None
    evaluations = TwiceDifferentiable(lbar_mu.device) if mode == FD_EXACT else None
    try:
        for k in reversed(range(cfg.steps)):
            mu_k, logvar_k, eps_k, gz_k = tape.mu[k], tape.logvar[k], eps[k], tape.grad_z[k]
            pbar_mu, pbar_logvar, v_mu, v_logvar, u, z_eval, row_weight = be.reverse_direction(
                lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu_k, logvar_k, eps_k, gz_k, tape.grad_norms[k],
                s, cfg.kl_weight, cfg.lr_mu, cfg.lr_logvar, cfg.max_grad_norm, mode, cfg.fd_eps)
            replay = tape.rng[k].restore if cfg.preserve_rng_state else _no_replay

            if mode == FD_FORWARD:
                replay()
                hvp_a, g_theta = decoder_grads(nll_fn, z_eval[0], params)
                if cfg.on_nonfinite == "zero":
                    g_theta = [_zero_nonfinite(g) for g in g_theta]
                if theta_acc is not None:
                    tape.accumulate_param_grads(be, g_theta)
                g_theta = None  # not alive during the next decoder pass
                hvp_b, hvp_scale = gz_k, 1.0 / cfg.fd_eps
            elif mode == FD_CENTRAL:
                # theta_bar -= s [g(z + r u) - g(z - r u)] / (2 r), one pass's parameter
                # gradients alive at a time (the 1 / (2 r_b) is in the row weights).
                replay()
                hvp_a, g_plus = decoder_grads(nll_fn, z_eval[0], params, weight=row_weight)
                _add_param_grads(theta_bar, g_plus, -s, cfg.on_nonfinite == "zero")
                g_plus = None
                replay()
                hvp_b, g_minus = decoder_grads(nll_fn, z_eval[1], params, weight=row_weight)
                _add_param_grads(theta_bar, g_minus, s, cfg.on_nonfinite == "zero")
                g_minus = None
                hvp_scale = 1.0
            else:
                replay()
                hvp_a, g_mixed = decoder_hvp(nll_fn, z_eval[0], u, params, evaluations)
                _add_param_grads(theta_bar, g_mixed, -s, cfg.on_nonfinite == "zero")
                g_mixed = None
                hvp_b, hvp_scale = None, 1.0

            if cfg.on_nonfinite == "zero":  # a non-finite second-order term contributes nothing
                ok = torch.isfinite(hvp_a) if hvp_b is None else torch.isfinite(hvp_a) & torch.isfinite(hvp_b)
                hvp_a = torch.where(ok, hvp_a, 0.0)
                hvp_b = None if hvp_b is None else torch.where(ok, hvp_b, 0.0)
            elif cfg.on_nonfinite == "raise":
                # fd_forward's hvp_b is the forward's dNLL/dz, finite once the forward's check passed.
                step_terms.append((hvp_a,) if hvp_b is None or mode == FD_FORWARD else (hvp_a, hvp_b))
            lbar_mu, lbar_logvar, pbar_mu, pbar_logvar = be.reverse_update(
                lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, v_mu, v_logvar, logvar_k, eps_k, gz_k, hvp_a, hvp_b,
                hvp_scale, s, cfg.kl_weight, cfg.momentum)
    finally:
        if caller_rng is not None:
            caller_rng.restore()

    if mode == FD_FORWARD:
        theta_bar = []
        if theta_acc is not None:  # in place: the sum buffers become the returned gradients
            coef = out_scale * (-s / cfg.fd_eps)
            for t in theta_acc:
                t.mul_(coef.to(t.dtype))
            theta_bar = theta_acc
        lbar_mu = lbar_mu * out_scale
        lbar_logvar = lbar_logvar * out_scale
    # float32 buffers of float16/bfloat16 parameters back to the parameters' dtype
    theta_bar = [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(theta_bar, params)]
    if cfg.on_nonfinite == "zero":
        lbar_mu, lbar_logvar = _zero_nonfinite(lbar_mu), _zero_nonfinite(lbar_logvar)
        theta_bar = [_zero_nonfinite(t) for t in theta_bar]
    elif cfg.on_nonfinite == "raise" and not _all_finite(lbar_mu, lbar_logvar, *theta_bar):
        steps = [k for k, terms in zip(reversed(range(cfg.steps)), step_terms) if not _all_finite(*terms)]
        if steps:
            raise nonfinite_error(f"the decoder's second-order terms at inner step {max(steps)} are not finite "
                                  "(in the backward pass)")
        raise nonfinite_error("the gradient of the refinement w.r.t. mu, logvar or the decoder parameters is "
                              "not finite (in the backward pass)")
    return lbar_mu, lbar_logvar, theta_bar
