"""Argument checks and defaults of refine, shared by :func:`savae_fast.refine`,
:class:`savae_fast.refine.RefineGraph` and the references
(:mod:`savae_fast.reference`). Every error names the argument."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from savae_fast.ops.constants import BACKENDS
from savae_fast.refine.config import NonFinite, RefineConfig
from savae_fast.refine.hvp import HVP_METHODS
from savae_fast.refine.nonfinite import all_finite
from savae_fast.refine.precision import decoder_precision


class RefineDefaults(NamedTuple):
    """Defaults of the inner optimiser (the SA-VAE authors' settings)."""

    steps: int = 20
    lr: float = 1.0
    momentum: float = 0.5
    max_grad_norm: float = 5.0
    kl_weight: float = 1.0
    reduction: str = "mean"
    hvp: str = "fd_forward"
    backward_clip: float | None = 1.0
    backward_clip_scope: str = "example"
    backward_clip_mode: str = "stop"


DEFAULTS = RefineDefaults()

# Default finite-difference step per (hvp method, decoder precision): where the
# truncation error (grows with the step) meets the rounding error (grows as its
# inverse), chosen by sweeps on MLP and LSTM decoders (B 8-32, K 10-20; see README,
# "Accuracy"). fd_forward: perturbation size of the normalised direction;
# fd_central and fd_richardson (its smaller step): per-example relative perturbation
# r_b |u_b| = eps (1 + |z_b|).
# A decoder that computes in lower precision rounds its gradients more coarsely, so
# the steps are larger: bfloat16 measured on an LSTM decoder under bfloat16 autocast
# (the ELBO gradient: ~1e-3 central, ~7e-3 forward; its refinement part alone, small LSTM: fd_central 2e-3,
# fd_forward 1e-1, benchmarks/results/amd-epyc_2026-12-02_bf16_autocast.md); TF32 (float32 decoders on GPUs with
# cuDNN/cuBLAS TF32, the cuDNN default) measured with MLP and LSTM decoders whose
# products are rounded to TF32 as a GPU does (B 32, K 20; error of the refinement
# path alone, worst of 4 draws: fd_forward 5e-2 -> 6e-2, where the float32 step gives
# 10-40x more; fd_central 5e-2 -> 5e-3, 9-17x less than with the float32 step);
# float16 steps are scaled from bfloat16 by the precision ratio (not measured: CPU
# LSTMs do not run in float16). The values live on the methods (refine/hvp.py).
DEFAULT_FD_EPS = {(m.name, precision): eps for m in HVP_METHODS.values()
                  for precision, eps in m.default_fd_eps.items()}

FP32_PRECISIONS = ("inherit", "ieee")

# fd_eps is a relative step (fd_forward: of the normalised direction; fd_central: of
# (1 + |z_b|)): above 1 the difference quotient no longer estimates a derivative, and
# below 1e-12 it is rounding noise even in float64 (the defaults are 3e-8 to 1e-1).
FD_EPS_RANGE = (1e-12, 1.0)
NONFINITE_MODES = tuple(m.value for m in NonFinite)


def real(name: str, value, *, low=None, low_open=False, high=None, high_open=False, who: str = "refine") -> float:
    """A finite real number within the bounds, as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: argument '{name}' must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{who}: argument '{name}' must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{who}: argument '{name}' must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{who}: argument '{name}' must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_state(mu, logvar) -> None:
    """mu and logvar: [B, D] float32/float64 tensors of one shape, dtype and device."""
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
        if t.layout != torch.strided:
            raise TypeError(f"refine: argument '{name}' must be a dense (strided) tensor, got layout {t.layout} "
                            "(convert it with .to_dense())")
        if t.device.type == "meta":
            raise ValueError(f"refine: argument '{name}' is on the meta device, which holds no values: refine's "
                             "inner steps depend on the decoder's gradients at the values (use CPU or CUDA tensors)")
        if t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"refine: argument '{name}' must have batch >= 1 and latent >= 1, got {tuple(t.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"refine: argument 'logvar' has shape {tuple(logvar.shape)} but 'mu' has {tuple(mu.shape)}")
    if logvar.dtype != mu.dtype:
        raise TypeError(f"refine: argument 'logvar' has dtype {logvar.dtype} but 'mu' has {mu.dtype}")
    if logvar.device != mu.device:
        raise ValueError(f"refine: argument 'logvar' is on {logvar.device} but 'mu' is on {mu.device}")


# stack_points=True: every point of a reverse step in one call (4 is the most any method has)
STACK_ALL = 1 << 16


def check_stack_points(stack_points) -> int:
    """False / 0 / 1: one point per decoder call; True: all; an int >= 2: at most that many."""
    if isinstance(stack_points, bool):
        return STACK_ALL if stack_points else 0
    if not isinstance(stack_points, numbers.Integral) or stack_points < 0:
        raise ValueError(f"refine: argument 'stack_points' must be a bool or an int >= 0 (the most difference points "
                         f"per decoder call), got {stack_points!r}")
    return int(stack_points) if stack_points > 1 else 0


def check_not_transformed(*tensors: Tensor) -> None:
    """refine inside torch.func transforms (grad, vjp, jacrev, vmap, ...) is refused by name: its
    autograd Function has no functorch rules (setup_context, vmap)."""
    from torch._C._functorch import is_functorch_wrapped_tensor

    if any(is_functorch_wrapped_tensor(t) for t in tensors):
        raise RuntimeError(
            "refine: called inside a torch.func transform (torch.func.grad, vjp, jacrev, jacfwd, vmap, "
            "functional_call under them, ...), which refine does not support: differentiate it with "
            "torch.autograd.grad or .backward(), and batch over examples in mu / logvar instead of vmap")


def memory_capacity(device: torch.device) -> int | None:
    """Total memory of the device in bytes (None: unknown)."""
    import os

    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def check_steps_fit(steps: int, mu: Tensor, noise: bool, tape: bool) -> None:
    """A clear error, before any allocation, where ``steps`` needs more memory than the device
    has: the drawn noise ([steps, B, D]) and the tape of a differentiable refinement (lambda_k
    and dNLL/dz per step: 3 x [steps, B, D])."""
    per_step = mu.numel() * mu.element_size() * ((1 if noise else 0) + (3 if tape else 0))
    need = steps * per_step
    capacity = memory_capacity(mu.device) if need > 2**30 else None
    if capacity is not None and need > capacity:
        raise ValueError(
            f"refine: argument 'steps' = {steps} needs {need / 2**30:,.1f} GiB for "
            f"{'the noise and ' if noise else ''}{'the saved inner steps ' if tape else ''}"
            f"([steps, {mu.shape[0]}, {mu.shape[1]}] {mu.dtype} x {per_step // max(mu.numel() * mu.element_size(), 1)}"
            f"), more than the {capacity / 2**30:,.1f} GiB of {mu.device}; SA-VAE uses 5 to 100 steps")


def collect_params(params, who: str = "refine") -> tuple[Tensor, ...]:
    """The tensors of ``params`` (one Tensor or an iterable), each once."""
    if isinstance(params, Tensor):
        params = (params,)
    try:
        params = tuple(params)
    except TypeError:
        raise TypeError(f"{who}: argument 'params' must be an iterable of Tensors, got {type(params).__name__}")
    seen, unique = set(), []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{who}: argument 'params'[{i}] must be a Tensor, got {type(p).__name__}")
        if id(p) not in seen:  # a parameter listed twice must not get its gradient twice
            seen.add(id(p))
            unique.append(p)
    return tuple(unique)


def check_noise(noise, steps: int, mu: Tensor) -> Tensor:
    """A given ``[steps, B, D]`` noise tensor of mu's dtype and device, detached and contiguous."""
    expected = (steps, *mu.shape)
    if not isinstance(noise, Tensor):
        raise TypeError(f"refine: argument 'noise' must be a Tensor, got {type(noise).__name__}")
    if tuple(noise.shape) != expected:
        raise ValueError(f"refine: argument 'noise' must have shape [steps, B, D] = {list(expected)}, "
                         f"got {list(noise.shape)}")
    if noise.dtype != mu.dtype:
        raise TypeError(f"refine: argument 'noise' has dtype {noise.dtype} but 'mu' has {mu.dtype}")
    if noise.device != mu.device:
        raise ValueError(f"refine: argument 'noise' is on {noise.device} but 'mu' is on {mu.device}")
    if noise.is_inference() and not torch.is_inference_mode_enabled():
        # drawn under torch.inference_mode: an inference tensor cannot be saved for the backward;
        # its values are what refine needs
        return noise.clone()
    return noise.detach().contiguous()


def noise_or_draw(noise, steps: int, mu: Tensor) -> Tensor:
    """The checked ``noise``, or standard-normal draws from mu's device's default generator."""
    if noise is None:
        return torch.randn((steps, *mu.shape), dtype=mu.dtype, device=mu.device)
    return check_noise(noise, steps, mu)


def check_finite_inputs(**tensors: Tensor | None) -> None:
    """Each given tensor finite, with one host read for all of them (the error names the argument)."""
    given = {name: t for name, t in tensors.items() if t is not None}
    if all_finite(*given.values()):
        return
    for name, t in given.items():
        if not all_finite(t):
            raise ValueError(f"refine: argument '{name}' has non-finite values (NaN or Inf)")


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"refine: argument 'backend' must be one of {BACKENDS}, got {backend!r}")
    return backend


def make_config(mu: Tensor, *, steps, lr, momentum, max_grad_norm, kl_weight, reduction, hvp, fd_eps,
                preserve_rng_state, fd_tol=None, process_group=None, on_nonfinite="raise",
                fp32_precision="inherit", reduced_fp32: dict | None = None, check_decoder=True,
                batch_coupled=None, stack_points=False, backward_clip=None, backward_clip_scope="example",
                backward_clip_mode="stop", backward_steps=None) -> RefineConfig:
    """Validate the hyper-parameters of a refine call (errors name the argument).
    ``reduced_fp32``: precision.reduced_fp32_settings for mu's device if already read."""
    from savae_fast.refine.distributed import check_process_group, global_batch as total_batch, world_size

    check_process_group(process_group)
    if world_size(process_group) == 1:
        process_group = None
    global_batch = total_batch(mu.shape[0], process_group)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"refine: argument 'steps' must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"refine: argument 'steps' must be >= 0, got {steps}")
    if isinstance(lr, (tuple, list)):
        if len(lr) != 2:
            raise ValueError(f"refine: argument 'lr' must be a number or a pair (lr_mu, lr_logvar), got {lr!r}")
        lr_mu = real("lr[0]", lr[0], low=0.0, low_open=True)
        lr_logvar = real("lr[1]", lr[1], low=0.0, low_open=True)
    else:
        lr_mu = lr_logvar = real("lr", lr, low=0.0, low_open=True)
    momentum = real("momentum", momentum, low=0.0, high=1.0, high_open=True)
    max_grad_norm = real("max_grad_norm", max_grad_norm)
    kl_weight = real("kl_weight", kl_weight, low=0.0)
    if isinstance(reduction, str):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"refine: argument 'reduction' must be 'mean', 'sum' or a positive number, "
                             f"got {reduction!r}")
        scale = 1.0 / global_batch if reduction == "mean" else 1.0
    else:
        scale = real("reduction", reduction, low=0.0, low_open=True)
    method = HVP_METHODS.get(hvp) if isinstance(hvp, str) else None
    if method is None:
        raise ValueError(f"refine: argument 'hvp' must be one of {tuple(HVP_METHODS)}, got {hvp!r}")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"refine: argument 'fp32_precision' must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    if fd_tol is not None:
        if not method.step_tolerance:
            raise ValueError(f"refine: argument 'fd_tol' applies to hvp='fd_adaptive' only, got hvp={hvp!r}")
        fd_tol = real("fd_tol", fd_tol, low=0.0, low_open=True, high=1.0)
    if not isinstance(check_decoder, bool):
        raise TypeError(f"refine: argument 'check_decoder' must be a bool, got {type(check_decoder).__name__}")
    stack_points = check_stack_points(stack_points)
    if batch_coupled is not None and not isinstance(batch_coupled, bool):
        raise TypeError(f"refine: argument 'batch_coupled' must be None or a bool, got {type(batch_coupled).__name__}")
    precision = decoder_precision(mu, full_fp32=fp32_precision == "ieee", reduced=reduced_fp32)
    if fd_tol is None:
        fd_tol = method.step_tolerance.get(precision, 0.0)
    if fd_eps is None:
        fd_eps = method.default_fd_eps.get(precision, 0.0)
    else:
        fd_eps = real("fd_eps", fd_eps, low=0.0, low_open=True)
        if not FD_EPS_RANGE[0] <= fd_eps <= FD_EPS_RANGE[1]:
            raise ValueError(f"refine: argument 'fd_eps' must be in [{FD_EPS_RANGE[0]:g}, {FD_EPS_RANGE[1]:g}] "
                             f"(a relative step; None picks one for the decoder's precision), got {fd_eps:g}")
    if not isinstance(preserve_rng_state, bool):
        raise TypeError("refine: argument 'preserve_rng_state' must be a bool")
    if on_nonfinite not in NONFINITE_MODES:
        raise ValueError(f"refine: argument 'on_nonfinite' must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
    backward_clip, backward_steps = check_stabilizers(steps, backward_clip, backward_clip_scope, backward_steps,
                                                      backward_clip_mode)
    return RefineConfig(
        steps=int(steps), lr_mu=lr_mu, lr_logvar=lr_logvar, momentum=momentum, max_grad_norm=max_grad_norm,
        kl_weight=kl_weight, scale=scale, hvp=method, fd_eps=fd_eps, preserve_rng_state=preserve_rng_state,
        process_group=process_group, global_batch=global_batch, on_nonfinite=NonFinite(on_nonfinite),
        full_fp32=fp32_precision == "ieee", fd_tol=fd_tol, check_decoder=check_decoder, batch_coupled=batch_coupled,
        check_fd_eps=HVP_METHODS["fd_central"].default_fd_eps.get(precision, 2e-3), precision=precision,
        stack_points=stack_points, backward_clip=backward_clip, backward_clip_scope=backward_clip_scope,
        backward_clip_mode=backward_clip_mode, backward_steps=backward_steps)


def check_stabilizers(steps: int, backward_clip, backward_clip_scope, backward_steps,
                      backward_clip_mode="stop") -> tuple[float, int]:
    """(backward_clip as a float, 0 = off; the reverse steps to take) from refine's arguments."""
    from savae_fast.refine.stabilize import CLIP_MODES, CLIP_SCOPES

    if backward_clip_mode not in CLIP_MODES:
        raise ValueError(f"refine: argument 'backward_clip_mode' must be one of {CLIP_MODES}, "
                         f"got {backward_clip_mode!r}")
    if backward_clip is None:
        clip = 0.0
    else:
        clip = real("backward_clip", backward_clip, low=0.0, low_open=True)
    if backward_clip_scope not in CLIP_SCOPES:
        raise ValueError(f"refine: argument 'backward_clip_scope' must be one of {CLIP_SCOPES}, "
                         f"got {backward_clip_scope!r}")
    if backward_steps is None:
        return clip, int(steps)
    if isinstance(backward_steps, bool) or not isinstance(backward_steps, numbers.Integral):
        raise TypeError(f"refine: argument 'backward_steps' must be None or an int, got "
                        f"{type(backward_steps).__name__}")
    if backward_steps < 0:
        raise ValueError(f"refine: argument 'backward_steps' must be >= 0 (the last inner steps to differentiate "
                         f"through; None: all), got {backward_steps}")
    return clip, min(int(backward_steps), int(steps))


def check_capture(cfg: RefineConfig, mu: Tensor) -> None:
    """Refuse, before anything runs, the options that cannot be recorded in a CUDA graph: a
    capture broken half-way reports only "operation failed due to a previous error during
    capture", naming nothing."""
    if mu.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        return
    if cfg.preserve_rng_state:
        raise RuntimeError(
            "refine: CUDA graph capture with preserve_rng_state=True: saving the CUDA generator state of "
            "every step cannot be captured. Capture with preserve_rng_state=False, on_nonfinite='ignore' "
            "(or 'zero') and a deterministic decoder (no dropout, or eval mode), or use "
            "savae_fast.RefineGraph for forward-only refinement.")
    if cfg.hvp.reads_device_values:
        raise RuntimeError(
            f"refine: CUDA graph capture with hvp={cfg.hvp.name!r}: it reads its error estimates on the host to "
            "decide whether to evaluate a reverse step again, which a capture cannot record. Capture with "
            "hvp='fd_richardson' (the same passes with the step fixed) or another fixed-step mode.")
    if cfg.on_nonfinite is NonFinite.RAISE:
        raise RuntimeError(
            "refine: CUDA graph capture with on_nonfinite='raise': its checks read values on the host, "
            "which a capture cannot record. Pass on_nonfinite='ignore' or 'zero' (non-finite decoder "
            "derivatives set to zero on the device).")


# The inner optimiser's options (refine's, without those of its backward pass).
OPTIMISER_OPTIONS = ("steps", "lr", "momentum", "max_grad_norm", "kl_weight", "reduction")


def optimiser_config(mu: Tensor, options: dict, who: str) -> RefineConfig:
    """The validated inner optimiser of a reference implementation from its keyword
    ``options`` (any of OPTIMISER_OPTIONS, DEFAULTS for the others)."""
    unknown = sorted(set(options) - set(OPTIMISER_OPTIONS))
    if unknown:
        raise TypeError(f"{who}: unexpected keyword argument(s) {unknown}; the inner optimiser takes "
                        f"{list(OPTIMISER_OPTIONS)}")
    values = {name: options.get(name, getattr(DEFAULTS, name)) for name in OPTIMISER_OPTIONS}
    return make_config(mu, **values, hvp="exact", fd_eps=None, preserve_rng_state=True)
