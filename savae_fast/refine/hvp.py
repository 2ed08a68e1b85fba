"""How the reverse pass of refine gets the decoder's second-order terms: one object
per method, owning its decoder passes and its part of the reverse step.

Each reverse step k needs Hzz u_k (the decoder's z-Hessian along the z-space
direction u_k) and d/dtheta (g_z . u_k) (docs/math.md, "Reverse pass"). The
fused ``reverse_direction`` prepares the evaluation points for the method's
FdMode, the method evaluates the decoder there, and the fused
``reverse_update`` combines ``(hvp_a - hvp_b) * hvp_scale`` into Hzz u.

A new method subclasses :class:`HvpMethod` and is added to :data:`HVP_METHODS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple, Sequence

import torch
from torch import Tensor

from savae_fast.nn import stacked_call
from savae_fast.ops import Backend
from savae_fast.ops.constants import FdMode
from savae_fast.refine.config import NonFinite
from savae_fast.refine.cudnn import TwiceDifferentiable
from savae_fast.refine.decoder import decoder_grads, decoder_hvp, decoder_jvp
from savae_fast.refine.nonfinite import zero_nonfinite
from savae_fast.refine.precision import TF32
from savae_fast.refine.tape import Tape, accumulation_dtype


class DecoderTerms(NamedTuple):
    """Hzz u = (hvp_a - hvp_b) * hvp_scale (hvp_b None: 0)."""

    hvp_a: Tensor
    hvp_b: Tensor | None
    hvp_scale: float
    screened: tuple  # what on_nonfinite="raise" looks at if the result is not finite


@dataclass
class ReverseRun:
    """One reverse pass: its inputs and the parameter gradient it builds."""

    cfg: object  # RefineConfig
    be: Backend
    nll_fn: Callable
    params: Sequence[Tensor]
    tape: Tape
    theta_bar: list | None = None  # dF/dtheta being built (float32 for half-precision parameters)
    out_scale: Tensor | None = None  # fd_forward: the normalisation of the incoming adjoint
    evaluations: TwiceDifferentiable | None = None  # exact: decoder evaluations without cuDNN RNNs
    step_theta_bar: list | None = None  # fd_adaptive: the current reverse step's part of theta_bar
    exact_checked: bool = False  # exact / jvp: the first reverse step's cross-check is done

    @property
    def zero_nonfinite(self) -> bool:
        return self.cfg.on_nonfinite is NonFinite.ZERO

    def add_param_grads(self, grads: list, alpha: float, into: list | None = None) -> None:
        """theta_bar (or ``into``) += alpha * grads in place; None entries (unused parameters) skipped."""
        for tb, g in zip(self.theta_bar if into is None else into, grads):
            if g is not None:
                tb.add_(zero_nonfinite(g) if self.zero_nonfinite else g, alpha=alpha)

    def zero_theta_bar(self) -> None:
        self.theta_bar = [torch.zeros_like(p, dtype=accumulation_dtype(p)) for p in self.params]

    @property
    def coupled(self) -> bool:
        return self.tape.coupled

    def evaluate_points(self, points: Sequence[Tensor], coefs: Sequence[float], param_scale: float,
                        row_weight: Tensor, replay: Callable[[], None], into: list | None = None) -> list:
        """t_j = dL_j/dz at each point z_j, L_j = sum_b w_b NLL_b(z_j) (w: ``row_weight``), and
        theta_bar (or ``into``) += param_scale * sum_j coefs[j] dL_j/dtheta.

        One decoder call per point, or with stacking (tape.stack_points > 1) up to that many points
        in one call on their rows stacked point-major ([n B, D]), its loss weighted
        coefs[j] w_b per row: one backward gives every point's parameter term at once, and the
        z-gradient rows divided by coefs[j] (powers of two: exact) are the t_j."""
        cap = max(1, self.tape.stack_points)
        batch = points[0].shape[0]
        terms = []
        for start in range(0, len(points), cap):
            group = range(start, min(start + cap, len(points)))
            replay()
            if len(group) == 1:
                (j,) = group
                g_z, g_theta = decoder_grads(self.nll_fn, points[j], self.params, weight=row_weight)
                self.add_param_grads(g_theta, param_scale * coefs[j], into)
                terms.append(g_z)
                continue
            z = torch.cat([points[j] for j in group])
            weight = torch.cat([row_weight * coefs[j] for j in group])
            with stacked_call(len(group), batch):
                g_z, g_theta = decoder_grads(self.nll_fn, z, self.params, weight=weight, stacked=(len(group), batch))
            self.add_param_grads(g_theta, param_scale, into)
            del g_theta
            for i, j in enumerate(group):
                rows = g_z[i * batch:(i + 1) * batch]
                terms.append(rows if coefs[j] == 1 else rows / coefs[j])
        return terms

    def central_points(self, z_eval: Tensor, u: Tensor, row_weight: Tensor) -> tuple[Tensor, Tensor]:
        """The central points z +- r u and row weights 1 / (2 r): per example (reverse_direction's
        r_b) for independent examples; for a decoder that couples them (the per-example
        quotients would mix the examples' steps) reverse_direction prepared z alone
        (FdMode.EXACT) and one step serves the whole batch (shared_central_points)."""
        if not self.coupled:
            return z_eval, row_weight
        return shared_central_points(z_eval[0], u, self.cfg.fd_eps, self.cfg.process_group, self.cfg.global_batch)


def shared_central_points(z: Tensor, u: Tensor, fd_eps: float, process_group=None,
                          global_batch: int = 0) -> tuple[Tensor, Tensor]:
    """(z + r u, z - r u) stacked, and the row weights 1 / (2 r) ([B]), for one step
    r = h (1 + rms_b |z_b|) / rms_b |u_b| shared by the batch (over every process of the group);
    r = 0 and weight 0 where u = 0."""
    sq = torch.stack([z.square().sum(), u.square().sum()])
    batch = z.shape[0]
    if process_group is not None:
        from savae_fast.refine.distributed import all_reduce_sum

        sq, batch = all_reduce_sum(sq, process_group), global_batch
    rms = (sq / batch).sqrt()
    nonzero = rms[1] > 0
    r = torch.where(nonzero, fd_eps * (1 + rms[0]) / torch.where(nonzero, rms[1], 1), 0)
    du = r * u
    weight = torch.where(nonzero, 0.5 / torch.where(nonzero, r, 1), 0).expand(z.shape[0]).contiguous()
    return torch.stack([z + du, z - du]), weight


class HvpMethod:
    """Base class of the methods; see the module docstring."""

    name: ClassVar[str]
    fd_mode: ClassVar[FdMode]
    # Default difference step per decoder precision (mu's dtype, the autocast dtype or TF32).
    default_fd_eps: ClassVar[dict] = {}
    # Whether the forward pass sums dNLL/dtheta over the steps into the tape.
    sums_param_grads_in_forward: ClassVar[bool] = False
    # Whether the reverse pass reads device values on the host (then it cannot be graph-captured).
    reads_device_values: ClassVar[bool] = False
    # Per decoder precision: the error estimate above which a step is taken again (fd_adaptive).
    step_tolerance: ClassVar[dict] = {}
    # Decoder evaluation points per reverse step (stack_points puts them in one call).
    points_per_step: ClassVar[int] = 1

    def direction_fd_mode(self, tape: Tape) -> FdMode:
        """The evaluation points reverse_direction prepares for this method."""
        return self.fd_mode

    def begin(self, run: ReverseRun, lbar_mu: Tensor, lbar_logvar: Tensor) -> tuple[Tensor, Tensor]:
        """Before the first reverse step; returns the adjoints the loop starts from."""
        run.zero_theta_bar()
        return lbar_mu, lbar_logvar

    def decoder_terms(self, run: ReverseRun, k: int, z_eval: Tensor, u: Tensor, row_weight: Tensor,
                      replay: Callable[[], None]) -> DecoderTerms:
        raise NotImplementedError

    def finish(self, run: ReverseRun, lbar_mu: Tensor, lbar_logvar: Tensor) -> tuple[Tensor, Tensor, list]:
        """After the last reverse step: (dF/dmu_0, dF/dlogvar_0, dF/dtheta)."""
        return lbar_mu, lbar_logvar, run.theta_bar

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ForwardDifference(HvpMethod):
    """One-sided difference in z-space, one decoder pass per reverse step:
    Hzz u ~ [g_z(z + r u) - g_z(z)] / r with g_z(z) from the forward pass.

    The forward sums the base-point parameter gradients into one buffer (|theta|
    values), never K copies; the reverse pass is linear in its incoming adjoint,
    which is normalised to per-example RMS norm 1 so that a step fixed in advance
    is well conditioned, then scaled back."""

    name = "fd_forward"
    fd_mode = FdMode.FORWARD
    # Where the truncation error (grows with the step) meets the rounding error (grows
    # as its inverse); see validation.DEFAULT_FD_EPS for how they were measured.
    default_fd_eps = {torch.float32: 1e-3, torch.float64: 3e-8, TF32: 5e-2, torch.bfloat16: 1e-1,
                      torch.float16: 3e-2}
    sums_param_grads_in_forward = True

    def begin(self, run, lbar_mu, lbar_logvar):
        # Device arithmetic only (no host read): the backward stays graph-capturable.
        # A zero adjoint stays zero (the reverse pass is linear).
        batch = lbar_mu.shape[0]
        sq = lbar_mu.square().sum() + lbar_logvar.square().sum()
        if run.cfg.process_group is not None:  # the same step on every process of a data-parallel run
            from savae_fast.refine.distributed import all_reduce_sum

            sq, batch = all_reduce_sum(sq, run.cfg.process_group), run.cfg.global_batch
        run.out_scale = sq.sqrt() / math.sqrt(batch)
        divisor = torch.where(run.out_scale > 0, run.out_scale, torch.ones_like(run.out_scale))
        # The forward's sum turns into sum_k [g(z_k + r u_k) - g(z_k)].
        if run.tape.param_grad_sum is not None:
            torch._foreach_neg_(run.tape.param_grad_sum)
        return lbar_mu / divisor, lbar_logvar / divisor

    def decoder_terms(self, run, k, z_eval, u, row_weight, replay):
        replay()
        hvp_a, g_theta = decoder_grads(run.nll_fn, z_eval[0], run.params)
        if run.tape.param_grad_sum is not None:
            run.tape.accumulate_param_grads(
                [zero_nonfinite(g) for g in g_theta] if run.zero_nonfinite else g_theta)
        # hvp_b is the forward's dNLL/dz, finite once the forward's check passed.
        return DecoderTerms(hvp_a, run.tape.grad_z[k], 1.0 / run.cfg.fd_eps, (hvp_a,))

    def finish(self, run, lbar_mu, lbar_logvar):
        theta_bar = []
        if run.tape.param_grad_sum is not None:  # in place: the sum buffers become the gradients
            coef = run.out_scale * (-run.cfg.scale / run.cfg.fd_eps)
            theta_bar = run.tape.param_grad_sum
            for t in theta_bar:
                t.mul_(coef.to(t.dtype))
        return lbar_mu * run.out_scale, lbar_logvar * run.out_scale, theta_bar


class CentralDifference(HvpMethod):
    """Two-sided difference in z-space with a per-example step r_b, two decoder passes
    per reverse step: Hzz u ~ [g_z(z + r u) - g_z(z - r u)] / (2 r). Nothing
    parameter-sized is kept between steps but the gradient being built."""

    name = "fd_central"
    fd_mode = FdMode.CENTRAL
    points_per_step = 2
    default_fd_eps = {torch.float32: 2e-3, torch.float64: 5e-6, TF32: 5e-2, torch.bfloat16: 1e-1,
                      torch.float16: 5e-2}

    def direction_fd_mode(self, tape):
        # a decoder coupling the examples gets one step for the batch (ReverseRun.central_points)
        return FdMode.EXACT if tape.coupled else self.fd_mode

    def decoder_terms(self, run, k, z_eval, u, row_weight, replay):
        # theta_bar -= s [g(z + r u) - g(z - r u)] / (2 r), one pass's parameter
        # gradients alive at a time, or both points in one stacked call (the 1 / (2 r_b) is in
        # the row weights).
        z_eval, row_weight = run.central_points(z_eval, u, row_weight)
        hvp_a, hvp_b = run.evaluate_points((z_eval[0], z_eval[1]), (1.0, -1.0), -run.cfg.scale, row_weight, replay)
        return DecoderTerms(hvp_a, hvp_b, 1.0, (hvp_a, hvp_b))


class RichardsonDifference(CentralDifference):
    """Richardson extrapolation of two central differences, at steps r_b and 2 r_b:
    Hzz u ~ [8 (g(z + r u) - g(z - r u)) - (g(z + 2 r u) - g(z - 2 r u))] / (12 r),
    four decoder passes per reverse step. Truncation falls as r^4 instead of r^2, so
    the step can stay large enough that float32 rounding (of z +- r u and of the
    decoder's gradients, both amplified by 1 / r) stays small: on a large-weight LSTM
    2.7x-100x more accurate than fd_central at its default step (40 draws), and about as
    accurate as fd_central at a step tuned for each draw (three draws swept)."""

    name = "fd_richardson"
    points_per_step = 4
    # float32: large-weight LSTM (truncation ~3e6 eps^4, rounding ~1e-7 / eps) and small-weight
    # decoders (rounding only, 3-4e-6) swept over 1e-3..1e-2. TF32 (the CPU emulation of
    # test_precision, MLP and LSTM, 4 draws) swept over 2e-2..2e-1: 1e-1 gives 2-3e-3
    # (fd_central 4e-3); bfloat16 autocast LSTM over 1e-1..3e-1: 1e-1 gives 3e-4 (fd_central
    # 1e-3); float16 keeps fd_central's step (not measured).
    default_fd_eps = {torch.float32: 1.5e-3, torch.float64: 1e-4, TF32: 1e-1, torch.bfloat16: 1e-1,
                      torch.float16: 5e-2}

    def decoder_terms(self, run, k, z_eval, u, row_weight, replay):
        z_eval, row_weight = run.central_points(z_eval, u, row_weight)
        return self.combine(self.evaluate(run, self.points(z_eval)[0], row_weight, replay))

    @staticmethod
    def points(z_eval: Tensor) -> tuple[tuple, Tensor]:
        """(z + r u, z - r u, z + 2 r u, z - 2 r u) from reverse_direction's central points,
        and r_b u_b as applied."""
        half = 0.5 * (z_eval[0] - z_eval[1])
        return (z_eval[0], z_eval[1], z_eval[0] + half, z_eval[1] - half), half

    @staticmethod
    def evaluate(run, points, row_weight, replay, into=None) -> list:
        """dNLL/dz at z +- r u, z +- 2 r u (rows weighted 1 / (2 r_b)); their parameter
        gradients added to theta_bar (or ``into``) as the extrapolated quotient's: with D(h)
        the central quotient at step h, (4 D(r) - D(2 r)) / 3 = [(8 g(z+) - g(z2+)) -
        (8 g(z-) - g(z2-))] / 6 * row_weight. One pass's parameter gradients alive at a time
        (or one stacked call's)."""
        return run.evaluate_points(points, (8.0, -8.0, -1.0, 1.0), -run.cfg.scale / 6, row_weight, replay, into)

    @staticmethod
    def combine(terms: list) -> DecoderTerms:
        hvp_a = terms[0].mul(8.0).sub_(terms[2])
        hvp_b = terms[1].mul(8.0).sub_(terms[3])
        return DecoderTerms(hvp_a, hvp_b, 1.0 / 6.0, tuple(terms))


class AdaptiveRichardson(RichardsonDifference):
    """fd_richardson with a per-example check of its step. D(2 r) - D(r) = 3 a r^2 + ...
    estimates the central quotient's truncation for every example at no extra pass;
    where it exceeds the tolerance (refine's ``fd_tol``; by default ``step_tolerance`` for the
    decoder's precision) times |Hzz u| (the decoder is too curved along
    u_b for the step, and the extrapolation is then unreliable too) that example's step is
    halved and the reverse step's four passes are evaluated again, up to ``max_halvings``
    times. An example whose estimate did not fall (rounding, not truncation) is not halved
    again. Data-dependent cost: 5K+1 passes and 4 more per retry (at most ``max_halvings`` per
    reverse step); one host read per reverse step and retry (no CUDA-graph capture); one
    parameter-sized buffer."""

    name = "fd_adaptive"
    reads_device_values = True
    # float32: large-weight LSTM, 20 draws: 3e-3 made 0-4 retries per training step (K 10; worst
    # error 3.5e-4, fd_richardson's 4.1e-3); 1e-3 twice as many for no gain. TF32 (CPU
    # emulation, MLP and LSTM) and bfloat16 autocast (LSTM): 3e-2 retried most steps on
    # rounding noise for nothing, 1e-1 none on small-weight decoders. float64: its rounding
    # is ~1e-12 of the estimate at its step.
    step_tolerance = {torch.float32: 3e-3, torch.float64: 1e-6, TF32: 1e-1, torch.bfloat16: 1e-1,
                      torch.float16: 1e-1}
    max_halvings = 4
    # The first step is fd_richardson's. float32, large-weight LSTM, 100 draws, over 1e-3..5e-3:
    # 1.5e-3 gives the best 90th percentile (1.5e-4; median 7.2e-5, 89 retries); 3e-3 a lower
    # median (4.5e-5) but 4.7e-4 at the 90th percentile, 3.4x the retries and +18% time.

    def begin(self, run, lbar_mu, lbar_logvar):
        out = super().begin(run, lbar_mu, lbar_logvar)
        run.step_theta_bar = [torch.zeros_like(t) for t in run.theta_bar]
        return out

    def decoder_terms(self, run, k, z_eval, u, row_weight, replay):
        z_eval, row_weight = run.central_points(z_eval, u, row_weight)
        points, half = self.points(z_eval)
        base = 0.5 * (z_eval[0] + z_eval[1])  # z_b (to rounding: only the point moves, not the step)
        step = None  # per-example factor of the step ([B]); None: all 1
        weight = row_weight
        estimate = None
        for halvings in range(self.max_halvings + 1):
            terms = self.evaluate(run, points, weight, replay, into=run.step_theta_bar)
            # |D(2 r) - D(r)| vs 3 tol |(4 D(r) - D(2 r)) / 3| per example, without a division
            # (u_b = 0 rows: 0 > 0; non-finite rows: never halved).
            d_r = terms[0] - terms[1]
            d_2r = (terms[2] - terms[3]).mul_(0.5)
            previous = estimate
            estimate, size = self._estimate(run, d_r, d_2r)
            retry = estimate > run.cfg.fd_tol * size
            if previous is not None:  # halving cuts a truncation error (by 4 once r^2 dominates) and
                retry &= estimate < previous  # doubles a rounding error: stop where it did not fall
            if halvings == self.max_halvings or not self._any(run, retry):
                break
            halve = torch.where(retry, 0.5, 1.0).to(half.dtype)
            step = halve if step is None else step * halve
            offset = half * step.unsqueeze(1)
            points = (base + offset, base - offset, base + 2 * offset, base - 2 * offset)
            weight = row_weight / step
            torch._foreach_zero_(run.step_theta_bar)  # this step's passes again, from scratch
        torch._foreach_add_(run.theta_bar, run.step_theta_bar)
        torch._foreach_zero_(run.step_theta_bar)
        return self.combine(terms)

    @staticmethod
    def _estimate(run, d_r: Tensor, d_2r: Tensor) -> tuple[Tensor, Tensor]:
        """(|D(2 r) - D(r)|, |4 D(r) - D(2 r)|) per example ([B]), or for the whole batch ([1], over
        every process) where one step serves the batch (a decoder coupling the examples)."""
        if not run.coupled:
            return (d_2r - d_r).norm(dim=1), (4 * d_r - d_2r).norm(dim=1)
        sq = torch.stack([(d_2r - d_r).square().sum(), (4 * d_r - d_2r).square().sum()])
        if run.cfg.process_group is not None:
            from savae_fast.refine.distributed import all_reduce_sum

            sq = all_reduce_sum(sq, run.cfg.process_group)
        norms = sq.sqrt()
        return norms[:1], norms[1:]

    @staticmethod
    def _any(run, retry: Tensor) -> bool:
        count = retry.sum()
        if run.cfg.process_group is not None:  # every process evaluates the same number of passes
            from savae_fast.refine.distributed import all_reduce_sum

            count = all_reduce_sum(count, run.cfg.process_group)
        return bool(count.item())


class ExactHvp(HvpMethod):
    """Double backward through the decoder (it must be twice differentiable; cuDNN
    RNNs are run without cuDNN for it)."""

    name = "exact"
    fd_mode = FdMode.EXACT
    # (nll_fn, z, u, params, evaluations) -> (Hzz u, d/dtheta (g_z . u)), exactly
    second_order = staticmethod(decoder_hvp)

    def begin(self, run, lbar_mu, lbar_logvar):
        run.evaluations = TwiceDifferentiable(lbar_mu.device)
        return super().begin(run, lbar_mu, lbar_logvar)

    def decoder_terms(self, run, k, z_eval, u, row_weight, replay):
        replay()
        hvp_a, g_mixed = self.second_order(run.nll_fn, z_eval[0], u, run.params, run.evaluations)
        if not run.exact_checked:
            run.exact_checked = True
            if run.cfg.check_decoder:
                self.cross_check(run, z_eval[0], u, hvp_a, replay)
        run.add_param_grads(g_mixed, -run.cfg.scale)
        return DecoderTerms(hvp_a, None, 1.0, (hvp_a,))

    def cross_check(self, run, z: Tensor, u: Tensor, hzz_u: Tensor, replay) -> None:
        """The first reverse step's Hzz u against central differences of the decoder's gradient (two
        passes; two more where they disagree). A double backward (or forward-mode derivative) can be
        silently wrong: a compiled function or a custom autograd.Function whose backward is not made of
        differentiable operations gives second derivatives without a graph for them, often zeros.
        Raises where the derivative disagrees by more than half with two difference quotients that
        agree with each other (curvature and rounding make those disagree instead)."""

        def quotient(step):
            points, weight = shared_central_points(z, u, step)
            if not bool(weight[0] > 0):
                return None, 0.0
            replay()
            g_plus = decoder_grads(run.nll_fn, points[0], ())[0]
            replay()
            g_minus = decoder_grads(run.nll_fn, points[1], ())[0]
            rounding = 100 * torch.finfo(g_plus.dtype).eps * float(g_plus.norm()) * float(weight[0])
            return (g_plus - g_minus) * weight[0], rounding

        def differs(a, b, floor):
            return float((a - b).norm()) > max(0.5 * max(float(a.norm()), float(b.norm())), floor)

        step = run.cfg.check_fd_eps
        fd, rounding = quotient(step)
        if fd is None or not differs(hzz_u, fd, rounding):
            return
        fd_half, rounding_half = quotient(0.5 * step)
        if fd_half is None or differs(fd, fd_half, 0.5 * float(fd_half.norm())) or not differs(
                hzz_u, fd_half, rounding_half):
            return
        rel = float((hzz_u - fd_half).norm()) / max(float(fd_half.norm()), 1e-300)
        raise RuntimeError(
            f"refine(hvp={self.name!r}): the decoder's second derivatives from autograd disagree with difference "
            f"quotients of its gradient (relative difference {rel:.2g} at the last inner step; the quotients at two "
            "steps agree): the decoder is not twice differentiable the way autograd assumes (a torch.compile'd "
            "function, a custom autograd.Function whose backward is once_differentiable, detaches or leaves "
            "autograd). Use "
            "hvp='fd_richardson' or 'fd_central' (first derivatives only), or an uncompiled decoder; "
            "check_decoder=False skips this check")


class JvpHvp(ExactHvp):
    """Forward-over-reverse differentiation: the decoder's gradient evaluated at the dual
    number z + u dz gives Hzz u and d/dtheta (g_z . u) as tangents, exact to rounding, in
    one pass of about twice a gradient's cost and without a second-order graph. Every op
    of the decoder needs a forward-mode derivative (cuDNN RNNs have none: those
    evaluations run without cuDNN)."""

    name = "jvp"
    second_order = staticmethod(decoder_jvp)


HVP_METHODS: dict[str, HvpMethod] = {m.name: m for m in (ForwardDifference(), CentralDifference(),
                                                         RichardsonDifference(), AdaptiveRichardson(),
                                                         ExactHvp(), JvpHvp())}
