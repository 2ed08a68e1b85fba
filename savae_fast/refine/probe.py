"""What refine must know about a decoder, found at its first call, and the decoder state it replays.

refine's backward evaluates ``nll_fn`` again at the forward's points and at points near
them, and it differentiates per example. That is right for a decoder that is a pure
function of ``z`` and its parameters, applied to independent examples. The first decoder
call of a differentiable refine call runs under :class:`DecoderProbe`, a dispatch mode
that looks at every operator of that call (its forward only: one Python hook per
operator, once per refine call) and finds

* whether it draws random numbers (operators tagged ``nondeterministic_seeded``), and
  whether from a generator of its own, which refine cannot replay (an error);
* whether it couples the examples of the batch: batch normalisation in training mode
  over more than one example (the difference steps are then shared by the batch);
* which tensors that existed before the call it writes in place: running statistics,
  a power iteration's vectors (``spectral_norm``), counters. Their values are saved before
  every forward step and put back before the backward evaluates that step again (as the
  random-number state is), so the decoder sees in the backward what it saw in the forward
  and ends in the state K plain calls leave. Writing into a tensor that requires grad
  (a parameter) is an error, as it would be for autograd.

A decoder can couple examples in ways no operator shows (a mean over the batch written
out): refine's ``batch_coupled=True`` says so. Other threads' operators are not seen
(dispatch modes are per thread).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from savae_fast.nn import in_replayable_draw

_SEEDED = torch.Tag.nondeterministic_seeded
_argument_info: dict = {}


def _storage_key(t: Tensor):
    """Identity of a tensor's storage (0: none to speak of: empty, meta or without data)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return 0


def _info(func):
    """(argument names, indices of the arguments the schema writes, whether the outputs are fresh)."""
    info = _argument_info.get(func)
    if info is None:
        schema = func._schema
        names = [a.name for a in schema.arguments]
        written = tuple(i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write)
        fresh = all(r.alias_info is None for r in schema.returns)
        info = _argument_info[func] = (names, written, fresh)
    return info


def _argument(names, args, kwargs, name, default=None):
    if name in kwargs:
        return kwargs[name]
    if name in names:
        i = names.index(name)
        if i < len(args):
            return args[i]
    return default


def _is_random_call(func, names, args, kwargs) -> bool:
    """Whether this call of a ``nondeterministic_seeded`` operator draws: RNNs and dropout
    take a probability and ``train`` and draw only with both."""
    prob = _argument(names, args, kwargs, "dropout", _argument(names, args, kwargs, "p"))
    train = _argument(names, args, kwargs, "train", None)
    if prob is None or "train" not in names:
        return True
    return train is not False and prob > 0


def _tensors(value):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, Tensor):
                yield v


class DecoderProbe(TorchDispatchMode):
    """Runs one decoder call and notes what refine must know about the decoder (module
    docstring). ``params``: the tensors refine differentiates; ``z``: refine's input to
    the call (the decoder may write into it)."""

    def __init__(self, params: Sequence[Tensor]):
        super().__init__()
        self.params = {_storage_key(p): i for i, p in enumerate(params) if _storage_key(p)}
        self.created: set = set()  # storages made during the call (z included)
        self.draws = False
        self.own_generator: str | None = None  # an operator drawing from a generator of the decoder's own
        self.unstackable_draw: str | None = None  # a draw outside savae_fast.nn.Dropout (stacked calls)
        self.coupling: str | None = None  # an operator that couples the examples
        self.batch_statistics: str | None = None  # batch norm in training mode (even over one example)
        self.written: dict = {}  # storage -> (base tensor, its values before the call)
        self.refused: str | None = None  # why refine cannot differentiate this decoder
        self.read: dict = {}  # storage -> (weak reference, version, description): tensors the call read

    def run(self, nll_fn: Callable, z: Tensor):
        self.created.add(_storage_key(z))
        with self:
            return nll_fn(z)

    def _note_write(self, t: Tensor, op: str) -> None:
        key = _storage_key(t)
        if not key or key in self.created or key in self.written:
            return
        if key in self.params or t.requires_grad:
            if self.refused is None:
                which = (f"params[{self.params[key]}] (shape {list(t.shape)})" if key in self.params
                         else f"a tensor that requires grad (shape {list(t.shape)})")
                self.refused = (f"nll_fn writes in place into {which} ({op}): refine differentiates with respect to "
                                "it and evaluates nll_fn again in its backward, where the tensor would have "
                                "other values (autograd refuses this too)")
            return
        base = t if t._base is None else t._base
        self.written[key] = (base, base.detach().clone())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        names, written, fresh = _info(func)
        op = str(func.overloadpacket.__name__)
        if _SEEDED in func.tags and _is_random_call(func, names, args, kwargs):
            self.draws = True
            if _argument(names, args, kwargs, "generator") is not None and self.own_generator is None:
                self.own_generator = f"aten.{op}"
            if self.unstackable_draw is None and not in_replayable_draw():
                self.unstackable_draw = f"aten.{op}"
        for i in written:
            value = args[i] if i < len(args) else kwargs.get(names[i])
            for t in _tensors(value):
                self._note_write(t, f"aten.{op}")
        for name, value in kwargs.items():  # out= arguments given by keyword
            if name in names and names.index(name) in written:
                continue
            if name == "out":
                for t in _tensors(value):
                    self._note_write(t, f"aten.{op}")
        if "batch_norm" in op:  # schemas of most batch-norm operators do not mark the running stats written
            training = _argument(names, args, kwargs, "training", op.startswith("_batch_norm_with_update"))
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if training:
                self.batch_statistics = self.batch_statistics or f"aten.{op} in training mode (batch statistics)"
                if x is not None and x.dim() > 0 and x.shape[0] > 1 and self.coupling is None:
                    self.coupling = f"aten.{op} in training mode (batch statistics)"
                for name in ("running_mean", "running_var"):
                    stat = _argument(names, args, kwargs, name)
                    if isinstance(stat, Tensor):
                        self._note_write(stat, f"aten.{op}")
        for value in (*args, *kwargs.values()):
            for t in _tensors(value):
                self._note_read(t)
        out = func(*args, **kwargs)
        if fresh:
            for t in _tensors(out):
                key = _storage_key(t)
                if key:
                    self.created.add(key)
        return out

    def _note_read(self, t: Tensor) -> None:
        """A tensor that existed before the call (data the decoder closes over, buffers): its version
        now, so that a change in place before refine's backward replays the decoder is found."""
        key = _storage_key(t)
        if not key or key in self.created or key in self.params or key in self.read:
            return
        try:
            ref = weakref.ref(t)
        except TypeError:
            return
        self.read[key] = (ref, t._version, f"shape {list(t.shape)}, {t.dtype}")

    def read_versions(self) -> list:
        """(weak reference, version, description) of each tensor read and not written by the decoder."""
        return [entry for key, entry in self.read.items() if key not in self.written]

    def check_stackable(self) -> None:
        """Raise where the decoder's random draws would differ between the points of a stacked call."""
        if self.unstackable_draw:
            raise RuntimeError(
                f"refine: stack_points evaluates an example's difference points in one decoder call, and nll_fn "
                f"draws random numbers outside savae_fast.nn.Dropout ({self.unstackable_draw}: nn.Dropout, "
                "F.dropout, the inter-layer dropout of nn.LSTM(dropout=p), ...), which would give each point of "
                "an example other random numbers and make the difference quotients noise. Use "
                "savae_fast.nn.Dropout in place of nn.Dropout (one mask per example in stacked calls, nn.Dropout "
                "elsewhere), put the decoder in eval mode, or pass stack_points=False")

    def check(self) -> None:
        """Raise for what refine cannot differentiate (after the call)."""
        if self.refused:
            raise RuntimeError(f"refine: {self.refused}. Keep the parameters fixed during nll_fn (update them "
                               "outside refine, e.g. in the optimiser step)")
        if self.own_generator:
            raise RuntimeError(
                f"refine: nll_fn draws random numbers from a torch.Generator of its own ({self.own_generator} "
                "with generator=...). refine's backward replays each step's random numbers (dropout masks) by "
                "restoring the default generators, and cannot replay another generator: draw from the default "
                "generator (nn.Dropout, F.dropout without generator=), or pass preserve_rng_state=False only if "
                "the decoder's draws need not match between the forward and the backward (they must for the "
                "difference quotients)")


class DecoderState:
    """The tensors a decoder writes in place (found by DecoderProbe) and their values before
    every forward step, put back before the backward evaluates that step again."""

    def __init__(self, written: dict):
        self.bases = [base for base, _ in written.values()]
        self.steps = [[before for _, before in written.values()]]  # step 0: before the probed call

    def snapshot(self) -> None:
        """The values before the next forward step."""
        self.steps.append([b.detach().clone() for b in self.bases])

    def current(self) -> list:
        return [b.detach().clone() for b in self.bases]

    def restore(self, values: list) -> None:
        # through .data: the tensors get back values they had, without a version-counter bump
        # (autograd graphs that saved them are not invalidated by the replay)
        with torch.no_grad():
            for b, v in zip(self.bases, values):
                b.data.copy_(v)

    def restore_step(self, k: int) -> None:
        self.restore(self.steps[k])


@contextlib.contextmanager
def suspended_tensor_hooks(tensors: Sequence[Tensor]):
    """The hooks registered with Tensor.register_hook on these tensors do not fire inside the
    block (refine's own gradient computations); they are back on exit, in order, with their
    handles. Other threads' backward passes through the tensors meanwhile skip them too."""
    saved = []
    try:
        for t in tensors:
            hooks = t._backward_hooks
            if hooks:
                saved.append((hooks, list(hooks.items())))
                hooks.clear()
        yield
    finally:
        for hooks, items in saved:
            hooks.update(items)


def check_read_unchanged(read: list) -> None:
    """Raise where a tensor the decoder read in the forward was changed in place since: the
    backward evaluates the decoder again and would see other values."""
    for ref, version, what in read:
        t = ref()
        if t is not None and t._version != version:
            raise RuntimeError(
                f"refine: a tensor that nll_fn reads ({what}) was modified in place after refine's forward "
                f"(its version {version} -> {t._version}; e.g. the next batch loaded into the same buffer): "
                "refine's backward evaluates nll_fn again and would see the new values. Autograd refuses the "
                "same ('one of the variables needed for gradient computation has been modified by an inplace "
                "operation'): keep it unchanged until the backward, or write the new values into another tensor")


def hooked(tensors: Sequence[Tensor]) -> list:
    """The tensors that have hooks registered with Tensor.register_hook."""
    return [t for t in tensors if t._backward_hooks]
