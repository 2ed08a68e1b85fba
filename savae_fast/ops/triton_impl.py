"""Triton kernels of the savae_fast operators (``backend="triton"``).

Same signatures, formulas and outputs as the compiled kernels. They run on
any GPU Triton supports (NVIDIA, AMD) and, for testing, on CPU tensors under
``TRITON_INTERPRET=1``.

Design:
* whole-tensor reductions (clip norms, clip-Jacobian dot products) are
  two-stage and deterministic: each program writes a partial sum to a small
  workspace, and the consuming kernel reduces the fixed-size workspace again
  in every program (at most MAX_PROGRAMS of them, each over several blocks).
  A reverse step whose forward step did not clip needs no reduction (decided on
  the device): it reads its inputs once. No atomics, no host synchronisation: a
  refinement loop using these kernels can be captured in a CUDA graph;
* sizes are runtime arguments (no recompilation per batch size); the hvp mode,
  the clip switch and optional inputs are compile-time constants;
* small tensors (up to SMALL_ELEMENTS, padded to powers of two) run forward_step and
  reverse_direction as one program: one launch instead of two (a launch costs tens of
  microseconds of host time, far more than the work);
* kernels are launched through :mod:`savae_fast.ops.triton_launch`, which reuses the
  compiled kernel Triton picked for the same specialisation instead of re-deriving it
  on every call.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    _TRITON_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    _TRITON_ERROR = exc

from savae_fast.ops import torch_impl
from savae_fast.ops.triton_launch import CachedKernel as _launch_cached
from savae_fast.ops.constants import CLIP_EPS, FD_CENTRAL, FD_FORWARD, FdMode

BLOCK = 1024  # elements per program of the elementwise kernels
MAX_PROGRAMS = 1024  # programs of a reduction (fixed: the workspace size never changes)
ROWS = 4  # rows per program of the row-wise kernel
BLOCK_D = 128  # latent columns per tile of the row-wise kernel
SMALL_ELEMENTS = 4096  # one program, one launch, up to this many (power-of-two padded) elements


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(device: torch.device | None = None) -> bool:
    """Triton can run on ``device`` (a GPU, or CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    if device is None:
        return torch.cuda.is_available() or interpreting()
    if device.type == "cpu":
        return interpreting()
    return device.type == "cuda" and torch.cuda.is_available()


if triton is not None:
    # Globals a kernel reads must be constexpr.
    _CLIP_EPS = tl.constexpr(CLIP_EPS)
    _FD_FORWARD = tl.constexpr(FD_FORWARD)
    _FD_CENTRAL = tl.constexpr(FD_CENTRAL)

    @triton.jit
    def _typed(x, like_ptr):
        # Float arguments are declared float64 (a Python float would be passed as
        # float32 and lose half its digits in float64 kernels); compute in the
        # tensors' dtype (float64 -> float32 rounds as Python's float -> float32 would).
        return tl.full((), x, like_ptr.dtype.element_ty)

    @triton.jit
    def _expm1(x):
        # Kahan's accurate expm1 from exp and log: (u - 1) x / log(u), u = exp(x);
        # rounding errors of u cancel between numerator and denominator.
        u = tl.exp(x)
        um1 = u - 1.0
        safe_log = tl.where((u == 1.0) | (um1 == -1.0), 1.0, tl.log(u))
        r = tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / safe_log))
        return tl.where(x > 80.0, u, r)  # exp overflows the ratio before expm1 does

    @triton.jit
    def _gauss_terms(logvar):
        # sigma from exp (full relative precision for very negative logvar) and
        # exp(logvar) - 1 = expm1(logvar / 2) (sigma + 1) (no cancellation near 0)
        sigma = tl.exp(0.5 * logvar)
        return sigma, _expm1(0.5 * logvar) * (sigma + 1.0)

    @triton.jit
    def _elbo_grad(gz, mu, sigma, expm1_lv, eps, scale, kl_weight):
        g_mu = scale * (gz + kl_weight * mu)
        g_lv = scale * (0.5 * gz * eps * sigma + 0.5 * kl_weight * expm1_lv)
        return g_mu, g_lv

    @triton.jit
    def _load_elbo_grad(mu_ptr, lv_ptr, eps_ptr, gz_ptr, offs, m, scale, kl_weight):
        # one block of the state -> its ELBO gradient (zero in masked-out lanes)
        mu = tl.load(mu_ptr + offs, mask=m, other=0.0)
        lv = tl.load(lv_ptr + offs, mask=m, other=0.0)
        eps = tl.load(eps_ptr + offs, mask=m, other=0.0)
        gz = tl.load(gz_ptr + offs, mask=m, other=0.0)
        sigma, em = _gauss_terms(lv)
        return _elbo_grad(gz, mu, sigma, em, eps, scale, kl_weight)

    @triton.jit
    def _clip_coef(norm, max_norm, HAS_CLIP: tl.constexpr):
        if HAS_CLIP:
            return tl.minimum(max_norm / (norm + tl.full((), _CLIP_EPS, norm.dtype)), 1.0)
        else:
            return norm * 0.0 + 1.0

    @triton.jit
    def _momentum_update(mu, lv, g_mu, g_lv, c_mu, c_lv, pm_ptr, pl_ptr, en_ptr, o_mu_ptr, o_lv_ptr, o_pm_ptr,
                         o_pl_ptr, o_z_ptr, offs, m, lr_mu, lr_lv, momentum, HAS_NEXT: tl.constexpr):
        # the clipped heavy-ball step and the next sample, stored
        p_mu = momentum * tl.load(pm_ptr + offs, mask=m) - c_mu * g_mu
        p_lv = momentum * tl.load(pl_ptr + offs, mask=m) - c_lv * g_lv
        mu_n = mu + lr_mu * p_mu
        lv_n = lv + lr_lv * p_lv
        tl.store(o_pm_ptr + offs, p_mu, mask=m)
        tl.store(o_pl_ptr + offs, p_lv, mask=m)
        tl.store(o_mu_ptr + offs, mu_n, mask=m)
        tl.store(o_lv_ptr + offs, lv_n, mask=m)
        if HAS_NEXT:
            z = mu_n + tl.exp(0.5 * lv_n) * tl.load(en_ptr + offs, mask=m)
            tl.store(o_z_ptr + offs, z, mask=m)

    @triton.jit
    def _kappa(norm, c, max_norm, dot):
        # the clip Jacobian's rank-one coefficient (zero where the gradient is not clipped), in
        # factors that do not overflow (csrc/savae_math.h, clip_jacobian_kappa)
        np1 = norm + tl.full((), _CLIP_EPS, norm.dtype)
        active = (c < 1.0) & (norm > 0.0)
        return tl.where(active, (max_norm / np1) * (dot / tl.where(active, norm, 1.0)) / np1, 0.0)

    @triton.jit
    def _store_directions(vm, vl, mu, sigma, eps, o_vm_ptr, o_vl_ptr, o_u_ptr, offs, m):
        # stores v = (v_mu, v_logvar) and its z-space direction u = v_mu + sigma eps v_logvar / 2;
        # returns u and the sample z = mu + sigma eps
        u = vm + 0.5 * sigma * eps * vl
        tl.store(o_vm_ptr + offs, vm, mask=m)
        tl.store(o_vl_ptr + offs, vl, mask=m)
        tl.store(o_u_ptr + offs, u, mask=m)
        return u, mu + sigma * eps

    @triton.jit
    def _central_step(uu, zz, fd_step):
        # per-row step r = fd_step (1 + |z|) / |u| and loss weight 1 / (2 r) (zero for u = 0)
        u_norm = tl.sqrt(uu)
        nonzero = u_norm > 0.0
        r = tl.where(nonzero, fd_step * (1.0 + tl.sqrt(zz)) / tl.where(nonzero, u_norm, 1.0), 0.0)
        w = tl.where(nonzero, 0.5 / tl.where(nonzero, r, 1.0), 0.0)
        return r, w

    @triton.jit
    def _reduce_partials(partial_ptr, num_partials, col, MAXP: tl.constexpr):
        """Sum of column ``col`` of a [num_partials, 2] workspace (fixed-size, deterministic)."""
        idx = tl.arange(0, MAXP)
        vals = tl.load(partial_ptr + idx * 2 + col, mask=idx < num_partials, other=0.0)
        return tl.sum(vals, axis=0)

    @_launch_cached
    @triton.jit
    def _sample_kernel(mu_ptr, lv_ptr, eps_ptr, z_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        lv = tl.load(lv_ptr + offs, mask=m)
        z = tl.load(mu_ptr + offs, mask=m) + tl.exp(0.5 * lv) * tl.load(eps_ptr + offs, mask=m)
        tl.store(z_ptr + offs, z, mask=m)

    @_launch_cached
    @triton.jit
    def _grad_norm_partials_kernel(mu_ptr, lv_ptr, eps_ptr, gz_ptr, partial_ptr, n, scale: tl.float64,
                                   kl_weight: tl.float64, BLOCK: tl.constexpr):
        scale, kl_weight = _typed(scale, mu_ptr), _typed(kl_weight, mu_ptr)
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        acc_mu = tl.zeros((BLOCK,), dtype=mu_ptr.dtype.element_ty)
        acc_lv = tl.zeros_like(acc_mu)
        for start in range(pid * BLOCK, n, nprog * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            g_mu, g_lv = _load_elbo_grad(mu_ptr, lv_ptr, eps_ptr, gz_ptr, offs, m, scale, kl_weight)
            acc_mu += tl.where(m, g_mu * g_mu, 0.0)
            acc_lv += tl.where(m, g_lv * g_lv, 0.0)
        tl.store(partial_ptr + pid * 2, tl.sum(acc_mu, axis=0))
        tl.store(partial_ptr + pid * 2 + 1, tl.sum(acc_lv, axis=0))

    @_launch_cached
    @triton.jit
    def _forward_update_kernel(mu_ptr, lv_ptr, pm_ptr, pl_ptr, eps_ptr, gz_ptr, en_ptr,
                               o_mu_ptr, o_lv_ptr, o_pm_ptr, o_pl_ptr, o_z_ptr, norms_ptr, partial_ptr,
                               n, num_partials, scale: tl.float64, kl_weight: tl.float64, lr_mu: tl.float64,
                               lr_lv: tl.float64, momentum: tl.float64, max_norm: tl.float64,
                               HAS_NEXT: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
                               MAXP: tl.constexpr):
        scale, kl_weight, max_norm = _typed(scale, mu_ptr), _typed(kl_weight, mu_ptr), _typed(max_norm, mu_ptr)
        lr_mu, lr_lv, momentum = _typed(lr_mu, mu_ptr), _typed(lr_lv, mu_ptr), _typed(momentum, mu_ptr)
        pid = tl.program_id(0)
        n_mu = tl.sqrt(_reduce_partials(partial_ptr, num_partials, 0, MAXP))
        n_lv = tl.sqrt(_reduce_partials(partial_ptr, num_partials, 1, MAXP))
        if pid == 0:
            tl.store(norms_ptr, n_mu)
            tl.store(norms_ptr + 1, n_lv)
        c_mu = _clip_coef(n_mu, max_norm, HAS_CLIP)
        c_lv = _clip_coef(n_lv, max_norm, HAS_CLIP)
        # several blocks per program: each program reduces the workspace once (at most
        # MAX_PROGRAMS programs), not once per block
        for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            mu = tl.load(mu_ptr + offs, mask=m)
            lv = tl.load(lv_ptr + offs, mask=m)
            eps = tl.load(eps_ptr + offs, mask=m)
            gz = tl.load(gz_ptr + offs, mask=m)
            sigma, em = _gauss_terms(lv)
            g_mu, g_lv = _elbo_grad(gz, mu, sigma, em, eps, scale, kl_weight)
            _momentum_update(mu, lv, g_mu, g_lv, c_mu, c_lv, pm_ptr, pl_ptr, en_ptr, o_mu_ptr, o_lv_ptr, o_pm_ptr,
                             o_pl_ptr, o_z_ptr, offs, m, lr_mu, lr_lv, momentum, HAS_NEXT)

    @_launch_cached
    @triton.jit
    def _forward_step_one_program_kernel(mu_ptr, lv_ptr, pm_ptr, pl_ptr, eps_ptr, gz_ptr, en_ptr,
                                         o_mu_ptr, o_lv_ptr, o_pm_ptr, o_pl_ptr, o_z_ptr, norms_ptr, n,
                                         scale: tl.float64, kl_weight: tl.float64, lr_mu: tl.float64,
                                         lr_lv: tl.float64, momentum: tl.float64, max_norm: tl.float64,
                                         HAS_NEXT: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
        # the whole tensor in one block: norms, clip coefficients and update without a workspace
        scale, kl_weight, max_norm = _typed(scale, mu_ptr), _typed(kl_weight, mu_ptr), _typed(max_norm, mu_ptr)
        lr_mu, lr_lv, momentum = _typed(lr_mu, mu_ptr), _typed(lr_lv, mu_ptr), _typed(momentum, mu_ptr)
        offs = tl.arange(0, BLOCK)
        m = offs < n
        mu = tl.load(mu_ptr + offs, mask=m, other=0.0)
        lv = tl.load(lv_ptr + offs, mask=m, other=0.0)
        eps = tl.load(eps_ptr + offs, mask=m, other=0.0)
        gz = tl.load(gz_ptr + offs, mask=m, other=0.0)
        sigma, em = _gauss_terms(lv)
        g_mu, g_lv = _elbo_grad(gz, mu, sigma, em, eps, scale, kl_weight)
        n_mu = tl.sqrt(tl.sum(tl.where(m, g_mu * g_mu, 0.0), axis=0))
        n_lv = tl.sqrt(tl.sum(tl.where(m, g_lv * g_lv, 0.0), axis=0))
        tl.store(norms_ptr, n_mu)
        tl.store(norms_ptr + 1, n_lv)
        _momentum_update(mu, lv, g_mu, g_lv, _clip_coef(n_mu, max_norm, HAS_CLIP), _clip_coef(n_lv, max_norm, HAS_CLIP),
                         pm_ptr, pl_ptr, en_ptr, o_mu_ptr, o_lv_ptr, o_pm_ptr, o_pl_ptr, o_z_ptr, offs, m, lr_mu,
                         lr_lv, momentum, HAS_NEXT)

    @triton.jit
    def _clipped(n_mu, n_lv, max_norm, HAS_CLIP: tl.constexpr):
        # whether the forward step clipped either gradient (then the clip Jacobian needs its dots)
        return (_clip_coef(n_mu, max_norm, HAS_CLIP) < 1.0) | (_clip_coef(n_lv, max_norm, HAS_CLIP) < 1.0)

    @_launch_cached
    @triton.jit
    def _reverse_dots_kernel(lbm_ptr, lbl_ptr, pbm_ptr, pbl_ptr, mu_ptr, lv_ptr, eps_ptr, gz_ptr, norms_ptr,
                             o_pbm_ptr, o_pbl_ptr, partial_ptr, n, scale: tl.float64, kl_weight: tl.float64,
                             lr_mu: tl.float64, lr_lv: tl.float64, max_norm: tl.float64, BLOCK: tl.constexpr):
        # pbar' and the partial dot products g . pbar' of the clip Jacobian, only where the
        # forward step clipped (decided on the device); otherwise nothing: the row kernel
        # makes pbar' itself and the reverse step reads its inputs once
        scale, kl_weight = _typed(scale, mu_ptr), _typed(kl_weight, mu_ptr)
        lr_mu, lr_lv, max_norm = _typed(lr_mu, mu_ptr), _typed(lr_lv, mu_ptr), _typed(max_norm, mu_ptr)
        if _clipped(tl.load(norms_ptr), tl.load(norms_ptr + 1), max_norm, True):
            pid = tl.program_id(0)
            nprog = tl.num_programs(0)
            acc_mu = tl.zeros((BLOCK,), dtype=mu_ptr.dtype.element_ty)
            acc_lv = tl.zeros_like(acc_mu)
            for start in range(pid * BLOCK, n, nprog * BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < n
                pm = tl.load(pbm_ptr + offs, mask=m, other=0.0) + lr_mu * tl.load(lbm_ptr + offs, mask=m, other=0.0)
                pl = tl.load(pbl_ptr + offs, mask=m, other=0.0) + lr_lv * tl.load(lbl_ptr + offs, mask=m, other=0.0)
                tl.store(o_pbm_ptr + offs, pm, mask=m)
                tl.store(o_pbl_ptr + offs, pl, mask=m)
                g_mu, g_lv = _load_elbo_grad(mu_ptr, lv_ptr, eps_ptr, gz_ptr, offs, m, scale, kl_weight)
                acc_mu += tl.where(m, g_mu * pm, 0.0)
                acc_lv += tl.where(m, g_lv * pl, 0.0)
            tl.store(partial_ptr + pid * 2, tl.sum(acc_mu, axis=0))
            tl.store(partial_ptr + pid * 2 + 1, tl.sum(acc_lv, axis=0))

    @_launch_cached
    @triton.jit
    def _reverse_rows_kernel(lbm_ptr, lbl_ptr, pbm_ptr, pbl_ptr, mu_ptr, lv_ptr, eps_ptr, gz_ptr, norms_ptr,
                             partial_ptr, o_pbm_ptr, o_pbl_ptr, o_vm_ptr, o_vl_ptr, o_u_ptr, o_z_ptr, o_w_ptr,
                             n_rows, n_cols, num_partials, scale: tl.float64, kl_weight: tl.float64,
                             lr_mu: tl.float64, lr_lv: tl.float64, max_norm: tl.float64, fd_step: tl.float64,
                             FD_MODE: tl.constexpr, HAS_CLIP: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK_D: tl.constexpr, MAXP: tl.constexpr):
        scale, kl_weight = _typed(scale, mu_ptr), _typed(kl_weight, mu_ptr)
        lr_mu, lr_lv = _typed(lr_mu, mu_ptr), _typed(lr_lv, mu_ptr)
        max_norm, fd_step = _typed(max_norm, mu_ptr), _typed(fd_step, mu_ptr)
        n_mu = tl.load(norms_ptr)
        n_lv = tl.load(norms_ptr + 1)
        c_mu = _clip_coef(n_mu, max_norm, HAS_CLIP)
        c_lv = _clip_coef(n_lv, max_norm, HAS_CLIP)
        # with clipping _reverse_dots_kernel stored pbar' and the dots; without, pbar' is made here
        clipped = _clipped(n_mu, n_lv, max_norm, HAS_CLIP)
        k_mu = c_mu * 0.0
        k_lv = c_lv * 0.0
        if clipped:
            k_mu = _kappa(n_mu, c_mu, max_norm, _reduce_partials(partial_ptr, num_partials, 0, MAXP))
            k_lv = _kappa(n_lv, c_lv, max_norm, _reduce_partials(partial_ptr, num_partials, 1, MAXP))
        # groups of ROWS rows, several per program (at most MAX_PROGRAMS programs: each
        # reduces the workspace once)
        for first_row in range(tl.program_id(0) * ROWS, n_rows, tl.num_programs(0) * ROWS):
            rows = first_row + tl.arange(0, ROWS)
            rmask = rows < n_rows
            uu = tl.zeros((ROWS,), dtype=mu_ptr.dtype.element_ty)
            zz = tl.zeros_like(uu)
            for c0 in range(0, n_cols, BLOCK_D):
                cols = c0 + tl.arange(0, BLOCK_D)
                m = rmask[:, None] & (cols < n_cols)[None, :]
                offs = rows[:, None] * n_cols + cols[None, :]
                if clipped:
                    pm = tl.load(o_pbm_ptr + offs, mask=m, other=0.0)
                    pl = tl.load(o_pbl_ptr + offs, mask=m, other=0.0)
                else:
                    pm = tl.load(pbm_ptr + offs, mask=m, other=0.0) + lr_mu * tl.load(lbm_ptr + offs, mask=m,
                                                                                       other=0.0)
                    pl = tl.load(pbl_ptr + offs, mask=m, other=0.0) + lr_lv * tl.load(lbl_ptr + offs, mask=m,
                                                                                       other=0.0)
                    tl.store(o_pbm_ptr + offs, pm, mask=m)
                    tl.store(o_pbl_ptr + offs, pl, mask=m)
                lv = tl.load(lv_ptr + offs, mask=m, other=0.0)
                mu = tl.load(mu_ptr + offs, mask=m, other=0.0)
                eps = tl.load(eps_ptr + offs, mask=m, other=0.0)
                sigma, em = _gauss_terms(lv)
                vm = c_mu * pm
                vl = c_lv * pl
                if clipped:  # (as the CUDA and CPU kernels: unclipped, grad_z is not read)
                    gz = tl.load(gz_ptr + offs, mask=m, other=0.0)
                    g_mu, g_lv = _elbo_grad(gz, mu, sigma, em, eps, scale, kl_weight)
                    vm = vm - k_mu * g_mu
                    vl = vl - k_lv * g_lv
                u, z = _store_directions(vm, vl, mu, sigma, eps, o_vm_ptr, o_vl_ptr, o_u_ptr, offs, m)
                if FD_MODE == _FD_FORWARD:
                    tl.store(o_z_ptr + offs, z + fd_step * u, mask=m)
                else:
                    tl.store(o_z_ptr + offs, z, mask=m)
                uu += tl.sum(tl.where(m, u * u, 0.0), axis=1)
                zz += tl.sum(tl.where(m, z * z, 0.0), axis=1)
            w = tl.zeros_like(uu) + 1.0
            if FD_MODE == _FD_CENTRAL:
                r, w = _central_step(uu, zz, fd_step)
                # second sweep: z +- r_b u_b from the stored z and u of these rows
                for c0 in range(0, n_cols, BLOCK_D):
                    cols = c0 + tl.arange(0, BLOCK_D)
                    m = rmask[:, None] & (cols < n_cols)[None, :]
                    offs = rows[:, None] * n_cols + cols[None, :]
                    z = tl.load(o_z_ptr + offs, mask=m, other=0.0)
                    du = r[:, None] * tl.load(o_u_ptr + offs, mask=m, other=0.0)
                    tl.store(o_z_ptr + offs, z + du, mask=m)
                    tl.store(o_z_ptr + n_rows * n_cols + offs, z - du, mask=m)
            tl.store(o_w_ptr + rows, w, mask=rmask)

    @_launch_cached
    @triton.jit
    def _reverse_direction_one_program_kernel(lbm_ptr, lbl_ptr, pbm_ptr, pbl_ptr, mu_ptr, lv_ptr, eps_ptr, gz_ptr,
                                              norms_ptr, o_pbm_ptr, o_pbl_ptr, o_vm_ptr, o_vl_ptr, o_u_ptr, o_z_ptr,
                                              o_w_ptr, n_rows, n_cols, scale: tl.float64, kl_weight: tl.float64,
                                              lr_mu: tl.float64, lr_lv: tl.float64, max_norm: tl.float64,
                                              fd_step: tl.float64, FD_MODE: tl.constexpr, HAS_CLIP: tl.constexpr,
                                              RB: tl.constexpr, DB: tl.constexpr):
        # the whole [rows, cols] state as one [RB, DB] tile: pbar update, clip-Jacobian dots,
        # directions and evaluation points without a workspace
        scale, kl_weight = _typed(scale, mu_ptr), _typed(kl_weight, mu_ptr)
        lr_mu, lr_lv = _typed(lr_mu, mu_ptr), _typed(lr_lv, mu_ptr)
        max_norm, fd_step = _typed(max_norm, mu_ptr), _typed(fd_step, mu_ptr)
        rows = tl.arange(0, RB)
        cols = tl.arange(0, DB)
        rmask = rows < n_rows
        m = rmask[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        pm = tl.load(pbm_ptr + offs, mask=m, other=0.0) + lr_mu * tl.load(lbm_ptr + offs, mask=m, other=0.0)
        pl = tl.load(pbl_ptr + offs, mask=m, other=0.0) + lr_lv * tl.load(lbl_ptr + offs, mask=m, other=0.0)
        tl.store(o_pbm_ptr + offs, pm, mask=m)
        tl.store(o_pbl_ptr + offs, pl, mask=m)
        mu = tl.load(mu_ptr + offs, mask=m, other=0.0)
        lv = tl.load(lv_ptr + offs, mask=m, other=0.0)
        eps = tl.load(eps_ptr + offs, mask=m, other=0.0)
        sigma, em = _gauss_terms(lv)
        n_mu = tl.load(norms_ptr)
        n_lv = tl.load(norms_ptr + 1)
        c_mu = _clip_coef(n_mu, max_norm, HAS_CLIP)
        c_lv = _clip_coef(n_lv, max_norm, HAS_CLIP)
        vm = c_mu * pm
        vl = c_lv * pl
        if HAS_CLIP:
            gz = tl.load(gz_ptr + offs, mask=m, other=0.0)
            g_mu, g_lv = _elbo_grad(gz, mu, sigma, em, eps, scale, kl_weight)
            dot_mu = tl.sum(tl.sum(tl.where(m, g_mu * pm, 0.0), axis=1), axis=0)
            dot_lv = tl.sum(tl.sum(tl.where(m, g_lv * pl, 0.0), axis=1), axis=0)
            vm = vm - _kappa(n_mu, c_mu, max_norm, dot_mu) * g_mu
            vl = vl - _kappa(n_lv, c_lv, max_norm, dot_lv) * g_lv
        u, z = _store_directions(vm, vl, mu, sigma, eps, o_vm_ptr, o_vl_ptr, o_u_ptr, offs, m)
        w = tl.zeros((RB,), dtype=mu_ptr.dtype.element_ty) + 1.0
        if FD_MODE == _FD_FORWARD:
            tl.store(o_z_ptr + offs, z + fd_step * u, mask=m)
        elif FD_MODE == _FD_CENTRAL:
            uu = tl.sum(tl.where(m, u * u, 0.0), axis=1)
            zz = tl.sum(tl.where(m, z * z, 0.0), axis=1)
            r, w = _central_step(uu, zz, fd_step)
            du = r[:, None] * u
            tl.store(o_z_ptr + offs, z + du, mask=m)
            tl.store(o_z_ptr + n_rows * n_cols + offs, z - du, mask=m)
        else:
            tl.store(o_z_ptr + offs, z, mask=m)
        tl.store(o_w_ptr + rows, w, mask=rmask)

    @_launch_cached
    @triton.jit
    def _reverse_update_kernel(lbm_ptr, lbl_ptr, pbm_ptr, pbl_ptr, vm_ptr, vl_ptr, lv_ptr, eps_ptr, gz_ptr,
                               a_ptr, b_ptr, o_lbm_ptr, o_lbl_ptr, o_pbm_ptr, o_pbl_ptr, n, hvp_scale: tl.float64,
                               scale: tl.float64, kl_weight: tl.float64, momentum: tl.float64, HAS_B: tl.constexpr,
                               BLOCK: tl.constexpr):
        hvp_scale, scale = _typed(hvp_scale, lv_ptr), _typed(scale, lv_ptr)
        kl_weight, momentum = _typed(kl_weight, lv_ptr), _typed(momentum, lv_ptr)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        hzz = tl.load(a_ptr + offs, mask=m)
        if HAS_B:
            hzz = hzz - tl.load(b_ptr + offs, mask=m)
        hzz = hzz * hvp_scale
        lv = tl.load(lv_ptr + offs, mask=m)
        sigma, em = _gauss_terms(lv)
        sigma_eps = sigma * tl.load(eps_ptr + offs, mask=m)
        vm = tl.load(vm_ptr + offs, mask=m)
        vl = tl.load(vl_ptr + offs, mask=m)
        gz = tl.load(gz_ptr + offs, mask=m)
        hv_mu = scale * (hzz + kl_weight * vm)
        hv_lv = scale * (0.5 * sigma_eps * hzz + 0.25 * sigma_eps * gz * vl + 0.5 * kl_weight * (em + 1.0) * vl)
        tl.store(o_lbm_ptr + offs, tl.load(lbm_ptr + offs, mask=m) - hv_mu, mask=m)
        tl.store(o_lbl_ptr + offs, tl.load(lbl_ptr + offs, mask=m) - hv_lv, mask=m)
        tl.store(o_pbm_ptr + offs, momentum * tl.load(pbm_ptr + offs, mask=m), mask=m)
        tl.store(o_pbl_ptr + offs, momentum * tl.load(pbl_ptr + offs, mask=m), mask=m)


# Host side. Every call pays this Python before Triton's own launcher, so it stays lean:
# no Triton host helpers (triton.cdiv / next_power_of_2 are constexpr functions whose
# host calls cost microseconds in recent releases), no enum construction per call.

_FLOAT_DTYPES = (torch.float32, torch.float64)
_EVAL_POINTS = {int(mode): mode.eval_points for mode in FdMode}


def _contiguous(names: tuple, tensors: tuple) -> list:
    """The tensors, contiguous, each checked to be float32 / float64 (named in the error)."""
    out = []
    for name, t in zip(names, tensors):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"triton backend: argument '{name}' must be float32 or float64, got {t.dtype}")
        out.append(t.contiguous())
    return out


def _on_tensors_device(op):
    """``op`` run with its first tensor's GPU as the current device: Triton launches on the
    current device (the CUDA kernels run under a device guard likewise)."""

    @functools.wraps(op)
    def run(first, *args):
        device = first.get_device()
        if device < 0 or device == torch.cuda.current_device():
            return op(first, *args)
        with torch.cuda.device(device):
            return op(first, *args)

    return run


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _grid(n: int) -> tuple[int]:
    return (max(1, _cdiv(n, BLOCK)),)


def _warps(elements: int) -> int:
    """Warps of a one-program kernel: enough threads for a few elements each."""
    return 4 if elements <= 1024 else 8


def _reduction_programs(n: int) -> int:
    return max(1, min(MAX_PROGRAMS, _cdiv(n, BLOCK)))


_SAMPLE_ARGS = ("mu", "logvar", "eps")
_FORWARD_STEP_ARGS = ("mu", "logvar", "p_mu", "p_logvar", "eps", "grad_z")
_REVERSE_DIRECTION_ARGS = ("lbar_mu", "lbar_logvar", "pbar_mu", "pbar_logvar", "mu", "logvar", "eps", "grad_z")
_REVERSE_UPDATE_ARGS = ("lbar_mu", "lbar_logvar", "pbar_mu", "pbar_logvar", "v_mu", "v_logvar", "logvar", "eps",
                        "grad_z", "hvp_a")


@_on_tensors_device
def sample(mu, logvar, eps):
    mu, logvar, eps = _contiguous(_SAMPLE_ARGS, (mu, logvar, eps))
    z = torch.empty_like(mu)
    _sample_kernel[_grid(mu.numel())](mu, logvar, eps, z, mu.numel(), BLOCK=BLOCK)
    return z


@_on_tensors_device
def forward_step(mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next, scale, kl_weight, lr_mu, lr_logvar,
                 momentum, max_grad_norm):
    mu, logvar, p_mu, p_logvar, eps, grad_z = _contiguous(_FORWARD_STEP_ARGS, (mu, logvar, p_mu, p_logvar, eps,
                                                                               grad_z))
    n = mu.numel()
    mu_n, lv_n, pm_n, pl_n = (torch.empty_like(mu) for _ in range(4))
    has_next = eps_next is not None
    if has_next:
        (eps_next,) = _contiguous(("eps_next",), (eps_next,))
        z_next = z_out = torch.empty_like(mu)
    else:  # returned empty; the kernel reads and writes neither pointer (HAS_NEXT=False)
        z_next, eps_next, z_out = mu.new_empty((0,)), mu, mu
    norms = mu.new_empty((2,))
    scalars = (float(scale), float(kl_weight), float(lr_mu), float(lr_logvar), float(momentum), float(max_grad_norm))
    has_clip = scalars[5] > 0
    if n <= SMALL_ELEMENTS:
        block = _next_power_of_2(n)
        _forward_step_one_program_kernel[(1,)](
            mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next, mu_n, lv_n, pm_n, pl_n, z_out, norms, n, *scalars,
            HAS_NEXT=has_next, HAS_CLIP=has_clip, BLOCK=block, num_warps=_warps(block))
        return mu_n, lv_n, pm_n, pl_n, z_next, norms
    programs = _reduction_programs(n)
    partial = mu.new_empty((programs, 2))
    _grad_norm_partials_kernel[(programs,)](mu, logvar, eps, grad_z, partial, n, scalars[0], scalars[1],
                                            BLOCK=BLOCK)
    _forward_update_kernel[(programs,)](
        mu, logvar, p_mu, p_logvar, eps, grad_z, eps_next, mu_n, lv_n, pm_n, pl_n, z_out, norms, partial, n,
        programs, *scalars, HAS_NEXT=has_next, HAS_CLIP=has_clip, BLOCK=BLOCK, MAXP=MAX_PROGRAMS)
    return mu_n, lv_n, pm_n, pl_n, z_next, norms


@_on_tensors_device
def reverse_direction(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z, grad_norms, scale,
                      kl_weight, lr_mu, lr_logvar, max_grad_norm, fd_mode, fd_step):
    lbm, lbl, pbm, pbl, mu, logvar, eps, grad_z = _contiguous(
        _REVERSE_DIRECTION_ARGS, (lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, mu, logvar, eps, grad_z))
    grad_norms = grad_norms.contiguous()
    rows, cols = mu.shape
    n = rows * cols
    scalars = (float(scale), float(kl_weight), float(lr_mu), float(lr_logvar), float(max_grad_norm), float(fd_step))
    has_clip = scalars[4] > 0
    fd_mode = int(fd_mode)
    pbm_n, pbl_n, v_mu, v_lv, u = (torch.empty_like(mu) for _ in range(5))
    z_eval = mu.new_empty((_EVAL_POINTS[fd_mode], rows, cols))
    row_weight = mu.new_empty((rows,))
    rb, db = _next_power_of_2(rows), _next_power_of_2(cols)
    if rb * db <= SMALL_ELEMENTS:
        _reverse_direction_one_program_kernel[(1,)](
            lbm, lbl, pbm, pbl, mu, logvar, eps, grad_z, grad_norms, pbm_n, pbl_n, v_mu, v_lv, u, z_eval, row_weight,
            rows, cols, *scalars, FD_MODE=fd_mode, HAS_CLIP=has_clip, RB=rb, DB=db, num_warps=_warps(rb * db))
        return pbm_n, pbl_n, v_mu, v_lv, u, z_eval, row_weight
    programs = _reduction_programs(n)
    # written (and read) only where the forward step clipped: see _reverse_dots_kernel
    partial = mu.new_empty((programs, 2))
    if has_clip:
        _reverse_dots_kernel[(programs,)](lbm, lbl, pbm, pbl, mu, logvar, eps, grad_z, grad_norms, pbm_n, pbl_n,
                                          partial, n, *scalars[:5], BLOCK=BLOCK)
    _reverse_rows_kernel[(max(1, min(MAX_PROGRAMS, _cdiv(rows, ROWS))),)](
        lbm, lbl, pbm, pbl, mu, logvar, eps, grad_z, grad_norms, partial, pbm_n, pbl_n, v_mu, v_lv, u, z_eval,
        row_weight, rows, cols, programs, *scalars, FD_MODE=fd_mode, HAS_CLIP=has_clip, ROWS=ROWS, BLOCK_D=BLOCK_D,
        MAXP=MAX_PROGRAMS)
    return pbm_n, pbl_n, v_mu, v_lv, u, z_eval, row_weight


@_on_tensors_device
def reverse_update(lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, v_mu, v_logvar, logvar, eps, grad_z, hvp_a, hvp_b,
                   hvp_scale, scale, kl_weight, momentum):
    ts = _contiguous(_REVERSE_UPDATE_ARGS, (lbar_mu, lbar_logvar, pbar_mu, pbar_logvar, v_mu, v_logvar, logvar, eps,
                                            grad_z, hvp_a))
    has_b = hvp_b is not None
    b = _contiguous(("hvp_b",), (hvp_b,))[0] if has_b else ts[9]
    like = ts[0]
    outs = (torch.empty_like(like), torch.empty_like(like), torch.empty_like(like), torch.empty_like(like))
    n = like.numel()
    _reverse_update_kernel[_grid(n)](*ts, b, *outs, n, float(hvp_scale), float(scale), float(kl_weight),
                                     float(momentum), HAS_B=has_b, BLOCK=BLOCK)
    return outs


# A sum over a list of tensors: ATen's multi-tensor CUDA kernel already fuses it.
accumulate_ = torch_impl.accumulate_
