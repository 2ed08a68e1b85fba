"""How much refine's reverse pass amplifies the gradient it backpropagates, and the
stabilisers that bound it (docs/math.md, "When the gradient through the steps explodes").

The reverse pass carries the adjoint of the inner optimiser's state S_k = (lambda_k, p_{k-1})
(``lbar`` = dF/dlambda_k and ``pbar`` = dF/dp_{k-1} with lambda_k held fixed) from S_K down
to S_0. Each reverse step multiplies it by the transposed Jacobian of one inner step, which
grows without bound where the inner SGD is unstable (inner lr times curvature above
2 (1 + momentum)): the exact gradient then grows like rho^K and is dominated by the unstable
directions. :class:`ReverseMonitor` measures that growth on the backpropagated gradient
dF/dlambda_k (the momentum's adjoint follows it: it is a decaying sum of past lbar; where the
decoder is flat it settles at (m alpha / (1 - m)) |lbar| without any growth of lbar, so it is
left out of the measure) at the cost of a few reductions of [B, D] tensors per reverse step,
and clips it:

* ``backward_clip`` = A, ``backward_clip_scope="example"``: after every reverse step each
  example's adjoint (lbar and pbar alike) is scaled so that |dF/dlambda_k,b| is at most A times
  its incoming norm |dF/dlambda_K,b|: no example's backpropagated gradient grows by more than
  A (a bound relative to the gradient that arrives, so it does not depend on the loss's scale;
  an example whose gradient stays below it is not touched, and where none reaches it the
  gradient is bit-identical to the exact one);
* ``backward_clip_scope="batch"``: the same for the whole batch's norm;
* ``backward_clip_mode="stop"`` (refine's default) instead of ``"scale"``: an example whose
  gradient passes the bound is clipped to it and propagated no further: that gradient is what
  it gives dF/dlambda_0, the earlier steps taken as the identity (truncation, for that example,
  at the step where it started to explode), and it adds nothing more to dF/dtheta.

The reverse pass is linear in the adjoint, so clipping it rescales what the remaining
(earlier) steps contribute to dF/dtheta and dF/dlambda_0, never a difference quotient: the
decoder's second-order terms are still evaluated along the clipped direction, with steps
sized for it. Truncation (``backward_steps``) is in :func:`savae_fast.refine.function.reverse_pass`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CLIP_SCOPES = ("example", "batch")
CLIP_MODES = ("stop", "scale")
# A backpropagated vector that grows by more than this over the reverse pass (while refine
# does not clip it below) is reported once: a stable inner loop shrinks it or grows it a few
# times at most (heavy-ball transients); measured on PTB training in docs/math.md.
EXPLODING_GAIN = 1e3


@dataclass
class RefineStats:
    """Amplification of the gradient backpropagated through refine's inner steps, filled by the
    backward pass of a refine call that was given this object (``refine(..., stats=stats)``).

    The backpropagated gradient of reverse step k is dF/dlambda_k = (dF/dmu_k, dF/dlogvar_k);
    its norm per example and over the batch is measured after every reverse step. All tensors
    stay on the device until read (:meth:`summary` reads them in one transfer). Construct it empty;
    each field below is an attribute the backward sets.

    Args:
        gain: ``[B]`` float64, per example: |dF/dlambda_0| over |dF/dlambda_K| (what the encoder
            receives over what arrives), as the exact reverse pass would make it (the product of
            every step's growth, measured before any ``backward_clip``; exact for examples the
            inner clip does not couple).
        max_step_gain: ``[B]``: the largest growth of one reverse step, per example.
        batch_gain, batch_max_step_gain: ``[]``: the same over the whole batch.
        clip_factor: ``[B]``: what ``backward_clip`` multiplied each example's gradient by, in all
            (1 where it never engaged; with ``backward_clip_mode="stop"`` the factor of the gradient
            set aside where the example stopped); None without ``backward_clip``.
        steps: the reverse steps taken (``backward_steps`` or K).
        backwards: how many backward passes have filled this object (the last one's values are kept).

    Example:
        >>> import torch, savae_fast as sf
        >>> dec = torch.nn.Linear(4, 6)
        >>> x = torch.randn(8, 6)
        >>> stats = sf.RefineStats()
        >>> mu = torch.zeros(8, 4, requires_grad=True)
        >>> mu_k, lv_k = sf.refine(mu, torch.zeros(8, 4), lambda z: ((dec(z) - x) ** 2).sum(1), dec.parameters(),
        ...                        steps=5, stats=stats)
        >>> (mu_k ** 2).sum().backward()
        >>> sorted(stats.summary())
        ['backward_clip_engaged', 'gain_batch', 'gain_max', 'gain_median', 'max_step_gain']
    """

    gain: Tensor | None = None
    max_step_gain: Tensor | None = None
    batch_gain: Tensor | None = None
    batch_max_step_gain: Tensor | None = None
    clip_factor: Tensor | None = None
    steps: int = 0
    backwards: int = 0

    def summary(self) -> dict[str, float]:
        """Floats for a training log (one host read): the batch's gain, the median and largest
        example gain, the largest one-step growth and the fraction of examples the backward clip
        engaged on (0 without it). Empty before the first backward."""
        if self.gain is None:
            return {}
        clipped = ((self.clip_factor < 1).double().mean() if self.clip_factor is not None
                   else self.gain.new_zeros(()))
        values = torch.stack([self.batch_gain, self.gain.median(), self.gain.max(), self.batch_max_step_gain,
                              clipped]).tolist()
        return dict(zip(("gain_batch", "gain_median", "gain_max", "max_step_gain", "backward_clip_engaged"), values))


@dataclass
class ReverseMonitor:
    """The norms of one reverse pass's state adjoint, step by step: statistics and clipping."""

    clip: float  # A (0: no clip)
    per_example: bool
    stop: bool = False  # backward_clip_mode="stop": a row past A is clipped, set aside and propagated no further
    frozen: list | None = None  # stop: the gradients set aside, [dF/dmu, dF/dlogvar] of the stopped rows
    process_group: object = None
    global_batch: int = 0
    limit_sq: Tensor | None = None  # the clip's squared limit: [B] per example, [] for the batch's sum
    prev_sq: Tensor | None = None
    prev_batch_sq: Tensor | None = None
    log_gain: Tensor | None = None
    max_step: Tensor | None = None
    log_batch_gain: Tensor | None = None
    batch_max_step: Tensor | None = None
    log_clip: Tensor | None = None
    steps: int = 0
    records: bool = True

    @classmethod
    def start(cls, cfg, lbar_mu: Tensor, lbar_logvar: Tensor, records: bool) -> "ReverseMonitor | None":
        """Before the first reverse step, from dF/dlambda_K (the momentum's adjoint is 0 there);
        None where neither statistics nor a clip are asked for."""
        if not records and not cfg.backward_clip > 0:
            return None
        mon = cls(clip=cfg.backward_clip, per_example=cfg.backward_clip_scope == "example",
                  stop=cfg.backward_clip_mode == "stop", process_group=cfg.process_group,
                  global_batch=cfg.global_batch, records=records)
        sq = _row_sq(lbar_mu, lbar_logvar)
        batch_sq = mon._batch_sum(sq)
        mon.prev_sq, mon.prev_batch_sq = sq, batch_sq
        if mon.clip > 0:
            # per example: A times the example's own incoming norm; batch: A times the batch's
            mon.limit_sq = (mon.clip ** 2) * (sq if mon.per_example else batch_sq)
            mon.log_clip = torch.zeros_like(sq)
        if records:
            mon.log_gain = torch.zeros_like(sq)
            mon.max_step = torch.zeros_like(sq)
            mon.log_batch_gain = sq.new_zeros(())
            mon.batch_max_step = sq.new_zeros(())
        return mon

    def _batch_sum(self, sq: Tensor) -> Tensor:
        total = sq.sum()
        if self.process_group is not None:
            from savae_fast.refine.distributed import all_reduce_sum

            total = all_reduce_sum(total, self.process_group)
        return total

    def after_step(self, lbar_mu: Tensor, lbar_logvar: Tensor, pbar_mu: Tensor, pbar_logvar: Tensor):
        """After a reverse step: record its growth, then clip; returns the four adjoints (the
        same tensors where the clip is off, scaled copies where it is on)."""
        self.steps += 1
        sq = _row_sq(lbar_mu, lbar_logvar)
        batch_sq = self._batch_sum(sq) if (self.records or not self.per_example) else None
        if self.records:
            step = _ratio(sq, self.prev_sq)
            self.log_gain += torch.log(step)
            torch.maximum(self.max_step, step, out=self.max_step)
            batch_step = _ratio(batch_sq, self.prev_batch_sq)
            self.log_batch_gain += torch.log(batch_step)
            torch.maximum(self.batch_max_step, batch_step, out=self.batch_max_step)
        if self.clip > 0:
            if self.per_example:
                factor = torch.where(sq > self.limit_sq, torch.sqrt(self.limit_sq / sq.clamp_min(_TINY)), 1.0)
            else:
                factor = torch.where(batch_sq > self.limit_sq, torch.sqrt(self.limit_sq / batch_sq.clamp_min(_TINY)),
                                     1.0).expand_as(sq)
            self.log_clip += torch.log(factor)
            if self.stop:
                # rows past the bound: their clipped gradient is set aside as dF/dlambda_0 (the earlier
                # steps taken as the identity, as truncation does) and their adjoint is zero from here
                over = factor < 1
                aside = torch.where(over, factor, 0.0).to(lbar_mu.dtype).unsqueeze(1)
                if self.frozen is None:
                    self.frozen = [lbar_mu * aside, lbar_logvar * aside]
                else:
                    self.frozen[0] += lbar_mu * aside
                    self.frozen[1] += lbar_logvar * aside
                factor = torch.where(over, 0.0, 1.0)
            # x * 1.0 is x exactly: where the clip does not engage the gradient is the exact one
            row = factor.to(lbar_mu.dtype).unsqueeze(1)
            lbar_mu, lbar_logvar, pbar_mu, pbar_logvar = (lbar_mu * row, lbar_logvar * row, pbar_mu * row,
                                                          pbar_logvar * row)
            sq = sq * factor.square()
            if batch_sq is not None:
                batch_sq = self._batch_sum(sq) if self.per_example else batch_sq * factor[0].square()
        self.prev_sq, self.prev_batch_sq = sq, batch_sq
        return lbar_mu, lbar_logvar, pbar_mu, pbar_logvar

    def finish(self, lbar_mu: Tensor, lbar_logvar: Tensor) -> tuple[Tensor, Tensor]:
        """dF/dlambda at the end of the reverse pass, with the stopped rows' gradients put back."""
        if self.frozen is None:
            return lbar_mu, lbar_logvar
        return lbar_mu + self.frozen[0], lbar_logvar + self.frozen[1]

    def fill(self, stats: RefineStats | None) -> None:
        if stats is None or not self.records:
            return
        stats.gain = torch.exp(self.log_gain)
        stats.max_step_gain = self.max_step
        stats.batch_gain = torch.exp(self.log_batch_gain)
        stats.batch_max_step_gain = self.batch_max_step
        stats.clip_factor = torch.exp(self.log_clip) if self.log_clip is not None else None
        stats.steps = self.steps
        stats.backwards += 1

    def exploding(self) -> tuple[float, float] | None:
        """(largest example gain, batch gain) of the exact reverse pass where it grew beyond
        EXPLODING_GAIN; one host read (reverse_pass asks only where no clip bounds it below that)."""
        if not self.records or self.steps == 0:
            return None
        gain, batch_gain = torch.exp(torch.stack([self.log_gain.max(), self.log_batch_gain])).tolist()
        return (gain, batch_gain) if gain > EXPLODING_GAIN else None


_TINY = torch.finfo(torch.float64).tiny


def _row_sq(*tensors: Tensor) -> Tensor:
    """Per-row squared norm over the tensors ([B], float64: float32 squares overflow at 1.8e19)."""
    total = None
    for t in tensors:
        sq = torch.linalg.vector_norm(t, dim=1, dtype=torch.float64).square()
        total = sq if total is None else total + sq
    return total


def _ratio(sq: Tensor, prev_sq: Tensor) -> Tensor:
    """|new| / |old| from squared norms; 1 where the row had no gradient (nothing of its own to
    grow: a stopped row, or one the outer loss does not reach, that the inner clip's coupling
    gives a gradient)."""
    return torch.where(prev_sq > 0, torch.sqrt(sq / prev_sq.clamp_min(_TINY)), 1.0)


_warned_exploding = False


def warn_exploding(gain: float, batch_gain: float, steps: int) -> None:
    """Once per process: the exact gradient through the inner steps is exploding."""
    global _warned_exploding
    if _warned_exploding:
        return
    _warned_exploding = True
    import warnings

    warnings.warn(
        f"refine: the gradient backpropagated through the {steps} inner steps grew by up to {gain:.3g}x for one "
        f"example ({batch_gain:.3g}x for the batch): the inner SGD is unstable for some examples (inner lr times "
        "the decoder's curvature above 2 (1 + momentum)), and the exact gradient through it is dominated by "
        "those directions; training with it diverges. Bound it with backward_clip= (e.g. 1: no example's "
        "backpropagated gradient grows beyond its incoming norm), backward_steps= (truncation), or a smaller inner "
        "lr; refine(stats=savae_fast.RefineStats()) measures it every step", RuntimeWarning, stacklevel=2)
