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
(e4m3 everywhere); ``forward=`` / ``backward=`` name other operand formats. ``power_of_two=True``
rounds each scale down to a power of two (torchao's ``round_scales_to_power_of_2``), so scaling
itself is exact. A format wider than 8 bits (e.g. ``backward="bfloat16"``) is rounded without a
scale: its range needs none. No device sync: on a GPU, and under torch.compile, amaxes and
scales stay tensors; eager CPU code reads the default recipe's amax and scale as Python floats
(there is no device to wait for), the same bits in two small ops instead of eight.

**The default recipe.** Every fp8 training system scales per tensor by default, so a policy
whose compute format is an 8-bit float gets :func:`default_recipe`: current scaling with that
format forward and the policy's grads format backward. ``fp8_recipe=DEFAULT_RECIPE`` (the default
of :func:`mixprec.autocast` and :func:`mixprec.apply_policy`) means exactly that;
``fp8_recipe=None`` asks for raw, unscaled rounding (for studies of the format itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, Protocol, runtime_checkable

import torch

from mixprec.formats.float_format import FloatFormat, get_format
from mixprec.quantization.elementwise import round_to
from mixprec.quantization.scaled import (
    current_scaled_round_to,
    scaled_round_to,
    tensor_to_amax,
)

if TYPE_CHECKING:
    from mixprec.precision.policy import FormatSpec, Policy


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
    amax: torch.Tensor, fmax: float, margin: int, fallback: torch.Tensor, power_of_two: bool
) -> torch.Tensor:
    """``fmax / amax / 2^margin`` (rounded down to a power of two on request) where amax is
    finite and positive and the scale finite, else ``fallback``."""
    s = (fmax / amax) * (2.0**-margin)
    if power_of_two:
        # s = m * 2^e with m in [0.5, 1): the power of two at or below s is 2^(e-1), exactly
        _, e = torch.frexp(s)
        s = torch.ldexp(torch.full_like(s, 0.5), e)
    # a tiny amax can overflow the scale to inf, which would turn zeros into NaN
    ok = torch.isfinite(amax) & (amax > 0) & torch.isfinite(s)
    return torch.where(ok, s, fallback)


def _operand_format(name: str | None, default: str, what: str) -> FloatFormat:
    try:
        return get_format(name if name is not None else default)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{what}: {err}") from None


def _unscaled(t: torch.Tensor, fmt: FloatFormat) -> torch.Tensor | None:
    """Plain rounding for formats wider than 8 bits (their range needs no scale), else None."""
    if fmt.bits > 8:
        return round_to(t.detach(), fmt)  # fmt resolved by the recipe: no checks per op
    return None


@dataclass(frozen=True, eq=False)
class CurrentScaling:
    """Per-tensor current ("just-in-time") scaling: the scale comes from the tensor's own amax.

    Args:
        fp8_format: ``"HYBRID"`` (e4m3 forward, e5m2 backward) or ``"E4M3"``.
        margin: the scale is divided by ``2**margin`` (headroom against overflow).
        power_of_two: round each scale down to a power of two (keyword only).
        forward, backward: operand format names overriding ``fp8_format``'s (keyword only;
            e.g. ``forward="float8_e5m2"``); a format wider than 8 bits is rounded unscaled.

    Cost per operand: one amax reduction, one scaled copy rounded and divided in place. With
    ``margin=0`` and no ``power_of_two`` (the default recipe) on the CPU, a float32 operand's
    amax, scale and scaled rounding are one C call (an amax pass, then one read and one write;
    no sync), in eager code and, for operands of 32k elements or more, in compiled graphs (the
    op ``mixprec::current_scaled_round``); other dtypes read amax and scale as Python floats;
    the same bits (:mod:`mixprec.quantization.scaled`).
    """

    fp8_format: Literal["HYBRID", "E4M3"] = "HYBRID"
    margin: int = 0
    power_of_two: bool = field(default=False, kw_only=True)
    forward: str | None = field(default=None, kw_only=True)
    backward: str | None = field(default=None, kw_only=True)
    _formats: tuple[FloatFormat, FloatFormat] = field(init=False, repr=False, compare=False)
    _fmax: tuple[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_common(self.fp8_format, self.margin)
        if not isinstance(self.power_of_two, bool):
            raise TypeError(f"power_of_two must be a bool, got {self.power_of_two!r}")
        # resolve once: a bad name fails here, not at the first GEMM
        fwd = _operand_format(self.forward, "float8_e4m3fn", "forward")
        default_bwd = "float8_e5m2" if self.fp8_format == "HYBRID" else "float8_e4m3fn"
        bwd = _operand_format(self.backward, default_bwd, "backward")
        object.__setattr__(self, "_formats", (fwd, bwd))
        # the largest values, as floats now: FloatFormat.max is a Fraction behind a
        # cached_property, whose lock torch.compile cannot trace on first use
        object.__setattr__(self, "_fmax", (fwd.max, bwd.max))

    def _max_of(self, fmt: FloatFormat) -> float:
        fwd, bwd = self._formats
        return self._fmax[0] if fmt is fwd else self._fmax[1] if fmt is bwd else fmt.max

    @property
    def forward_format(self) -> FloatFormat:
        """Operand format of forward GEMMs (default: e4m3 with OCP's finite encoding)."""
        return self._formats[0]

    @property
    def backward_format(self) -> FloatFormat:
        """Format of the gradient operand of backward GEMMs."""
        return self._formats[1]

    def quantize(self, t: torch.Tensor, fmt: FloatFormat, slot: object) -> torch.Tensor:
        """Scaled rounding of ``t`` to ``fmt`` (``slot`` names the tensor; unused here)."""
        del slot
        plain = _unscaled(t, fmt)
        if plain is not None:
            return plain
        if self.margin or self.power_of_two:
            amax = tensor_to_amax(t)
            s = _scale_from_amax(
                amax, self._max_of(fmt), self.margin, torch.ones_like(amax), self.power_of_two
            )
            return scaled_round_to(t, s, fmt)
        return current_scaled_round_to(t, self._max_of(fmt), fmt)


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
        plain = _unscaled(t, fmt)
        if plain is not None:
            return plain
        st = self._state.get(slot)
        if st is None or st.history.device != t.device:
            st = _SlotState(
                torch.zeros(self.amax_history_len, device=t.device),
                torch.ones((), device=t.device),
            )
            self._state[slot] = st
        q = scaled_round_to(t, st.scale, fmt)
        # update after use: the next step's scale sees this step's amax
        amax = tensor_to_amax(t)
        hist = torch.roll(st.history, 1)
        hist[0] = amax
        st.history = hist
        ref = hist.amax() if self.amax_compute_algo == "max" else hist[0]
        fmax = self._max_of(fmt)
        st.scale = _scale_from_amax(ref, fmax, self.margin, st.scale, self.power_of_two)
        return q


class _DefaultRecipe:
    """Type of :data:`DEFAULT_RECIPE` (a singleton)."""

    _instance: _DefaultRecipe | None = None

    def __new__(cls) -> _DefaultRecipe:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT_RECIPE"

    def __reduce__(self) -> str:
        return "DEFAULT_RECIPE"  # pickles as the module attribute: stays the singleton


#: ``fp8_recipe`` default: "the default recipe for the policy's format" (:func:`default_recipe`).
DEFAULT_RECIPE: Final = _DefaultRecipe()

RecipeLike = Fp8Recipe | str | _DefaultRecipe | None


def is_fp8(spec: FormatSpec) -> bool:
    """True for an element (not MX) 8-bit float format with mantissa bits (not E8M0)."""
    return not spec.is_mx and spec.element.bits == 8 and spec.element.mantissa_bits > 0


def default_recipe(policy: Policy) -> CurrentScaling | None:
    """The recipe a policy gets by default: per-tensor current scaling when its compute format
    is an 8-bit float (forward operands in it, gradient operands in ``policy.grads_format``,
    scaled too when that is an 8-bit float), else None (no recipe). MX gradients (a recipe
    rounds per tensor, not per block) also mean no recipe: the policy then rounds as written."""
    compute = policy.compute_format
    if not is_fp8(compute) or policy.grads_format.is_mx:
        return None
    return CurrentScaling(forward=compute.name, backward=policy.grads_format.name)


def resolve_recipe(recipe: RecipeLike, policy: Policy) -> Fp8Recipe | None:
    """:func:`default_recipe` for :data:`DEFAULT_RECIPE`, else :func:`coerce_recipe`."""
    if recipe is DEFAULT_RECIPE:
        return default_recipe(policy)
    return coerce_recipe(recipe)  # type: ignore[arg-type]


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
