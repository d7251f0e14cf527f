"""Per-tensor fp8 scaling recipes (Transformer Engine style): current and delayed scaling.

An fp8 GEMM operand ``t`` is stored as ``q = fp8(t * s)`` with a per-tensor scale ``s`` chosen
so that ``amax(|t|) * s`` lands near the format's largest value, and the GEMM result is divided
by the scales again. Emulation computes ``quantize(t * s, fmt, saturate=True) / s`` (the
multiplication and division are fp32 operations, as on hardware).

* :class:`CurrentScaling` - ``s = fmt.max / amax(t) / 2^margin`` from the tensor itself
  ("just-in-time" scaling; one extra reduction pass over ``t``).
* :class:`DelayedScaling` - ``s`` comes from a history of the amaxes of the same tensor slot in
  earlier steps (default length 16, ``max`` over the history), as Transformer Engine's
  ``DelayedScaling``; the current amax is appended *after* the tensor is quantized, so the first
  step uses ``s = 1``. The state lives in the recipe object: reuse one recipe across steps.

``fp8_format``: ``"HYBRID"`` (e4m3 forward operands, e5m2 gradients: TE's default) or ``"E4M3"``
(e4m3 everywhere). No device sync anywhere: amaxes and scales stay tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from mixprec.formats.float_format import FloatFormat, get_format
from mixprec.quantization.elementwise import quantize_


@runtime_checkable
class Fp8Recipe(Protocol):
    """What an emulated region asks of an fp8 scaling recipe (both recipes below are ones).

    ``quantize`` rounds ``t`` to ``fmt`` through a per-tensor scale; ``slot`` names the operand
    (region scope, op index, operand index) so a stateful recipe can keep per-tensor history.
    """

    @property
    def forward_format(self) -> FloatFormat:
        """Operand format of forward GEMMs."""
        ...

    @property
    def backward_format(self) -> FloatFormat:
        """Format of the gradient operand of backward GEMMs."""
        ...

    def quantize(self, t: torch.Tensor, fmt: FloatFormat, slot: object) -> torch.Tensor: ...


_FORMATS = ("HYBRID", "E4M3")
_ALGOS = ("max", "most_recent")


def _check_common(fp8_format: str, margin: int) -> None:
    if fp8_format not in _FORMATS:
        raise ValueError(f"fp8_format must be one of {_FORMATS}, got {fp8_format!r}")
    if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
        raise ValueError(f"margin must be a non-negative int, got {margin!r}")


def _scale_from_amax(
    amax: torch.Tensor, fmax: float, margin: int, fallback: torch.Tensor
) -> torch.Tensor:
    """``fmax / amax / 2^margin`` where amax is finite and positive, else ``fallback``."""
    ok = torch.isfinite(amax) & (amax > 0)
    s = (fmax / amax) * (2.0**-margin)
    return torch.where(ok, s, fallback)


def _apply_scale(t: torch.Tensor, s: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    # one temporary: (t * s) rounded in place, divided in place
    work = t.detach().float() * s
    quantize_(work, fmt, saturate=True)
    work.div_(s)
    return work.to(t.dtype)


@dataclass(frozen=True, eq=False)
class CurrentScaling:
    """Per-tensor current ("just-in-time") scaling: the scale comes from the tensor's own amax.

    Args:
        fp8_format: ``"HYBRID"`` (e4m3 forward, e5m2 backward) or ``"E4M3"``.
        margin: the scale is divided by ``2**margin`` (headroom against overflow).
    """

    fp8_format: Literal["HYBRID", "E4M3"] = "HYBRID"
    margin: int = 0

    def __post_init__(self) -> None:
        _check_common(self.fp8_format, self.margin)

    @property
    def forward_format(self) -> FloatFormat:
        """Operand format of forward GEMMs (e4m3 with OCP's finite encoding)."""
        return get_format("float8_e4m3fn")

    @property
    def backward_format(self) -> FloatFormat:
        """Format of the gradient operand of backward GEMMs."""
        return get_format("float8_e5m2" if self.fp8_format == "HYBRID" else "float8_e4m3fn")

    def quantize(self, t: torch.Tensor, fmt: FloatFormat, slot: object) -> torch.Tensor:
        """Scaled rounding of ``t`` to ``fmt`` (``slot`` names the tensor; unused here)."""
        del slot
        amax = t.detach().abs().amax().float()
        s = _scale_from_amax(amax, fmt.max, self.margin, torch.ones_like(amax))
        return _apply_scale(t, s, fmt)


@dataclass
class _SlotState:
    history: torch.Tensor  # amax history, most recent first
    scale: torch.Tensor  # scale to use for the next quantization


@dataclass(frozen=True, eq=False)
class DelayedScaling(CurrentScaling):
    """Delayed scaling: scale from the amax history of the same tensor slot in earlier steps.

    Args:
        fp8_format, margin: as :class:`CurrentScaling`.
        amax_history_len: number of past amaxes kept per tensor slot (default 16).
        amax_compute_algo: ``"max"`` (max over the history) or ``"most_recent"``.

    A slot is one operand position of one low-precision op call, numbered in call order within
    an autocast region (and by module name under ``apply_policy``), so a model with a fixed
    sequence of ops gets the same slots every step. Equality is identity: each recipe object
    owns its state; :meth:`reset` clears it.
    """

    amax_history_len: int = 16
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    _state: dict[object, _SlotState] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.amax_history_len
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"amax_history_len must be a positive int, got {n!r}")
        if self.amax_compute_algo not in _ALGOS:
            raise ValueError(
                f"amax_compute_algo must be one of {_ALGOS}, got {self.amax_compute_algo!r}"
            )

    def reset(self) -> None:
        """Forget every amax history (e.g. after loading a checkpoint into a new model)."""
        self._state.clear()

    def amax_history(self, slot: object) -> torch.Tensor | None:
        """The amax history of a slot (most recent first), or None before its first use."""
        st = self._state.get(slot)
        return None if st is None else st.history

    def quantize(self, t: torch.Tensor, fmt: FloatFormat, slot: object) -> torch.Tensor:
        st = self._state.get(slot)
        if st is None or st.history.device != t.device:
            st = _SlotState(
                torch.zeros(self.amax_history_len, device=t.device),
                torch.ones((), device=t.device),
            )
            self._state[slot] = st
        q = _apply_scale(t, st.scale, fmt)
        # update after use: the next step's scale sees this step's amax
        amax = t.detach().abs().amax().float()
        hist = torch.roll(st.history, 1)
        hist[0] = amax
        st.history = hist
        ref = hist.amax() if self.amax_compute_algo == "max" else hist[0]
        st.scale = _scale_from_amax(ref, fmt.max, self.margin, st.scale)
        return q


def coerce_recipe(recipe: Fp8Recipe | str | None) -> Fp8Recipe | None:
    """None, a recipe object (:class:`CurrentScaling`, :class:`DelayedScaling`, or any
    :class:`Fp8Recipe`), or ``"current"`` (a default :class:`CurrentScaling`)."""
    if recipe is None:
        return None
    if isinstance(recipe, str):
        if recipe == "current":
            return CurrentScaling()
        if recipe == "delayed":
            raise ValueError(
                "fp8_recipe='delayed' would start a fresh amax history every step; create one "
                "DelayedScaling() object, keep it, and pass it on every step"
            )
        raise ValueError(
            f"fp8_recipe must be None, 'current', a CurrentScaling or a DelayedScaling object, "
            f"got {recipe!r}"
        )
    if isinstance(recipe, Fp8Recipe):
        return recipe
    raise TypeError(
        f"fp8_recipe must be None, 'current', a CurrentScaling or a DelayedScaling object (or an "
        f"Fp8Recipe: forward_format, backward_format, quantize), got {type(recipe).__name__}: "
        f"{recipe!r}"
    )
