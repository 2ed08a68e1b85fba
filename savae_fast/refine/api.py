"""Public entry point: :func:`refine`."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable

import torch
from torch import Tensor

from savae_fast.ops import get_backend
from savae_fast.ops.constants import BACKENDS
from savae_fast.refine.function import NONFINITE_MODES, HVP_MODES, RefineConfig, RefineFunction, run_forward
from savae_fast.refine.precision import TF32, decoder_precision, reduced_fp32_settings, warn_reduced_precision

# Default finite-difference step per (hvp mode, decoder precision): where the
# truncation error (grows with the step) meets the rounding error (grows as its
# inverse), chosen by sweeps on MLP and LSTM decoders (B 8-32, K 10-20; see README,
# "Accuracy"). fd_forward: perturbation size of the normalised direction;
# fd_central: per-example relative perturbation r_b |u_b| = eps (1 + |z_b|).
# A decoder that computes in lower precision rounds its gradients more coarsely, so
# the steps are larger: bfloat16 measured on an LSTM decoder under bfloat16 autocast
# (relative error ~1e-3 central, ~7e-3 forward); TF32 (float32 decoders on GPUs with
# cuDNN/cuBLAS TF32, the cuDNN default) measured with MLP and LSTM decoders whose
# products are rounded to TF32 as a GPU does (B 32, K 20; error of the refinement
# path alone, worst of 4 draws: fd_forward 5e-2 -> 6e-2, where the float32 step gives
# 10-40x more; fd_central 5e-2 -> 5e-3, 9-17x less than with the float32 step);
# float16 steps are scaled from bfloat16 by the precision ratio (not measured: CPU
# LSTMs do not run in float16).
DEFAULT_FD_EPS = {
    ("fd_forward", torch.float32): 1e-3,
    ("fd_forward", torch.float64): 3e-8,
    ("fd_forward", TF32): 5e-2,
    ("fd_forward", torch.bfloat16): 1e-1,
    ("fd_forward", torch.float16): 3e-2,
    ("fd_central", torch.float32): 2e-3,
    ("fd_central", torch.float64): 5e-6,
    ("fd_central", TF32): 5e-2,
    ("fd_central", torch.bfloat16): 1e-1,
    ("fd_central", torch.float16): 5e-2,
}

FP32_PRECISIONS = ("inherit", "ieee")


def _real(name: str, value, *, low=None, low_open=False, high=None, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"refine: argument '{name}' must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"refine: argument '{name}' must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"refine: argument '{name}' must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"refine: argument '{name}' must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def _check_state(mu, logvar) -> None:
    for name, t in (("mu", mu), ("logvar", logvar)):
        if not isinstance(t, Tensor):
            raise TypeError(f"refine: argument '{name}' must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"refine: argument '{name}' must be 2-D [batch, latent], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"refine: argument '{name}' must be float32 or float64, got {t.dtype} (keep the variational "
                "parameters in float32 and run the decoder under autocast for mixed precision)"
            )
        if t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"refine: argument '{name}' must have batch >= 1 and latent >= 1, got {tuple(t.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"refine: argument 'logvar' has shape {tuple(logvar.shape)} but 'mu' has {tuple(mu.shape)}")
    if logvar.dtype != mu.dtype:
        raise TypeError(f"refine: argument 'logvar' has dtype {logvar.dtype} but 'mu' has {mu.dtype}")
    if logvar.device != mu.device:
        raise ValueError(f"refine: argument 'logvar' is on {logvar.device} but 'mu' is on {mu.device}")


def _collect_params(params) -> tuple[Tensor, ...]:
    if isinstance(params, Tensor):
        params = (params,)
    try:
        params = tuple(params)
    except TypeError:
        raise TypeError(f"refine: argument 'params' must be an iterable of Tensors, got {type(params).__name__}")
    seen, unique = set(), []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"refine: argument 'params'[{i}] must be a Tensor, got {type(p).__name__}")
        if id(p) not in seen:  # a parameter listed twice must not get its gradient twice
            seen.add(id(p))
            unique.append(p)
    return tuple(unique)


def make_config(mu: Tensor, *, steps, lr, momentum, max_grad_norm, kl_weight, reduction, hvp, fd_eps,
                preserve_rng_state, process_group=None, on_nonfinite="raise",
                fp32_precision="inherit") -> RefineConfig:
    """Validate the hyper-parameters of a refine call (errors name the argument)."""
    from savae_fast.refine.distributed import global_batch as _global_batch, world_size

    if world_size(process_group) == 1:
        process_group = None
    global_batch = _global_batch(mu.shape[0], process_group)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"refine: argument 'steps' must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"refine: argument 'steps' must be >= 0, got {steps}")
    if isinstance(lr, (tuple, list)):
        if len(lr) != 2:
            raise ValueError(f"refine: argument 'lr' must be a number or a pair (lr_mu, lr_logvar), got {lr!r}")
        lr_mu = _real("lr[0]", lr[0], low=0.0, low_open=True)
        lr_logvar = _real("lr[1]", lr[1], low=0.0, low_open=True)
    else:
        lr_mu = lr_logvar = _real("lr", lr, low=0.0, low_open=True)
    momentum = _real("momentum", momentum, low=0.0, high=1.0, high_open=True)
    max_grad_norm = _real("max_grad_norm", max_grad_norm)
    kl_weight = _real("kl_weight", kl_weight, low=0.0)
    if isinstance(reduction, str):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"refine: argument 'reduction' must be 'mean', 'sum' or a positive number, "
                             f"got {reduction!r}")
        scale = 1.0 / global_batch if reduction == "mean" else 1.0
    else:
        scale = _real("reduction", reduction, low=0.0, low_open=True)
    if hvp not in HVP_MODES:
        raise ValueError(f"refine: argument 'hvp' must be one of {tuple(HVP_MODES)}, got {hvp!r}")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"refine: argument 'fp32_precision' must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    if fd_eps is None:
        fd_eps = DEFAULT_FD_EPS.get((hvp, decoder_precision(mu, full_fp32=fp32_precision == "ieee")), 0.0)
    else:
        fd_eps = _real("fd_eps", fd_eps, low=0.0, low_open=True)
    if not isinstance(preserve_rng_state, bool):
        raise TypeError("refine: argument 'preserve_rng_state' must be a bool")
    if on_nonfinite not in NONFINITE_MODES:
        raise ValueError(f"refine: argument 'on_nonfinite' must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
    return RefineConfig(
        steps=int(steps), lr_mu=lr_mu, lr_logvar=lr_logvar, momentum=momentum, max_grad_norm=max_grad_norm,
        kl_weight=kl_weight, scale=scale, hvp=hvp, fd_eps=fd_eps, preserve_rng_state=preserve_rng_state,
        process_group=process_group, global_batch=global_batch, on_nonfinite=on_nonfinite,
        full_fp32=fp32_precision == "ieee")


def _check_noise(noise, steps: int, mu: Tensor) -> Tensor:
    expected = (steps, *mu.shape)
    if noise is None:
        return torch.randn(expected, dtype=mu.dtype, device=mu.device)
    if not isinstance(noise, Tensor):
        raise TypeError(f"refine: argument 'noise' must be a Tensor, got {type(noise).__name__}")
    if tuple(noise.shape) != expected:
        raise ValueError(f"refine: argument 'noise' must have shape [steps, B, D] = {list(expected)}, "
                         f"got {list(noise.shape)}")
    if noise.dtype != mu.dtype:
        raise TypeError(f"refine: argument 'noise' has dtype {noise.dtype} but 'mu' has {mu.dtype}")
    if noise.device != mu.device:
        raise ValueError(f"refine: argument 'noise' is on {noise.device} but 'mu' is on {mu.device}")
    return noise.detach().contiguous()


# Under torch.compile, refine is one graph break: its loop differentiates the user's
# decoder (torch.autograd.grad), which Dynamo would otherwise split into many pieces.
# The code around it compiles; the savae_fast:: operators trace (fake kernels).
@torch.compiler.disable
def refine(
    mu: Tensor,
    logvar: Tensor,
    nll_fn: Callable[[Tensor], Tensor],
    params: Iterable[Tensor] = (),
    *,
    steps: int = 20,
    lr: float | tuple[float, float] = 1.0,
    momentum: float = 0.5,
    max_grad_norm: float = 5.0,
    kl_weight: float = 1.0,
    reduction: str = "mean",
    hvp: str = "fd_forward",
    fd_eps: float | None = None,
    noise: Tensor | None = None,
    backend: str = "auto",
    preserve_rng_state: bool = True,
    process_group=None,
    on_nonfinite: str = "raise",
    fp32_precision: str = "inherit",
) -> tuple[Tensor, Tensor]:
    """Refine Gaussian variational parameters by K steps of SVI, differentiably.

    Runs ``steps`` steps of SGD with heavy-ball momentum on the inner objective
    ``L = s * sum_b [nll_fn(z)_b + kl_weight * KL(N(mu_b, exp(logvar_b)) || N(0, I))]``
    with ``z = mu + exp(logvar / 2) * eps`` (``s = 1/B`` for ``reduction="mean"``,
    1 for ``"sum"``), clipping the gradients w.r.t. ``mu`` and ``logvar``
    separately to norm ``max_grad_norm`` (over the whole batch; ``<= 0``
    disables), exactly as the SA-VAE authors' optimiser. The result is
    differentiable w.r.t. ``mu``, ``logvar`` and every tensor in ``params``
    (the decoder parameters ``nll_fn`` uses), through all K steps.

    Args:
        mu, logvar: ``[B, D]`` float32/float64 initial variational parameters.
        nll_fn: maps ``z`` ``[B, D]`` to per-example negative log-likelihoods ``[B]``.
            Evaluated once per forward step (in order, from the caller's RNG state)
            and again in the backward with that step's RNG state restored.
        params: tensors ``nll_fn`` depends on that must receive gradients through
            the refinement (typically ``decoder.parameters()``). Tensors it
            closes over but that are not listed get no refinement gradient.
        steps: number of inner steps K (0 returns the inputs).
        lr: inner learning rate, or a pair ``(lr_mu, lr_logvar)``.
        momentum: heavy-ball momentum in [0, 1).
        max_grad_norm: clip norm for the gradients of mu and logvar (<= 0: no clipping).
        kl_weight: beta, weight of the KL term in the inner objective.
        reduction: "mean" (batch-averaged inner loss, the authors' choice), "sum", or
            a positive number: the per-example weight s of the inner loss.
        hvp: how the backward gets the decoder's second-order terms:
            "fd_forward" (default; 2K+1 decoder passes per training step, one
            parameter-sized buffer), "fd_central" (3K+1 passes, most
            accurate finite difference, no parameter-sized state) or "exact"
            (double backward; the decoder must be twice differentiable).
        fd_eps: finite-difference step. Default: by ``hvp`` and the decoder's
            precision, which is the autocast dtype if refine is called inside an
            autocast region (bfloat16/float16 decoders need ~100x larger steps),
            else mu's dtype. A decoder that enables autocast inside ``nll_fn``
            should pass ``fd_eps`` (0.1 for bfloat16) or use ``hvp="exact"``.
        noise: optional ``[steps, B, D]`` standard-normal draws; drawn from the
            default generator of mu's device otherwise (before the first step).
        backend: "auto", "cpp", "triton" or "torch" (kernels of the Gaussian math).
        preserve_rng_state: replay each step's RNG state in the backward so that
            stochastic decoders (dropout) see the same masks; disable only for
            deterministic decoders.
        process_group: for data-parallel training (torch.distributed): each process
            passes its share of the global batch and gets what one process refining
            the whole batch would get (``"mean"`` averages over the global batch; the
            inner clipping, its Jacobian and fd_forward's normalisation use global
            sums). Needs equal ``steps`` and options on every process.
        on_nonfinite: "raise" (default): a NaN/Inf in the decoder's derivatives or the
            variational state raises FloatingPointError naming the inner step (one
            host read at the end of the forward and of the backward); "zero": treat
            non-finite decoder derivatives as zero; "ignore": no checks (needed for
            CUDA-graph capture).
        fp32_precision: "inherit" (default): the decoder computes as PyTorch's settings say;
            a float32 decoder on a GPU then uses TF32 in cuDNN (its default) and maybe
            cuBLAS, which limits the relative accuracy of the gradient through the
            refinement to about 5e-2 (fd_forward), 5e-3 (fd_central) or 1e-3 (exact); the
            difference steps are chosen for it, and refine warns once. "ieee": refine's own decoder
            evaluations run in full float32 (TF32 switched off around them and restored
            after; the settings are process-wide while refine runs).

    Returns:
        ``(mu_K, logvar_K)``.
    """
    _check_state(mu, logvar)
    if not callable(nll_fn):
        raise TypeError(f"refine: argument 'nll_fn' must be callable, got {type(nll_fn).__name__}")
    params = _collect_params(params)
    cfg = make_config(mu, steps=steps, lr=lr, momentum=momentum, max_grad_norm=max_grad_norm,
                      kl_weight=kl_weight, reduction=reduction, hvp=hvp, fd_eps=fd_eps,
                      preserve_rng_state=preserve_rng_state, process_group=process_group,
                      on_nonfinite=on_nonfinite, fp32_precision=fp32_precision)
    if mu.dtype == torch.float32 and not cfg.full_fp32:
        reduced = reduced_fp32_settings(mu.device.type)
        if reduced:
            warn_reduced_precision(mu.device.type, reduced)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"refine: argument 'backend' must be one of {BACKENDS}, got {backend!r}")
    if cfg.steps == 0:
        if noise is not None:
            _check_noise(noise, 0, mu)
        return mu, logvar
    noise = _check_noise(noise, cfg.steps, mu)
    be = get_backend(backend, mu.device)
    if cfg.process_group is not None and cfg.max_grad_norm > 0:
        from savae_fast.refine.distributed import clip_coupled_backend

        be = clip_coupled_backend(be, cfg.process_group)

    needs_grad = torch.is_grad_enabled() and (
        mu.requires_grad or logvar.requires_grad or any(p.requires_grad for p in params))
    if not needs_grad:
        mu_k, logvar_k, _ = run_forward(cfg, be, nll_fn, mu.detach().contiguous(), logvar.detach().contiguous(),
                                        noise, (), record=False)
        return mu_k, logvar_k
    return RefineFunction.apply(cfg, be, nll_fn, noise, mu.contiguous(), logvar.contiguous(), *params)
