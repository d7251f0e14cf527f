"""Loss scalers: ``NoOpLossScaler``, ``StaticLossScaler`` and ``DynamicLossScaler``.

Loss scaling (the mixed-precision paper's second trick) multiplies the loss by ``S`` before
``backward()`` so small gradients survive a narrow format (fp16 flushes everything below 2^-24),
then divides the gradients by ``S`` before the optimizer sees them. A dynamic scaler picks ``S``
on the fly: halve it when the gradients overflow (and skip that step), double it after
``growth_interval`` clean steps.

The API is a superset of :class:`torch.amp.GradScaler`::

    scaler = DynamicLossScaler()
    for x, y in data:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)                      # optional: clip unscaled gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)                          # skipped if gradients overflowed
        scaler.update()
        if not scaler.last_step_skipped:
            lr_scheduler.step()

With torch's arguments (``max_scale=None``, ``min_scale=None``, ``hysteresis=1``) the scale
trajectory and the skipped steps are identical to ``torch.amp.GradScaler``'s for the same
gradients (same float32 scale arithmetic, same fp64 reciprocal, same fused kernel) as long as
the scale stays above :data:`SCALE_FLOOR` (2**-126, where torch would go on to 0).

Additions: a floor and a ceiling on the scale, hysteresis (back off only after ``hysteresis``
overflows in a row), an observable record of skipped steps (:attr:`last_step_skipped`,
:attr:`skipped_steps`, an ``on_skip`` callback), a warning naming the parameters whose gradients
overflowed when the scale collapses to ``min_scale``, an all-reduce of the overflow flag when
``torch.distributed`` is initialised (every rank skips the same steps, also with sharded
gradients as in FSDP), and divergence detection: a NaN/inf *loss* is not an overflow that
scaling could cure (the loss is computed before it is scaled), so when it persists -- at a scale
of at most 1, or in ``max_nonfinite_losses`` skipped iterations in a row whatever the scale -- it
raises :class:`DivergenceError` (after skipping the step; ``on_divergence="warn"`` or
``"ignore"`` to carry on). The scale never drops below float32's smallest normal number
(:data:`SCALE_FLOOR`), so it cannot underflow to 0 and turn the next clean gradients into NaN.

Optimizers that declare ``_step_supports_amp_scaling`` (torch's fused Adam/AdamW/SGD, custom
ones) get torch's contract: ``step`` checks the still-scaled gradients without unscaling them and
hands the optimizer ``optimizer.grad_scale`` and ``optimizer.found_inf`` (or itself as
``grad_scaler=`` when ``step`` takes that keyword); the optimizer unscales and skips by itself.

For code that manages gradients itself (``mixprec.amp``'s ``scale_loss``) the same machine is
public one level down: :meth:`LossScaler.unscale_grads_` (unscale given tensors on behalf of an
optimizer), :meth:`LossScaler.read_found_infs` (several optimizers' flags in one sync and one
all-reduce), :meth:`LossScaler.inv_scale` and :meth:`LossScaler.stage`.

Cost per iteration: ``scale`` is one multiply (plus a tiny finiteness flag of the loss, no sync);
``unscale_`` is one fused pass over the gradients
(``torch._amp_foreach_non_finite_check_and_unscale_`` where available: one read and one write
per element, no sync) and, when distributed, one
all-reduce of a scalar; ``step`` reads the overflow flag back (one device sync, as torch does).
``update`` is Python arithmetic on the already-synced flags.
"""

from __future__ import annotations

import functools
import inspect
import math
import struct
import warnings
from collections import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

import torch
from torch.utils._pytree import tree_map

from mixprec.amp.overflow import NameSource, ParamNames, all_reduce_max_, check_and_unscale_

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

try:  # reuse torch's enum so code that inspects the stage works with either scaler
    from torch.amp.grad_scaler import OptState
except ImportError:  # pragma: no cover - very old torch
    from enum import Enum

    class OptState(Enum):  # type: ignore[no-redef]
        READY = 0
        UNSCALED = 1
        STEPPED = 2


DivergenceMode = Literal["raise", "warn", "ignore"]
DIVERGENCE_MODES: tuple[DivergenceMode, ...] = ("raise", "warn", "ignore")
_MAX_NAMES = 8  # offending parameter names shown in one message
#: The lowest scale any scaler reaches: float32's smallest normal number. Its float32 reciprocal
#: (2**126) is finite, so unscaling never multiplies by inf (a scale of 0 would make the next
#: clean iteration's gradients 0 * inf = NaN).
SCALE_FLOOR = 2.0**-126


class DivergenceError(FloatingPointError):
    """The loss itself stayed NaN/inf: a divergence, not an overflow that scaling can cure.

    Raised by ``update()`` after the step was skipped and the scaler's state advanced, when the
    loss was non-finite at a loss scale of at most 1 or in ``max_nonfinite_losses`` skipped
    iterations in a row. The message says whether the parameters are still finite (then
    training can resume, e.g. with a lower LR) or already hold NaN/inf (an earlier step broke
    them: resume from a checkpoint).
    """


class LossScaleCollapseWarning(RuntimeWarning):
    """The loss scale hit its floor (``min_scale``) and the gradients still overflow."""


@dataclass(frozen=True)
class SkippedStep:
    """What an ``on_skip`` callback receives when an iteration's gradients overflowed.

    Attributes:
        iteration: index of the iteration (number of ``update()`` calls before this one).
        scale: the loss scale the overflowing gradients were computed with.
        new_scale: the scale for the next iteration.
        consecutive: overflowing iterations in a row, this one included.
        skipped_steps: total skipped iterations so far, this one included.
        optimizers: ids of the optimizers whose ``step`` was skipped.
    """

    iteration: int
    scale: float
    new_scale: float
    consecutive: int
    skipped_steps: int
    optimizers: tuple[int, ...] = ()


class ScalerKeywords(TypedDict, total=False):
    """Keywords every scaler accepts besides its scale (see :class:`LossScaler`)."""

    on_skip: Callable[[SkippedStep], object] | None
    on_divergence: DivergenceMode
    max_nonfinite_losses: int
    distributed: bool | None
    process_group: ProcessGroup | None


class CheckedScalerKeywords(ScalerKeywords, total=False):
    check_finite: bool


@dataclass
class _OptRecord:
    """Per-optimizer bookkeeping for one iteration (torch's ``_per_optimizer_states`` entry)."""

    stage: OptState = OptState.READY
    found_inf: torch.Tensor | None = None  # float32 scalar: > 0 when some gradient overflowed
    reduced: bool = False  # found_inf already all-reduced across ranks (or not distributed)
    found: bool | None = None  # found_inf read back (after the sync in step/update)
    skipped: bool = False
    optimizer: Any = None  # strong ref for the iteration: offending-name lookup
    offenders: tuple[str, ...] = field(default_factory=tuple)


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32 (ties to even), as a float32 store does."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # rounds past FLT_MAX
        return math.copysign(math.inf, x)


def check_divergence_mode(value: object) -> None:
    """``ValueError`` naming the valid choices unless ``value`` is a :data:`DivergenceMode`."""
    if value not in DIVERGENCE_MODES:
        raise ValueError(
            f"on_divergence must be one of {', '.join(map(repr, DIVERGENCE_MODES))}, got {value!r}"
        )


class LossScaler:
    """Shared engine of the three scalers: state machine, unscale, skip record, callbacks.

    Subclasses decide the scale (:meth:`_next_scale`). Not meant to be instantiated directly.

    Each optimizer goes through torch.amp.GradScaler's state machine once per iteration
    (:meth:`stage` reads it)::

        READY --unscale_() / unscale_grads_()--> UNSCALED --step()--> STEPPED
        READY --step() (unscales first)----------------------------> STEPPED
        update(): the iteration ends, every optimizer is READY again

    Any other order raises ``RuntimeError`` (unscale twice, unscale after step, step twice,
    update before any optimizer was unscaled or stepped).

    Args:
        scale: initial scale (rounded to float32, as torch stores it).
        check_finite: check the gradients for NaN/inf and skip the step when found. Without
            it ``step`` just calls ``optimizer.step()`` (no gradient pass at all).
        on_skip: called with a :class:`SkippedStep` at every ``update()`` whose iteration
            overflowed (e.g. to hold back an LR scheduler or log).
        on_divergence: ``"raise"`` (default) a :class:`DivergenceError`, ``"warn"`` or
            ``"ignore"`` when the loss itself stays NaN/inf (see ``max_nonfinite_losses``).
        max_nonfinite_losses: a NaN/inf loss in this many skipped iterations in a row is a
            divergence whatever the scale (>= 1; default 16). At a scale of at most 1 one such
            iteration is enough.
        distributed: ``None`` (auto: all-reduce the overflow flag iff ``torch.distributed`` is
            initialised), ``True`` (require it) or ``False`` (never).
        process_group: the group to all-reduce over (default: the world).
    """

    def __init__(
        self,
        scale: float,
        *,
        check_finite: bool = True,
        on_skip: Callable[[SkippedStep], object] | None = None,
        on_divergence: DivergenceMode = "raise",
        max_nonfinite_losses: int = 16,
        distributed: bool | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        _check_positive("scale", scale)
        check_divergence_mode(on_divergence)
        _check_count("max_nonfinite_losses", max_nonfinite_losses)
        if on_skip is not None and not callable(on_skip):
            raise TypeError(f"on_skip must be callable or None, got {type(on_skip).__name__}")
        if distributed not in (None, True, False):
            raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
        self._scale = _f32(float(scale))
        self.check_finite = bool(check_finite)
        self.on_skip = on_skip
        self.on_divergence = on_divergence
        self.max_nonfinite_losses = max_nonfinite_losses
        self.nonfinite_losses = 0  # skipped iterations in a row whose loss was NaN/inf
        self.distributed = distributed
        self.process_group = process_group
        self._scale_tensors: dict[torch.device, torch.Tensor] = {}
        self._scaled_once = False
        # did a loss passed to scale() since the last update hold NaN/inf (bool tensor, no sync)
        self._loss_flag: torch.Tensor | None = None
        self._records: dict[int, _OptRecord] = {}
        self._names = ParamNames()
        self.iteration = 0
        self.skipped_steps = 0
        self.last_step_skipped = False
        self.consecutive_skips = 0
        self._collapse_warned = False  # one collapse warning per run of overflows

    # ------------------------------------------------------------------ properties / info
    def get_scale(self) -> float:
        """The current loss scale as a Python float (no device sync: it lives on the host)."""
        return self._scale

    @property
    def loss_scale(self) -> float:
        """Alias of :meth:`get_scale` (apex's name)."""
        return self._scale

    def inv_scale(self) -> float:
        """``1 / scale`` as the gradients are multiplied by it: the reciprocal in float64, then
        rounded to float32, as torch (a float32 division can be inexact). No device sync."""
        return _f32(1.0 / self._scale) if self._scale != 0 else math.inf

    def is_enabled(self) -> bool:
        """True when the scaler scales or checks anything (torch's name)."""
        return True

    def stage(self, optimizer: object) -> OptState:
        """Where ``optimizer`` is in this iteration's state machine (``OptState.READY`` for an
        optimizer not unscaled or stepped since the last :meth:`update`)."""
        rec = self._records.get(id(optimizer))
        return OptState.READY if rec is None else rec.stage

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scale={self._scale:g}, iteration={self.iteration}, "
            f"skipped_steps={self.skipped_steps})"
        )

    def register_names(self, names: NameSource) -> None:
        """Tell the scaler parameter names for its overflow messages.

        Accepts a module (its ``named_parameters()``), a mapping or pairs ``name -> tensor``.
        Optimizers built from ``named_parameters()`` (``param_names`` in their groups) need
        nothing. Costs nothing per step.
        """
        self._names.register(names)

    # ------------------------------------------------------------------ scale
    def _scale_tensor(self, device: torch.device) -> torch.Tensor:
        t = self._scale_tensors.get(device)
        if t is None:
            t = torch.full((), self._scale, dtype=torch.float32, device=device)
            self._scale_tensors[device] = t
        return t

    def _set_scale(self, value: float) -> None:
        value = _f32(float(value))
        if value != self._scale or math.isnan(value):
            self._scale = value
            for t in self._scale_tensors.values():  # in place: no reallocation, no sync
                t.fill_(value)

    def scale(self, outputs: Any) -> Any:
        """Multiply a tensor, or every tensor in a nested list/tuple/dict (a torch pytree), by
        the scale; other iterables (a generator, say) come back as a lazy ``map``, as torch's.

        The product is ``outputs * scale`` with the scale as a float32 0-d tensor on the
        output's device, exactly as torch's GradScaler computes it. Also records, without a
        sync, whether each output is finite (for divergence reports).
        """
        self._scaled_once = True
        return tree_map(self._scale_leaf, outputs)

    def _scale_leaf(self, val: Any) -> Any:
        if isinstance(val, torch.Tensor):
            if self.check_finite:
                bad = ~torch.isfinite(val.detach()).all()
                prev = self._loss_flag
                self._loss_flag = bad if prev is None else prev | bad.to(prev.device)
            return val * self._scale_tensor(val.device)
        if isinstance(val, abc.Iterable) and not isinstance(val, (str, bytes)):
            return map(functools.partial(tree_map, self._scale_leaf), val)
        raise ValueError(
            f"outputs must be a Tensor or an iterable of Tensors, got {type(val).__name__}"
        )

    # ------------------------------------------------------------------ unscale / step
    def _record(self, optimizer: object) -> _OptRecord:
        rec = self._records.get(id(optimizer))
        if rec is None:
            rec = _OptRecord(optimizer=optimizer)
            self._records[id(optimizer)] = rec
        return rec

    def _require_scaled(self, what: str) -> None:
        if not self._scaled_once:
            raise RuntimeError(
                f"{what} called before scaler.scale(loss): the gradients were not scaled. "
                "Call scaler.scale(loss).backward() earlier in the iteration."
            )

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale, in place, and check them for NaN/inf.

        Optional: :meth:`step` does it if you did not. Call it once per optimizer per iteration,
        after all gradients are accumulated (e.g. before ``clip_grad_norm_``). Errors
        (``RuntimeError``) if called twice in one iteration or after :meth:`step`.
        Cost: one fused read+write pass over the gradients, no device sync; with
        ``torch.distributed`` initialised one all-reduce (MAX) of a scalar.
        """
        self.unscale_grads_(optimizer)

    def unscale_grads_(
        self,
        optimizer: object,
        grads: Iterable[torch.Tensor] | None = None,
        *,
        all_reduce: bool = True,
    ) -> torch.Tensor | None:
        """Unscale and check gradients on behalf of ``optimizer``: its stage goes READY ->
        UNSCALED (``RuntimeError`` from any other stage) and its overflow flag is kept for
        :meth:`step`, :meth:`read_found_infs` and :meth:`update`.

        ``grads=None`` takes the optimizer's ``.grad`` tensors (what :meth:`unscale_` does:
        float16 gradients are refused, sparse ones unscaled through their values). Given
        ``grads`` (dense tensors, any devices and dtypes, also float16: the caller owns the
        precision) are unscaled instead: the gradients the optimizer will see, e.g. new ones a
        caller accumulates itself. ``all_reduce=False`` leaves the flag local, so that
        :meth:`read_found_infs` agrees on several optimizers' flags in one collective.

        Returns ``found_inf`` (a float32 0-d tensor, > 0 when some gradient held NaN/inf), or
        None when ``check_finite`` is off. Cost: one fused read+write pass over the gradients,
        no device sync; with ``all_reduce`` and ``torch.distributed`` initialised one
        all-reduce (MAX) of a scalar.
        """
        self._require_scaled("unscale_()")
        rec = self._record(optimizer)
        if rec.stage is OptState.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update()."
            )
        if rec.stage is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        home = next(iter(self._scale_tensors), None)
        with torch.no_grad():  # gradients built with create_graph=True stay out of the graph
            if grads is None:
                grads = self._optimizer_grads(optimizer)
            rec.found_inf = check_and_unscale_(
                grads, self.inv_scale(), check=self.check_finite, home=home
            )
        if rec.found_inf is not None and all_reduce:
            all_reduce_max_(rec.found_inf, self.distributed, self.process_group)
            rec.reduced = True
        rec.stage = OptState.UNSCALED
        return rec.found_inf

    def _optimizer_grads(self, optimizer: Any, *, unscale: bool = True) -> list[torch.Tensor]:
        """The tensors to unscale (or, ``unscale=False``, only check) for an optimizer's
        ``.grad``s (none when there is nothing to do: scale 1 and no check, so a no-op scaler
        never touches the gradients)."""
        unscale = unscale and self._scale != 1.0
        if not self.check_finite and not unscale:
            return []
        return _grads_of(optimizer, self._scale if unscale else None)

    def read_found_infs(self, optimizers: Sequence[object]) -> list[bool]:
        """Whether each optimizer's gradients held NaN/inf in this iteration (each one unscaled
        already: ``RuntimeError`` for an optimizer still READY).

        Cost: one device sync for all of them (none without ``check_finite`` or when every
        flag was read before), preceded by one all-reduce (MAX) of the flags that
        ``unscale_grads_(..., all_reduce=False)`` left local.
        """
        records = []
        for opt in optimizers:
            rec = self._records.get(id(opt))
            if rec is None or rec.stage is OptState.READY:
                raise RuntimeError(
                    f"read_found_infs: {type(opt).__name__} was not unscaled in this "
                    "iteration; call unscale_() or unscale_grads_() for it first"
                )
            records.append(rec)
        return self._read_flags(records)

    def _read_flags(self, records: Sequence[_OptRecord]) -> list[bool]:
        if not self.check_finite:
            return [False] * len(records)
        todo = [r for r in records if r.found is None and r.found_inf is not None]
        if todo:
            home = todo[0].found_inf.device  # type: ignore[union-attr]
            flags = (
                todo[0].found_inf
                if len(todo) == 1
                else torch.stack([r.found_inf.to(home) for r in todo])  # type: ignore[union-attr]
            )
            if not all(r.reduced for r in todo):
                all_reduce_max_(flags, self.distributed, self.process_group)
            for rec, value in zip(todo, flags.reshape(-1).tolist(), strict=True):
                rec.found, rec.reduced = bool(value), True
        return [bool(r.found) for r in records]

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (unless :meth:`unscale_` was called) and run ``optimizer.step(*args,
        **kwargs)`` unless the gradients hold NaN/inf; returns its return value (None if
        skipped).

        ``RuntimeError`` if called twice for one optimizer before :meth:`update`, or with a
        ``closure`` (a closure would re-run backward on unscaled losses). Cost: one device sync
        (reading the overflow flag), as in torch.
        """
        if "closure" in kwargs or (args and callable(args[0])):
            raise RuntimeError(
                "Closure use is not supported by mixprec loss scalers (the closure would "
                "recompute unscaled gradients); call scaler.scale(loss).backward() yourself."
            )
        rec = self._record(optimizer)
        if rec.stage is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            retval = self._step_amp_aware(optimizer, rec, args, kwargs)
            rec.stage = OptState.STEPPED
            return retval
        if rec.stage is OptState.READY:
            self.unscale_(optimizer)
        retval = None
        if self._read_flags([rec])[0]:
            rec.skipped = True
            if self._wants_names():
                rec.offenders = self._names.offenders(optimizer)
        else:
            retval = optimizer.step(*args, **kwargs)
        rec.stage = OptState.STEPPED
        return retval

    def _step_amp_aware(
        self, optimizer: Any, rec: _OptRecord, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """torch.amp.GradScaler's contract for an optimizer that unscales and skips by itself
        (``_step_supports_amp_scaling``): gradients not unscaled yet are only checked, and the
        optimizer reads ``grad_scale`` (None when already unscaled) and ``found_inf`` during
        its ``step``. No device sync here: ``update`` reads the flag."""
        if "grad_scaler" in inspect.signature(optimizer.step).parameters:
            raise TypeError(
                f"{type(optimizer).__name__}.step takes grad_scaler=, torch's deprecated "
                "contract, which mixprec scalers do not implement; read optimizer.grad_scale "
                "and optimizer.found_inf in step() instead (torch's current contract)"
            )
        if rec.stage is OptState.READY:
            self._check_only(optimizer, rec)
        home = next(iter(self._scale_tensors), torch.device("cpu"))
        scale = None if rec.stage is OptState.UNSCALED else self._scale_tensor(home)
        return _step_with_scale(optimizer, scale, rec.found_inf, home, args, kwargs)

    def _check_only(self, optimizer: Any, rec: _OptRecord) -> None:
        """Flag NaN/inf in the optimizer's still-scaled gradients (float16 ones too: nothing is
        divided) and all-reduce the flag. Cost: one fused read+write pass (a multiply by 1)."""
        self._require_scaled("step()")
        home = next(iter(self._scale_tensors), None)
        with torch.no_grad():
            grads = self._optimizer_grads(optimizer, unscale=False)
            rec.found_inf = check_and_unscale_(grads, 1.0, check=self.check_finite, home=home)
        if rec.found_inf is not None:
            all_reduce_max_(rec.found_inf, self.distributed, self.process_group)
            rec.reduced = True

    # ------------------------------------------------------------------ update
    def update(self, new_scale: float | torch.Tensor | None = None, *, stacklevel: int = 1) -> None:
        """End the iteration: adapt the scale to whether any gradient overflowed and record it;
        every optimizer is READY again.

        ``new_scale`` sets the scale by hand instead (as torch: the growth tracker is kept).
        Call it once per iteration, after :meth:`step` (or :meth:`unscale_grads_`) for every
        optimizer. ``RuntimeError`` if no optimizer was unscaled or stepped since the last
        update. Raises :class:`DivergenceError` (after the state has advanced) when the loss
        itself was NaN/inf at a scale of at most 1 and ``on_divergence == "raise"``.
        ``stacklevel``: which frame its warnings point at, 1 being the caller of ``update``
        (wrappers pass more). Cost: one device sync for flags not read by :meth:`step` yet.
        """
        if not self._records:
            raise RuntimeError(
                "No inf checks were recorded prior to update(): call scaler.step(optimizer) "
                "(or scaler.unscale_(optimizer)) for each optimizer first."
            )
        records = list(self._records.values())
        found = any(self._read_flags(records))
        # frames: _end_iteration <- update <- the caller
        self._end_iteration(found, records, new_scale, stacklevel=stacklevel + 2)

    def _end_iteration(
        self,
        found: bool,
        records: Sequence[_OptRecord],
        new_scale: float | torch.Tensor | None,
        stacklevel: int,
    ) -> None:
        """Advance the scale and the skip record given the (synced) overflow flag.

        ``stacklevel`` of warnings, counted from this method (the user's frame).
        """
        used = self._scale
        if new_scale is not None:
            self._set_scale(_checked_new_scale(new_scale))
        else:
            self._set_scale(self._next_scale(found))
        loss_flag, self._loss_flag = self._loss_flag, None
        self._records = {}
        self.last_step_skipped = bool(found and self.check_finite)
        if not self.last_step_skipped:
            self.consecutive_skips = 0
            self.nonfinite_losses = 0
            self._collapse_warned = False
            self.iteration += 1
            return
        self.consecutive_skips += 1
        self.skipped_steps += 1
        # reading the loss flag syncs, but only on this rare path
        loss_bad = loss_flag is not None and bool(loss_flag)
        self.nonfinite_losses = self.nonfinite_losses + 1 if loss_bad else 0
        event = SkippedStep(
            iteration=self.iteration,
            scale=used,
            new_scale=self._scale,
            consecutive=self.consecutive_skips,
            skipped_steps=self.skipped_steps,
            optimizers=tuple(id(r.optimizer) for r in records if r.found),
        )
        self.iteration += 1
        if self.on_skip is not None:
            self.on_skip(event)
        self._report(used, records, loss_bad, stacklevel + 1)

    def _wants_names(self) -> bool:
        """Whether an overflow at the current scale will need the offending names."""
        return self._scale <= 1.0 or self._at_floor_after_backoff()

    def _at_floor_after_backoff(self) -> bool:
        return False

    def _offender_names(self, records: Sequence[_OptRecord]) -> str:
        """The parameters whose gradients overflowed, for a message (rare path: syncs)."""
        names: list[str] = []
        for rec in records:
            if not rec.found:
                continue
            offenders = rec.offenders
            if not offenders and rec.stage is OptState.UNSCALED and rec.optimizer is not None:
                offenders = self._names.offenders(rec.optimizer)
            names.extend(offenders)
        return _listed(names) or "(gradients no longer available)"

    def _report(
        self, used: float, records: Sequence[_OptRecord], loss_bad: bool, stacklevel: int
    ) -> None:
        """Divergence error / collapse warning after an overflowing iteration (rare path)."""
        persistent = used <= 1.0 or self.nonfinite_losses >= self.max_nonfinite_losses
        diverged = loss_bad and persistent and self.on_divergence != "ignore"
        collapsed = self._collapsed(used) and not self._collapse_warned
        self._collapse_warned = self._collapse_warned or collapsed
        if not diverged and not collapsed:
            return
        shown = self._offender_names(records)
        if diverged:
            broken = [
                n
                for r in records
                if r.optimizer is not None
                for n in self._names.offenders(r.optimizer, values=True)
            ]
            limit = (self.nonfinite_losses, self.max_nonfinite_losses)
            msg = _divergence_message(used, limit, broken, shown)
            if self.on_divergence == "raise":
                raise DivergenceError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
        if collapsed:
            warnings.warn(
                f"loss scale collapsed to its floor {self._floor_name()}={self._scale:g} and "
                f"gradients still overflow ({self.consecutive_skips} skipped steps in a row). "
                f"Non-finite gradients in: {shown}. These parameters' gradients exceed the "
                "format's range even unscaled: keep their layers in float32 or lower the "
                "learning rate.",
                LossScaleCollapseWarning,
                stacklevel=stacklevel,
            )

    def _collapsed(self, used: float) -> bool:
        return False

    def _floor_name(self) -> str:
        return "min_scale"

    def _next_scale(self, found: bool) -> float:
        return self._scale

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (plain Python values). Call it after :meth:`update`."""
        return {
            "kind": type(self).__name__,
            "scale": self._scale,
            "iteration": self.iteration,
            "skipped_steps": self.skipped_steps,
            "last_step_skipped": self.last_step_skipped,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (also accepts a ``torch.amp.GradScaler`` state dict)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if len(state_dict) == 0:
            raise RuntimeError(
                "The source state dict is empty, possibly because it was saved from a disabled "
                "torch GradScaler."
            )
        if "scale" not in state_dict:
            raise ValueError(f"state_dict has no 'scale' entry; keys: {sorted(state_dict)}")
        self._set_scale(float(state_dict["scale"]))
        self.iteration = int(state_dict.get("iteration", self.iteration))
        self.skipped_steps = int(state_dict.get("skipped_steps", self.skipped_steps))
        self.last_step_skipped = bool(state_dict.get("last_step_skipped", False))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))

    def __getstate__(self) -> dict[str, Any]:
        if self._records:
            raise RuntimeError(
                "A loss scaler may only be pickled at the beginning of an iteration, or at the "
                "end after update()."
            )
        state = self.__dict__.copy()
        state["_scale_tensors"] = {}
        state["_names"] = ParamNames()  # weak references do not pickle; names are re-registered
        state["_loss_flag"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _grads_of(optimizer: Any, unscale_by: float | None) -> list[torch.Tensor]:
    """The dense tensors holding an optimizer's gradients (a sparse one's values). As torch,
    ``ValueError`` for float16 gradients that are to be divided by ``unscale_by``."""
    grads = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if unscale_by is not None and g.dtype == torch.float16:
                raise ValueError(
                    "Attempting to unscale FP16 gradients: dividing them in fp16 by the scale "
                    f"{unscale_by:g} would flush small gradients to zero. Keep the optimizer's "
                    "parameters in float32 (fp32 master weights: "
                    "mixprec.initialize(..., opt_level='O2'))."
                )
            if g.is_sparse:
                if g.dtype is torch.float16:  # duplicates could overflow when summed
                    p.grad = g = g.coalesce()
                g = g._values()
            grads.append(g)
    return grads


def _step_with_scale(
    optimizer: Any,
    scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    home: torch.device,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``optimizer.step()`` with ``grad_scale``/``found_inf`` set on it for the call, as torch
    sets them (``scale`` None: gradients unscaled already, keep the optimizer's own)."""
    if found_inf is None:  # check_finite off: nothing overflowed as far as we know
        found_inf = torch.zeros((), dtype=torch.float32, device=home)
    if scale is None:
        grad_scale = getattr(optimizer, "grad_scale", None)
    else:  # as torch: a product with a grad_scale the user set on the optimizer
        grad_scale = scale * getattr(optimizer, "grad_scale", 1)
    optimizer.grad_scale = grad_scale
    optimizer.found_inf = found_inf
    try:
        return optimizer.step(*args, **kwargs)
    finally:
        del optimizer.grad_scale
        del optimizer.found_inf


def _divergence_message(
    used: float, limit: tuple[int, int], broken: Sequence[str], shown: str
) -> str:
    """What is true after a divergence: why it counts as one (``limit``: non-finite losses in a
    row and ``max_nonfinite_losses``) and whether parameters (``broken``) already hold NaN/inf."""
    if used <= 1.0:
        why = f"at loss scale {used:g} (<= 1)"
    else:
        why = (
            f"in {limit[0]} skipped iterations in a row "
            f"(max_nonfinite_losses={limit[1]}), now at loss scale {used:g}"
        )
    if broken:
        params = (
            f"the parameters already hold NaN/inf (an earlier step wrote them): "
            f"{_listed(broken)}. Resume from a checkpoint with a lower learning rate (in a "
            "narrow compute format, also an optimizer eps the format can represent)"
        )
    else:
        params = (
            "the parameters are intact (all finite). Lower the learning rate, check the "
            "inputs, or resume from a checkpoint"
        )
    return (
        f"training diverged: the loss itself is NaN/inf {why}, so this is not an overflow "
        f"that loss scaling can cure. The optimizer step was skipped; {params}. Non-finite "
        f"gradients in: {shown}. Pass on_divergence='warn' or 'ignore' to continue anyway."
    )


def _listed(names: Sequence[str]) -> str:
    """At most ``_MAX_NAMES`` names, then how many more."""
    shown = ", ".join(names[:_MAX_NAMES])
    if len(names) > _MAX_NAMES:
        shown += f" and {len(names) - _MAX_NAMES} more"
    return shown


def _check_count(name: str, value: object) -> None:
    """``TypeError``/``ValueError`` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _checked_new_scale(new_scale: float | torch.Tensor) -> float:
    """``update(new_scale)``'s value as a float (a 1-element tensor is read: one sync)."""
    if isinstance(new_scale, torch.Tensor):
        if new_scale.numel() != 1 or new_scale.requires_grad:
            raise ValueError(
                "new_scale must be a float or a 1-element tensor without grad, got a "
                f"tensor of shape {tuple(new_scale.shape)}"
            )
        new_scale = float(new_scale.item())
    _check_positive("new_scale", new_scale)
    return new_scale


class NoOpLossScaler(LossScaler):
    """Scale 1 and no checks: ``scale`` returns the loss unchanged and ``step`` just steps.

    Same API and state machine as the other scalers, zero cost (no pass over the gradients,
    no sync). For fp32 and bf16 training, where the format's range needs no scaling. Pass
    ``check_finite=True`` to skip steps with NaN/inf gradients (and detect divergence) anyway.
    """

    def __init__(self, *, check_finite: bool = False, **kwargs: Unpack[ScalerKeywords]) -> None:
        super().__init__(1.0, check_finite=check_finite, **kwargs)

    def is_enabled(self) -> bool:
        return self.check_finite

    def scale(self, outputs: Any) -> Any:
        if self.check_finite:
            return super().scale(outputs)
        self._scaled_once = True
        return outputs

    def update(self, new_scale: float | torch.Tensor | None = None, *, stacklevel: int = 1) -> None:
        if new_scale is not None:
            raise ValueError("NoOpLossScaler's scale is always 1; new_scale is not accepted")
        super().update(stacklevel=stacklevel + 1)  # + this frame

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the skip record; the scale stays 1 whatever the dict says."""
        super().load_state_dict({**state_dict, "scale": 1.0})


class StaticLossScaler(LossScaler):
    """A constant loss scale (the mixed-precision paper's first recipe).

    Steps whose gradients overflow are still skipped and recorded (``check_finite=True``);
    the scale only changes through ``update(new_scale)`` or :meth:`load_state_dict`.
    """

    def __init__(self, scale: float, **kwargs: Unpack[CheckedScalerKeywords]) -> None:
        super().__init__(scale, **kwargs)


def _check_bounds(init_scale: float, min_scale: float | None, max_scale: float | None) -> None:
    """Floor and ceiling against each other and the initial scale; errors name the fix."""
    if min_scale is not None:
        _check_positive("min_scale", min_scale)
    if max_scale is not None:
        _check_positive("max_scale", max_scale)
    if min_scale is not None and max_scale is not None and min_scale > max_scale:
        raise ValueError(f"min_scale={min_scale!r} exceeds max_scale={max_scale!r}")
    if max_scale is not None and init_scale > max_scale:
        raise ValueError(
            f"init_scale={init_scale!r} exceeds max_scale={max_scale!r} (the default ceiling "
            f"is 2**24); pass max_scale={init_scale!r} (or max_scale=None for no ceiling, as "
            "torch.amp.GradScaler) or a smaller init_scale"
        )
    if min_scale is not None and init_scale < min_scale:
        raise ValueError(
            f"init_scale={init_scale!r} is below min_scale={min_scale!r}; pass "
            f"min_scale={init_scale!r} (or None) or a larger init_scale"
        )


class DynamicLossScaler(LossScaler):
    """Dynamic loss scaling: back off on overflow, grow after ``growth_interval`` clean steps.

    Args:
        init_scale: initial scale (float32-rounded).
        growth_factor: > 1; the scale is multiplied by it after ``growth_interval`` clean
            iterations in a row (but never past ``max_scale`` nor to inf).
        backoff_factor: in (0, 1); the scale is multiplied by it on an overflow (never below
            ``min_scale``).
        growth_interval: clean iterations in a row before growing (>= 1).
        min_scale: floor (``None``: only :data:`SCALE_FLOOR`, float32's smallest normal, where
            torch would go on halving to 0). Hitting the floor while the gradients still
            overflow warns with the offending parameter names (:class:`LossScaleCollapseWarning`).
        max_scale: ceiling (``None``: none, as torch; default 2**24 keeps fp16 gradients from
            being pushed to the top of the range for nothing).
        hysteresis: back off only after this many overflowing iterations in a row; every
            further overflow in the same run backs off again, a clean iteration resets the
            count (DeepSpeed's "consecutive hysteresis"). Steps that overflow are always
            skipped. ``1`` is torch's behaviour.
        **kwargs: ``check_finite``, ``on_skip``, ``on_divergence``, ``distributed``,
            ``process_group`` (see :class:`LossScaler`).

    The update arithmetic is torch's ``_amp_update_scale_``: ``scale * factor`` in double,
    stored as float32; growth that would reach inf is dropped.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float | None = None,
        max_scale: float | None = 2.0**24,
        hysteresis: int = 1,
        **kwargs: Unpack[CheckedScalerKeywords],
    ) -> None:
        _check_positive("init_scale", init_scale)
        _check_positive("growth_factor", growth_factor)
        _check_positive("backoff_factor", backoff_factor)
        if growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1.0, got {growth_factor!r}")
        if backoff_factor >= 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        _check_count("growth_interval", growth_interval)
        _check_count("hysteresis", hysteresis)
        _check_bounds(init_scale, min_scale, max_scale)
        super().__init__(init_scale, **kwargs)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self.min_scale = None if min_scale is None else _f32(float(min_scale))
        # the floor actually applied: min_scale, or SCALE_FLOOR so the scale never reaches 0
        self._floor = SCALE_FLOOR if min_scale is None else max(self.min_scale, SCALE_FLOOR)
        self.max_scale = None if max_scale is None else _f32(float(max_scale))
        self.hysteresis = hysteresis
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    # torch.amp.GradScaler's accessors
    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        if not new_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1.0, got {new_factor!r}")
        self._growth_factor = float(new_factor)

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        if not 0.0 < new_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {new_factor!r}")
        self._backoff_factor = float(new_factor)

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        if isinstance(new_interval, bool) or not isinstance(new_interval, int) or new_interval < 1:
            raise ValueError(f"growth_interval must be an int >= 1, got {new_interval!r}")
        self._growth_interval = new_interval

    def _get_growth_tracker(self) -> int:
        return self._growth_tracker

    def _next_scale(self, found: bool) -> float:
        s = self._scale
        if found:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                s = max(_f32(s * self._backoff_factor), self._floor)
            return s
        self._hysteresis_tracker = self.hysteresis
        successful = self._growth_tracker + 1
        if successful == self._growth_interval:
            new = _f32(s * self._growth_factor)
            if self.max_scale is not None:
                new = min(new, self.max_scale)
            if math.isfinite(new):  # as torch: never grow to inf
                s = new
            self._growth_tracker = 0
        else:
            self._growth_tracker = successful
        return s

    def _at_floor_after_backoff(self) -> bool:
        return self._scale * self._backoff_factor <= self._floor

    def _floor_name(self) -> str:
        return "min_scale" if self.min_scale is not None else "SCALE_FLOOR"

    def _collapsed(self, used: float) -> bool:
        return (
            self._scale == self._floor
            and used * self._backoff_factor <= self._floor
            and self._hysteresis_tracker <= 0
        )

    def state_dict(self) -> dict[str, Any]:
        """torch's five entries (``scale``, ``growth_factor``, ``backoff_factor``,
        ``growth_interval``, ``_growth_tracker``) plus floor, ceiling, hysteresis and the
        skip record; ``torch.amp.GradScaler.load_state_dict`` accepts it."""
        state = super().state_dict()
        state.update(
            growth_factor=self._growth_factor,
            backoff_factor=self._backoff_factor,
            growth_interval=self._growth_interval,
            _growth_tracker=self._growth_tracker,
            min_scale=self.min_scale,
            max_scale=self.max_scale,
            hysteresis=self.hysteresis,
            _hysteresis_tracker=self._hysteresis_tracker,
        )
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._growth_factor = float(state_dict.get("growth_factor", self._growth_factor))
        self._backoff_factor = float(state_dict.get("backoff_factor", self._backoff_factor))
        self._growth_interval = int(state_dict.get("growth_interval", self._growth_interval))
        self._growth_tracker = int(state_dict.get("_growth_tracker", 0))
        if "min_scale" in state_dict:
            self.min_scale = state_dict["min_scale"]
            floor = self.min_scale
            self._floor = SCALE_FLOOR if floor is None else max(float(floor), SCALE_FLOOR)
        if "max_scale" in state_dict:
            self.max_scale = state_dict["max_scale"]
        self.hysteresis = int(state_dict.get("hysteresis", self.hysteresis))
        self._hysteresis_tracker = int(state_dict.get("_hysteresis_tracker", self.hysteresis))
