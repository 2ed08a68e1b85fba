"""The fused operators of the refinement loop and their backends.

Each operator exists in up to three implementations with one signature:

* ``cpp``: ``torch.ops.savae_fast.<op>`` from the compiled extension
  (C++ CPU kernels; CUDA kernels when built with CUDA), dispatched by device;
* ``triton``: Triton kernels (GPUs, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``torch``: plain PyTorch ops (:mod:`savae_fast.ops.torch_impl`).

``backend="auto"`` takes the compiled kernel for the tensors' device, else
Triton on GPUs, else plain PyTorch (with one warning).
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from savae_fast.ops import torch_impl
from savae_fast.ops.extension import (
    EXTENSION_ERROR,
    OP_NAMES,
    available,
    build_info,
    cpu_vector_kernels,
    cuda_single_block_max_elements,
    extension_loaded,
    has_kernel,
    set_cpu_vector_kernels,
    set_cuda_single_block_max_elements,
)
from savae_fast.ops.constants import BACKENDS, FD_CENTRAL, FD_EXACT, FD_FORWARD, FdMode, StepScalars

if extension_loaded():
    from savae_fast.ops import autograd as _autograd  # noqa: F401  (accumulate_'s grad-mode check)
    from savae_fast.ops import fake as _fake  # noqa: F401  (registers the fake kernels)

__all__ = [
    "Backend",
    "get_backend",
    "sample",
    "forward_step",
    "reverse_direction",
    "reverse_update",
    "accumulate_",
    "available",
    "build_info",
    "cpu_vector_kernels",
    "set_cpu_vector_kernels",
    "cuda_single_block_max_elements",
    "set_cuda_single_block_max_elements",
    "extension_loaded",
    "has_kernel",
    "triton_available",
    "FD_EXACT",
    "FD_FORWARD",
    "FD_CENTRAL",
    "FdMode",
    "StepScalars",
    "OP_NAMES",
]


class Backend(NamedTuple):
    """One implementation of every operator (positional signatures as the schemas).

    A resolved backend, as :func:`get_backend` returns it: ``name`` is ``"cpp"``,
    ``"triton"`` or ``"torch"``; the other fields are the operators, called with the
    positional arguments of their ``torch.ops.savae_fast`` schemas (no validation: the
    validated entry points are the functions of this module).

    Example:
        >>> be = get_backend("auto", "cpu")
        >>> be.name in ("cpp", "torch")
        True
    """

    name: str
    sample: Callable
    forward_step: Callable
    reverse_direction: Callable
    reverse_update: Callable
    accumulate_: Callable


TORCH_BACKEND = Backend(
    "torch",
    torch_impl.sample,
    torch_impl.forward_step,
    torch_impl.reverse_direction,
    torch_impl.reverse_update,
    torch_impl.accumulate_,
)


# The compiled operators: torch.ops.savae_fast.<op>.default (the overload itself,
# which skips the overload resolution of torch.ops.savae_fast.<op>).
CPP_BACKEND = (
    Backend("cpp", *(getattr(torch.ops.savae_fast, name).default for name in OP_NAMES))
    if extension_loaded() else None
)


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run on ``device`` (GPU, or CPU under TRITON_INTERPRET=1).

    Args:
        device: a device or its name; ``None``: the current CUDA device.

    Returns:
        ``True`` when Triton is installed and can launch kernels for tensors on ``device``.

    Example:
        >>> triton_available("cpu")  # doctest: +SKIP
        False
    """
    from savae_fast.ops import triton_impl

    return triton_impl.usable(None if device is None else torch.device(device))


def _triton_backend() -> Backend:
    from savae_fast.ops import triton_impl

    return Backend("triton", *(getattr(triton_impl, name) for name in OP_NAMES))


_fallback_warned = False
_fallback_lock = threading.Lock()


def _warn_fallback(device: torch.device) -> None:
    global _fallback_warned
    with _fallback_lock:
        # An extension that failed to load was reported at import (the reason and the fix).
        if _fallback_warned or (not extension_loaded() and not isinstance(EXTENSION_ERROR, ModuleNotFoundError)):
            return
        _fallback_warned = True
    reason = (
        f"the compiled extension did not import ({EXTENSION_ERROR})"
        if not extension_loaded()
        else f"the compiled extension has no {device.type} kernels"
    )
    warnings.warn(
        f"savae_fast: using the pure-PyTorch operators on {device.type} because {reason}. "
        "Results are the same, only slower; pass backend='torch' to silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


def get_backend(backend: str, device: torch.device | str) -> Backend:
    """Resolve ``backend`` ("auto", "cpp", "triton", "torch") for tensors on ``device``.

    ``"auto"`` takes the compiled kernels for the device, else Triton on a GPU, else the
    pure-PyTorch operators (with one ``RuntimeWarning`` saying why).

    Args:
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"torch"``.
        device: the device of the tensors the operators will see.

    Returns:
        The :class:`Backend` whose operators run there.

    Raises:
        ValueError: ``backend`` is not one of the four names.
        RuntimeError: the backend asked for cannot run on ``device`` (the message says why:
            the extension did not import, was built without that device's kernels, or Triton
            cannot run there).

    Example:
        >>> get_backend("torch", "cpu").name
        'torch'
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"argument 'backend' must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return TORCH_BACKEND
    if backend == "cpp":
        if not available(device):
            why = f"it did not import: {EXTENSION_ERROR}" if not extension_loaded() else (
                f"it was built without {device.type} kernels"
            )
            raise RuntimeError(f"backend='cpp' requested for {device.type} tensors, but {why}")
        return CPP_BACKEND
    if backend == "triton":
        if not triton_available(device):
            raise RuntimeError(
                f"backend='triton' requested for {device.type} tensors, but Triton cannot run there "
                "(it needs a GPU, or TRITON_INTERPRET=1 for CPU tensors)"
            )
        return _triton_backend()
    # auto
    if available(device):
        return CPP_BACKEND
    if device.type != "cpu" and triton_available(device):
        return _triton_backend()
    _warn_fallback(device)
    return TORCH_BACKEND


# ----------------------------------------------------------------------------------
# Validated functional wrappers (one call per op; the refinement loop calls the
# resolved Backend directly after validating its inputs once).


def _check_matrices(op: str, **tensors: Tensor | None) -> None:
    first_name, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: argument '{name}' must be a Tensor, got {type(t).__name__}")
        if first is None:
            if t.dim() != 2:
                raise ValueError(f"{op}: argument '{name}' must be 2-D [batch, latent], got shape {tuple(t.shape)}")
            if t.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"{op}: argument '{name}' must be float32 or float64, got {t.dtype}")
            first_name, first = name, t
            continue
        if t.shape != first.shape:
            raise ValueError(
                f"{op}: argument '{name}' has shape {tuple(t.shape)} but '{first_name}' has {tuple(first.shape)}"
            )
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: argument '{name}' has dtype {t.dtype} but '{first_name}' has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: argument '{name}' is on {t.device} but '{first_name}' is on {first.device}")


def sample(mu: Tensor, logvar: Tensor, eps: Tensor, *, backend: str = "auto") -> Tensor:
    """The reparameterised sample ``z = mu + exp(logvar / 2) * eps``.

    Args:
        mu, logvar, eps: ``[B, D]`` tensors of one floating dtype (float32 or float64) and
            one device.
        backend: see :func:`get_backend`.

    Returns:
        ``z``, ``[B, D]``.

    Raises:
        TypeError, ValueError: an argument is not a tensor, not 2-D, of another dtype, shape
            or device than ``mu`` (the message names it).

    Example:
        >>> mu, lv = torch.zeros(2, 3), torch.zeros(2, 3)
        >>> sample(mu, lv, torch.ones(2, 3), backend="torch")
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    _check_matrices("sample", mu=mu, logvar=logvar, eps=eps)
    return get_backend(backend, mu.device).sample(mu, logvar, eps)


def forward_step(mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next=None, *, scale, kl_weight, lr_mu,
                 lr_logvar, momentum, max_grad_norm, backend: str = "auto"):
    """One fused inner SVI step: the ELBO gradient from the decoder's ``grad_z``, clipped,
    heavy-ball momentum, and the next sample (docs/math.md, "Forward").

    Args:
        mu, logvar: the variational parameters lambda_k, ``[B, D]``.
        p_mu, p_logvar: the momentum buffers p_k.
        eps: the draw of this step (z_k = mu + sigma eps).
        grad_z: dNLL_b/dz at z_k, per example (without ``scale``).
        eps_next: the next step's draw (then z_{k+1} is returned), or ``None``.
        scale: weight s of the inner loss (1/B for ``reduction="mean"``).
        kl_weight: beta.
        lr_mu, lr_logvar: the inner learning rates.
        momentum: m.
        max_grad_norm: clip norm M of each gradient tensor (<= 0: no clipping).
        backend: see :func:`get_backend`.

    Returns:
        ``(mu', logvar', p_mu', p_logvar', z_next, grad_norms)``: the updated parameters and
        buffers, z_{k+1} (an empty tensor without ``eps_next``) and the ``[2]`` norms of
        g_mu and g_logvar, which the reverse pass needs.

    Raises:
        TypeError, ValueError: a tensor argument of the wrong type, shape, dtype or device
            (named in the message).

    Example:
        >>> t = lambda: torch.randn(4, 2)
        >>> out = forward_step(t(), t(), t(), t(), t(), t(), t(), scale=0.25, kl_weight=1.0, lr_mu=1.0,
        ...                    lr_logvar=1.0, momentum=0.5, max_grad_norm=5.0, backend="torch")
        >>> shapes = [tuple(o.shape) for o in out]
        >>> shapes
        [(4, 2), (4, 2), (4, 2), (4, 2), (4, 2), (2,)]
    """
    _check_matrices("forward_step", mu=mu, logvar=logvar, p_mu=p_mu, p_logvar=p_logvar, eps=eps,
                    grad_z=grad_z, eps_next=eps_next)
    scalars = StepScalars(*map(float, (scale, kl_weight, lr_mu, lr_logvar, momentum, max_grad_norm)))
    return get_backend(backend, mu.device).forward_step(
        mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next, *scalars.for_forward_step())


def reverse_direction(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z, grad_norms, *,
                      scale, kl_weight, lr_mu, lr_logvar, max_grad_norm, fd_mode, fd_step,
                      backend: str = "auto"):
    """First half of a reverse step: the momentum adjoint, the clip Jacobian applied to it and
    the points where the decoder is evaluated (docs/math.md, "Reverse pass").

    Args:
        lbar_mu, lbar_logvar: the adjoint dF/dlambda_{k+1}, ``[B, D]``.
        pbar_mu, pbar_logvar: the adjoint dF/dp_{k+1}.
        mu, logvar, eps, grad_z: step k's parameters, draw and decoder gradient (as given to
            :func:`forward_step`).
        grad_norms: the ``[2]`` norms :func:`forward_step` returned for step k.
        scale, kl_weight, lr_mu, lr_logvar, max_grad_norm: as for :func:`forward_step`.
        fd_mode: an :class:`FdMode` (``FD_EXACT``, ``FD_FORWARD``, ``FD_CENTRAL``).
        fd_step: the difference step h (forward: the step r itself; central: relative,
            r_b = h (1 + |z_b|) / |u_b|).
        backend: see :func:`get_backend`.

    Returns:
        ``(pbar_mu', pbar_logvar', v_mu, v_logvar, u, z_eval, row_weight)``: the updated
        momentum adjoint, v = J_clip pbar', its z-space direction u, the evaluation points
        ``[1 or 2, B, D]`` and the per-example loss weights ``[B]`` (central: 1 / (2 r_b)).

    Raises:
        TypeError, ValueError: a tensor of the wrong type, shape, dtype or device, a bad
            ``grad_norms`` or ``fd_mode`` (named in the message).

    Example:
        >>> t = lambda: torch.randn(4, 2)
        >>> *_, z_eval, w = reverse_direction(t(), t(), t(), t(), t(), t(), t(), t(), torch.ones(2), scale=0.25,
        ...                                   kl_weight=1.0, lr_mu=1.0, lr_logvar=1.0, max_grad_norm=5.0,
        ...                                   fd_mode=FD_CENTRAL, fd_step=1e-3, backend="torch")
        >>> tuple(z_eval.shape), tuple(w.shape)
        ((2, 4, 2), (4,))
    """
    _check_matrices("reverse_direction", lbar_mu=lbar_mu, lbar_logvar=lbar_logvar, pbar_mu=pbar_mu,
                    pbar_logvar=pbar_logvar, mu=mu, logvar=logvar, eps=eps, grad_z=grad_z)
    if (not isinstance(grad_norms, Tensor) or grad_norms.shape != (2,) or grad_norms.dtype != mu.dtype
            or grad_norms.device != mu.device):
        raise ValueError("reverse_direction: argument 'grad_norms' must be a [2] tensor of mu's dtype and device")
    if fd_mode not in tuple(FdMode):
        raise ValueError(f"reverse_direction: argument 'fd_mode' must be one of {[int(m) for m in FdMode]} "
                         f"(FdMode), got {fd_mode!r}")
    scalars = StepScalars(*map(float, (scale, kl_weight, lr_mu, lr_logvar, 0.0, max_grad_norm)))
    return get_backend(backend, mu.device).reverse_direction(
        lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z, grad_norms,
        *scalars.for_reverse_direction(), int(fd_mode), float(fd_step))


def reverse_update(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, v_mu, v_logvar, logvar, eps, grad_z, hvp_a,
                   hvp_b=None, *, hvp_scale, scale, kl_weight, momentum, backend: str = "auto"):
    """Second half of a reverse step: the Gaussian second-order terms with the decoder's
    Hzz u = (hvp_a - hvp_b) * hvp_scale, and the momentum of the adjoint.

    Args:
        lbar_mu, lbar_logvar, pbar_mu, pbar_logvar: the adjoints after :func:`reverse_direction`.
        v_mu, v_logvar: the direction v it returned.
        logvar, eps, grad_z: step k's log-variance, draw and decoder gradient.
        hvp_a: the decoder's z-gradient at the first point (exact modes: Hzz u itself).
        hvp_b: the gradient at the second point (``None``: zero).
        hvp_scale: the factor of the difference (1 / r, or 1 where ``row_weight`` took it).
        scale, kl_weight, momentum: as for :func:`forward_step`.
        backend: see :func:`get_backend`.

    Returns:
        ``(lbar_mu', lbar_logvar', pbar_mu', pbar_logvar')``: the adjoints of step k.

    Raises:
        TypeError, ValueError: a tensor of the wrong type, shape, dtype or device (named).

    Example:
        >>> t = lambda: torch.randn(4, 2)
        >>> out = reverse_update(t(), t(), t(), t(), t(), t(), t(), t(), t(), t(), hvp_scale=1.0, scale=0.25,
        ...                      kl_weight=1.0, momentum=0.5, backend="torch")
        >>> len(out)
        4
    """
    _check_matrices("reverse_update", lbar_mu=lbar_mu, lbar_logvar=lbar_logvar, pbar_mu=pbar_mu,
                    pbar_logvar=pbar_logvar, v_mu=v_mu, v_logvar=v_logvar, logvar=logvar, eps=eps,
                    grad_z=grad_z, hvp_a=hvp_a, hvp_b=hvp_b)
    scalars = StepScalars(*map(float, (scale, kl_weight, 0.0, 0.0, momentum, 0.0)))
    return get_backend(backend, lbar_mu.device).reverse_update(
        lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, v_mu, v_logvar, logvar, eps, grad_z, hvp_a, hvp_b,
        float(hvp_scale), *scalars.for_reverse_update())


def accumulate_(total, values, *, backend: str = "auto") -> None:
    """In place, for each i with ``values[i]`` not None: ``total[i] += values[i]``
    (one call for a list of tensors, e.g. all the parameter gradients of a model).

    Args:
        total: floating-point tensors, updated in place.
        values: tensors of the same shapes, dtypes and devices, or ``None`` (skipped).
        backend: see :func:`get_backend`.

    Returns:
        ``None``.

    Raises:
        ValueError, TypeError: the lists differ in length, or an entry does not match its
            partner (index named in the message).

    Example:
        >>> total = [torch.zeros(2), torch.zeros(3)]
        >>> accumulate_(total, [torch.ones(2), None], backend="torch")
        >>> total[0]
        tensor([1., 1.])
    """
    total, values = list(total), list(values)
    if len(total) != len(values):
        raise ValueError(f"accumulate_: 'total' and 'values' must have the same length, got {len(total)} and "
                         f"{len(values)}")
    for i, (t, v) in enumerate(zip(total, values)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"accumulate_: 'total'[{i}] must be a floating-point Tensor")
        if v is not None and (not isinstance(v, Tensor) or v.shape != t.shape or v.dtype != t.dtype
                              or v.device != t.device):
            raise ValueError(f"accumulate_: 'values'[{i}] must match 'total'[{i}] "
                             f"(shape {tuple(t.shape)}, {t.dtype}, {t.device})")
    if not total:
        return
    get_backend(backend, total[0].device).accumulate_(total, values)
