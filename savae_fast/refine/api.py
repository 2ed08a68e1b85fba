"""Public entry point: :func:`refine`."""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
from torch import Tensor

from savae_fast.ops import get_backend
from savae_fast.refine.function import RefineFunction, run_forward
from savae_fast.refine.precision import reduced_fp32_settings, warn_low_precision_differences, warn_reduced_precision
from savae_fast.refine.config import NonFinite
from savae_fast.refine.stabilize import RefineStats
from savae_fast.refine.validation import (DEFAULTS, check_backend, check_capture, check_finite_inputs, check_noise,
                                          check_not_transformed, check_state, check_steps_fit, collect_params,
                                          make_config, noise_or_draw)

def _compile_boundary(fn):
    """``torch.compiler.disable(fn)``, made at the first call: importing Dynamo costs about a
    second, which ``import savae_fast`` (and ``savae-fast --help``) need not pay. A first call
    traced by Dynamo breaks the graph there as well (the wrapper is then run eagerly)."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


# Under torch.compile, refine is one graph break: its loop differentiates the user's
# decoder (torch.autograd.grad), which Dynamo would otherwise split into many pieces.
# The code around it compiles; the savae_fast:: operators trace (fake kernels).
@_compile_boundary
def refine(
    mu: Tensor,
    logvar: Tensor,
    nll_fn: Callable[[Tensor], Tensor],
    params: Iterable[Tensor] = (),
    *,
    steps: int = DEFAULTS.steps,
    lr: float | tuple[float, float] = DEFAULTS.lr,
    momentum: float = DEFAULTS.momentum,
    max_grad_norm: float = DEFAULTS.max_grad_norm,
    kl_weight: float = DEFAULTS.kl_weight,
    reduction: str = DEFAULTS.reduction,
    hvp: str = DEFAULTS.hvp,
    fd_eps: float | None = None,
    fd_tol: float | None = None,
    noise: Tensor | None = None,
    backend: str = "auto",
    preserve_rng_state: bool = True,
    process_group: object | None = None,
    on_nonfinite: str = "raise",
    fp32_precision: str = "inherit",
    batch_coupled: bool | None = None,
    check_decoder: bool = True,
    stack_points: bool | int = False,
    backward_clip: float | None = DEFAULTS.backward_clip,
    backward_clip_scope: str = DEFAULTS.backward_clip_scope,
    backward_clip_mode: str = DEFAULTS.backward_clip_mode,
    backward_steps: int | None = None,
    stats: RefineStats | None = None,
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
        mu: ``[B, D]`` float32/float64 initial means of the variational posterior (the encoder's).
        logvar: ``[B, D]`` initial log-variances, of mu's shape, dtype and device.
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
            accurate of the two-point differences, no parameter-sized state),
            "fd_richardson" (5K+1 passes: fd_central at two steps, extrapolated;
            for strongly curved decoders where the exact modes cannot run),
            "fd_adaptive" (fd_richardson with a per-example check of its step: where
            an example's truncation estimate is too large its step is halved and the
            reverse step evaluated again; 5K+1 passes and 4 per retry, one host read
            per reverse step, not CUDA-graph capturable), "exact"
            (double backward; the decoder must be twice differentiable) or "jvp"
            (forward-over-reverse: exact to rounding without a second-order graph;
            every decoder op needs a forward-mode derivative).
        fd_eps: finite-difference step. Default: by ``hvp`` and the decoder's
            precision, which is the autocast dtype if refine is called inside an
            autocast region (bfloat16/float16 decoders need ~100x larger steps),
            else mu's dtype. A decoder that enables autocast inside ``nll_fn``
            should pass ``fd_eps`` (0.1 for bfloat16) or use ``hvp="exact"``.
        fd_tol: ``hvp="fd_adaptive"`` only, in (0, 1]: the estimated relative truncation
            error of an example's central quotient above which its step is halved and
            the reverse step evaluated again (smaller: more accurate where the decoder is
            strongly curved, more retries). Default by the decoder's precision: 3e-3
            float32, 1e-6 float64, 1e-1 TF32, bfloat16 and float16.
        noise: optional ``[steps, B, D]`` standard-normal draws; drawn from the
            default generator of mu's device otherwise (before the first step).
        backend: "auto", "cpp", "triton" or "torch" (kernels of the Gaussian math).
        preserve_rng_state: replay each step's RNG state in the backward so that
            stochastic decoders (dropout) see the same masks. Only done when the
            first inner step finds that the decoder draws random numbers; a
            deterministic decoder leaves the process-wide generators alone.
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

        batch_coupled: whether ``nll_fn`` couples the examples of the batch (example b's NLL depends on
            other examples' z: batch statistics such as BatchNorm in training mode, a mean over the
            batch). The difference modes then take one step for the whole batch instead of one per
            example (fd_forward, exact and jvp need nothing). ``None`` (default): coupled when the
            probe of the first decoder call finds batch normalisation in training mode over more
            than one example; a coupling no operator shows must be declared with ``True``.
        stack_points: evaluate the decoder at all the points a reverse step of fd_central (2),
            fd_richardson and fd_adaptive (4) needs in one call of ``nll_fn`` on ``z`` of shape
            ``[n * B, D]``, rows point-major (row ``j * B + b`` is example b at point j), and get
            every point's parameter term from one backward. ``nll_fn`` must then return ``[n * B]``:
            ``lambda z: decoder.nll(savae_fast.nn.repeat_rows(x, z), z)`` (the bundled models take
            stacked z as they are). An int caps the points per call (memory). Dropout must be
            ``savae_fast.nn.Dropout`` (one mask per example); other random draws are refused. Modes
            with one point per reverse step (fd_forward, exact, jvp) are unchanged. A decoder that
            couples the examples is evaluated unstacked (with a warning).
        check_decoder: probe the first decoder call of a differentiable refinement (one Python
            hook per operator of that call): its random draws (a generator of its own is an
            error), batch coupling, tensors it writes in place (saved per step and replayed in the
            backward; writing into a parameter is an error); and cross-check ``hvp="exact"`` /
            ``"jvp"``'s first second-order terms against two difference quotients. ``False`` skips
            both (the caller vouches for the decoder; a decoder that draws random numbers is then
            found by its generator moving).
        backward_clip: a stabiliser of the backward pass (docs/math.md, "When the gradient through the
            steps explodes"): after every reverse step the backpropagated gradient dF/dlambda_k (and
            the momentum's adjoint with it) is scaled down to at most ``backward_clip`` times its
            incoming norm |dF/dlambda_K|, per example (``backward_clip_scope="example"``: no
            example's gradient grows by more than that) or for the whole batch (``"batch"``). Where the inner SGD is unstable for an example (inner lr
            times the decoder's curvature above 2 (1 + momentum)) the exact gradient grows like
            rho^K and training with it diverges; the clip bounds it. Where the vector stays below the
            bound the gradient is bit-identical to the exact one. ``None``: no clip (the exact gradient).
        backward_clip_scope: "example" (default) or "batch", see ``backward_clip``.
        backward_clip_mode: what ``backward_clip`` does to an example (or, with scope "batch", the
            batch) whose gradient passes its bound: "stop" (default) clips it to the bound and
            propagates it no further (that gradient goes to dF/dlambda_0 as it is, the earlier steps
            taken as the identity, as ``backward_steps`` does for all: a truncation, for that
            example, at the step where it started to explode, which adds no more of the unstable
            directions to dF/dtheta); "scale" scales it down to the bound and propagates it on.
        backward_steps: differentiate through the last ``backward_steps`` inner steps only
            (truncated backpropagation): the earlier steps' Jacobian is taken as the identity, so
            the encoder receives dF/dlambda at step K - backward_steps and the decoder no term from
            the earlier steps. ``None`` (default): all K; 0: the encoder gets dF/dlambda_K.
        stats: a :class:`savae_fast.RefineStats` that the backward pass fills with how much it
            amplified the backpropagated vector (per example and for the batch, over all steps and
            the largest single step): ``stats.summary()`` for a training log. Independently of it,
            refine warns once where that amplification exceeds 1e3 and nothing bounds it (one host
            read per backward unless ``on_nonfinite="ignore"``).

    Returns:
        ``(mu_K, logvar_K)``.

    Raises:
        TypeError, ValueError: an argument of the wrong type, shape, dtype, device or layout, a
            hyper-parameter out of range, non-finite ``mu`` / ``logvar`` / ``noise``, a noise tensor
            that requires grad, ``steps`` whose saved state cannot fit the device.
        RuntimeError: a decoder refine cannot differentiate (see ``check_decoder``), a call inside
            a ``torch.func`` transform.
        FloatingPointError: non-finite values during the refinement (``on_nonfinite="raise"``).

    Example:
        >>> import torch, savae_fast as sf
        >>> dec = torch.nn.Linear(4, 6)
        >>> x = torch.randint(0, 2, (8, 6)).float()
        >>> nll = lambda z: torch.nn.functional.binary_cross_entropy_with_logits(
        ...     dec(z), x, reduction="none").sum(1)
        >>> mu, logvar = torch.zeros(8, 4, requires_grad=True), torch.zeros(8, 4, requires_grad=True)
        >>> mu_k, logvar_k = sf.refine(mu, logvar, nll, dec.parameters(), steps=5)
        >>> loss = (nll(mu_k + (0.5 * logvar_k).exp() * torch.randn(8, 4))).mean()
        >>> loss.backward()  # gradients reach mu, logvar and the decoder through the 5 steps
        >>> mu.grad.shape, dec.weight.grad.shape
        (torch.Size([8, 4]), torch.Size([6, 4]))
    """
    check_state(mu, logvar)
    if not callable(nll_fn):
        raise TypeError(f"refine: argument 'nll_fn' must be callable, got {type(nll_fn).__name__}")
    params = collect_params(params)
    if stats is not None and not isinstance(stats, RefineStats):
        raise TypeError(f"refine: argument 'stats' must be a savae_fast.RefineStats or None, got {type(stats).__name__}")
    check_not_transformed(mu, logvar, *params)
    # read once: they pick the default difference step and say whether to warn
    reduced = (reduced_fp32_settings(mu.device.type) if mu.dtype == torch.float32 and fp32_precision != "ieee"
               else {})
    cfg = make_config(mu, steps=steps, lr=lr, momentum=momentum, max_grad_norm=max_grad_norm,
                      kl_weight=kl_weight, reduction=reduction, hvp=hvp, fd_eps=fd_eps, fd_tol=fd_tol,
                      preserve_rng_state=preserve_rng_state, process_group=process_group,
                      on_nonfinite=on_nonfinite, fp32_precision=fp32_precision, reduced_fp32=reduced,
                      check_decoder=check_decoder, batch_coupled=batch_coupled, stack_points=stack_points,
                      backward_clip=backward_clip, backward_clip_scope=backward_clip_scope,
                      backward_clip_mode=backward_clip_mode, backward_steps=backward_steps)
    check_capture(cfg, mu)
    if reduced:
        warn_reduced_precision(mu.device.type, reduced)
    check_backend(backend)
    if cfg.steps == 0:
        if noise is not None:
            check_noise(noise, 0, mu)
        return mu, logvar
    given_noise = noise is not None
    needs_grad = torch.is_grad_enabled() and (
        mu.requires_grad or logvar.requires_grad or any(p.requires_grad for p in params))
    if given_noise and noise.requires_grad and needs_grad:
        raise ValueError("refine: argument 'noise' requires grad, but refine treats the noise as fixed draws and "
                         "gives it no gradient; pass noise.detach() (or draw it without autograd)")
    check_steps_fit(cfg.steps, mu, noise=not given_noise, tape=needs_grad)
    if needs_grad:
        warn_low_precision_differences(cfg)
    noise = noise_or_draw(noise, cfg.steps, mu)
    if cfg.on_nonfinite is not NonFinite.IGNORE:  # (no host read where graph capture needs none)
        check_finite_inputs(mu=mu, logvar=logvar, noise=noise if given_noise else None)
    be = get_backend(backend, mu.device)
    if cfg.process_group is not None and cfg.max_grad_norm > 0:
        from savae_fast.refine.distributed import clip_coupled_backend

        be = clip_coupled_backend(be, cfg.process_group)

    if not needs_grad:
        mu_k, logvar_k, _ = run_forward(cfg, be, nll_fn, mu.detach().contiguous(), logvar.detach().contiguous(),
                                        noise, (), record=False)
        return mu_k, logvar_k
    return RefineFunction.apply(cfg, be, nll_fn, noise, stats, mu.contiguous(), logvar.contiguous(), *params)
