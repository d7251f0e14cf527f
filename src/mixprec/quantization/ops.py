"""The emulated rounding as a registered torch custom op, ``mixprec::round``: torch.compile.

Dynamo cannot trace the C kernel (raw pointers) nor the seed draw of stochastic rounding (a
``.item()``), so under :func:`torch.compiler.is_compiling` :func:`~mixprec.quantize` calls this
op instead: an opaque node with a fake (meta) implementation, so that compiled graphs have no
graph break around a rounding. The format enters as plain inputs (name, bit counts, bias,
encoding), not as a baked constant, so one op (and one compiled extern call) serves every
format and mode.

Eager calls do not go through here: the dispatcher costs ~12 us per call (CPU), nearly four
times a 256-element rounding (see ``round_to``).

Stochastic rounding under torch.compile draws its seed from torch's default generator (inside
the op, at run time): a ``torch.Generator`` cannot be an op input.

MX blocks have an op of their own, ``mixprec::mx_round`` (:func:`mx_round_op`), and so has fp8
current scaling, ``mixprec::current_scaled_round`` (:func:`current_scaled_round_op`): compiled
CPU graphs call them for large operands (``elementwise.extern_when_compiled``); they are always
extern calls.

Inductor compiles ``mixprec::round`` in two ways (:func:`register_inductor_lowering`): float32
roundings on the CPU that a torch dtype's casts make exactly (:func:`cast_dtype`: bf16 and
fp16, saturating fp8 e4m3/e5m2; round to nearest even, subnormals kept) become a clamp and a
float32 -> low -> float32 cast pair fused into the kernels around it; every other rounding
(and every rounding on CUDA, where Triton's casts have not been tested) stays one extern call
of the eager kernels.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any

import torch

from mixprec.formats.float_format import FloatFormat, get_format

_OP = "mixprec::round"


@lru_cache(maxsize=256)
def _format(
    name: str, exponent_bits: int, mantissa_bits: int, bias: int, encoding: str
) -> FloatFormat:
    """The FloatFormat the op's inputs describe (equal to the caller's: same fields)."""
    return FloatFormat(name, exponent_bits, mantissa_bits, bias, encoding)  # type: ignore[arg-type]


@torch.library.custom_op(_OP, mutates_args=())
def _round_op(
    x: torch.Tensor, name: str, exponent_bits: int, mantissa_bits: int, bias: int,
    encoding: str, rounding: str, saturate: bool, subnormals: bool,
) -> torch.Tensor:  # fmt: skip
    """Round ``x`` into the format these fields describe: a fresh contiguous tensor."""
    # imported here: elementwise imports this module (the kernels live there)
    from mixprec.quantization.elementwise import _round

    f = _format(name, exponent_bits, mantissa_bits, bias, encoding)
    res = _round(x, f, rounding, saturate, subnormals, None, None)
    # a custom op's output may not alias its input, and must have the fake's strides
    return res.contiguous() if res is not x else res.clone()


@_round_op.register_fake
def _round_fake(
    x: torch.Tensor, name: str, exponent_bits: int, mantissa_bits: int, bias: int,
    encoding: str, rounding: str, saturate: bool, subnormals: bool,
) -> torch.Tensor:  # fmt: skip
    # the fake runs whenever a graph holding the op is traced, before inductor lowers it
    register_inductor_lowering()
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def cast_dtype(
    f: FloatFormat, rounding: str, saturate: bool, subnormals: bool
) -> torch.dtype | None:
    """The torch dtype whose float32 round trip (after a clamp to ``±f.max`` when saturating)
    rounds exactly as this rounding does, else None: round to nearest even, subnormals kept,
    into bf16 or fp16 (overflow to inf as IEEE casts do, or saturating), or fp8 e4m3fn and
    e5m2 when saturating (their casts overflow differently in eager torch and in inductor's
    CPU code, the clamp makes both exact). Checked bit for bit in the tests."""
    if rounding != "nearest" or not subnormals:
        return None
    dtypes = _CASTS_SATURATING if saturate else _CASTS
    for dtype in dtypes:
        if f == get_format(dtype):
            return dtype
    return None


_CASTS = (torch.bfloat16, torch.float16)
_CASTS_SATURATING = (*_CASTS, torch.float8_e4m3fn, torch.float8_e5m2)


@cache
def register_inductor_lowering() -> None:
    """Give inductor a lowering of ``mixprec::round`` (once per process; imports inductor).

    A float32 rounding on the CPU with a :func:`cast_dtype` lowers to a pointwise cast pair
    that fuses with its neighbours (no memory pass, no call). The casts are emitted with
    ``use_compute_types=False``: inductor's CPU code generator otherwise maps the upcast back
    to the unrounded value (its CSE trick for low-precision stores, off only under
    ``emulate_precision_casts``), and the rounding would silently vanish. NaN inputs are passed
    through unchanged, as the eager kernels do (a cast would give a canonical NaN). Any other
    rounding lowers to the extern call inductor makes of any custom op.
    """
    from torch._inductor import lowering
    from torch._inductor.virtualized import ops as ir_ops

    op = torch.ops.mixprec.round.default
    extern = lowering.fallback_handler(op, add_to_fallback_set=False)

    @lowering.register_lowering(op, type_promotion_kind=None)
    def _lower(x: Any, *fields: Any) -> Any:
        *fmt_fields, rounding, saturate, subnormals = fields  # the op's inputs after x
        f = _format(*fmt_fields)
        dtype = cast_dtype(f, rounding, saturate, subnormals)
        device = x.get_device()
        # CPU only: the bits are tested against inductor's C++ code; Triton's casts (CUDA)
        # have not been run here, so there the op stays the call of the exact eager kernel
        if (
            dtype is None
            or x.get_dtype() != torch.float32
            or getattr(device, "type", None) != "cpu"
        ):
            return extern(x, *fields)
        return lowering.make_pointwise(_round_trip(ir_ops, dtype, f.max if saturate else None))(x)


def _round_trip(ir_ops: Any, dtype: torch.dtype, top: float | None) -> Any:
    """The pointwise body of a fused rounding: clamp to ``±top`` (when saturating), the cast
    pair, and NaN inputs passed through."""

    def round_trip(v: Any) -> Any:
        w = v
        if top is not None:  # minimum/maximum propagate NaN, which the last line passes anyway
            w = ir_ops.minimum(ir_ops.maximum(v, ir_ops.constant(-top, torch.float32)),
                               ir_ops.constant(top, torch.float32))  # fmt: skip
        low = ir_ops.to_dtype(w, dtype, src_dtype=torch.float32, use_compute_types=False)
        back = ir_ops.to_dtype(low, torch.float32, src_dtype=dtype, use_compute_types=False)
        return ir_ops.where(ir_ops.ne(v, v), v, back)  # v != v: NaN (isnan is scalar code)

    return round_trip


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    pass  # the backward needs nothing saved: the gradient of a rounding is zero


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    # rounding is piecewise constant: gradient zero, as torch.round (and eager quantize) has it
    return (torch.zeros_like(grad),) + (None,) * 8


_round_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# MX blocks: mixprec::mx_round
# ----------------------------------------------------------------------------------------------

# A plain registration (schema, CPU kernel, fake), not ``torch.library.custom_op``: the latter's
# Python layers (autograd wrapper, redispatch, aliasing checks, dynamo guard) cost ~14 us a
# call, this ~4 us, on every call a compiled graph makes. No autograd formula: callers pass a
# detached tensor, as the eager kernel's result is detached too.
_LIB = torch.library.Library("mixprec", "FRAGMENT")
_LIB.define(
    "mx_round(Tensor x, str name, int exponent_bits, int mantissa_bits, int bias, str encoding, "
    "int block, int axis, str scale_rounding) -> Tensor"
)


def _mx_round_cpu(
    x: torch.Tensor, name: str, exponent_bits: int, mantissa_bits: int, bias: int,
    encoding: str, block: int, axis: int, scale_rounding: str,
) -> torch.Tensor:  # fmt: skip
    """``x``'s MX blocks along ``axis`` rounded to the element format these fields describe
    (nearest, saturating): ``mx_round_to``'s values, in a fresh tensor laid out like
    ``torch.empty_like(x)``."""
    # imported here: blocks imports elementwise, which imports this module
    from mixprec.quantization.blocks import mx_round_to
    from mixprec.quantization.elementwise import _gap_free

    f = _format(name, exponent_bits, mantissa_bits, bias, encoding)
    if not _gap_free(x):
        # a gapped operand (heads split out of a fused QKV projection): copied once into the
        # fake's layout, which the kernel keeps, instead of made contiguous and copied back
        x = torch.empty_like(x).copy_(x)
    return _in_fake_layout(mx_round_to(x, f, block, axis, scale_rounding), x)


def _in_fake_layout(res: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``res`` (values for ``x``) laid out as the fakes say, ``torch.empty_like(x)``: x's
    strides where x is dense. A copy only where the kernel chose another layout."""
    if res.stride() == x.stride():
        return res
    want = torch.empty_like(x)
    return res if res.stride() == want.stride() else want.copy_(res)


def _fake_like_x(x: torch.Tensor, *fields: Any) -> torch.Tensor:
    """The fake of the plainly registered ops: a fresh tensor laid out like ``x`` (its strides
    where ``x`` is dense), whatever the format fields."""
    return torch.empty_like(x)


_LIB.impl("mx_round", _mx_round_cpu, "CPU")
torch.library.register_fake("mixprec::mx_round", _fake_like_x, lib=_LIB)


def mx_round_op(
    x: torch.Tensor, element: FloatFormat, block: int, axis: int, scale_rounding: str
) -> torch.Tensor:
    """``mixprec::mx_round`` on ``x`` (a CPU tensor that needs no gradient): what
    ``mx_round_to`` calls for a large operand while torch.compile traces a CPU graph. Opaque to
    inductor, which calls it as an extern kernel: the C kernel's one read and one write of
    ``x`` plus ~4 us of dispatch (the traced torch ops compile, on the CPU, to scalar bit casts
    and a division per element: 2-6x the kernel's time at 512k elements)."""
    return torch.ops.mixprec.mx_round.default(
        x, element.name, element.exponent_bits, element.mantissa_bits, element.bias,
        element.encoding, int(block), int(axis), scale_rounding,
    )  # fmt: skip


def round_op(
    x: torch.Tensor, f: FloatFormat, rounding: str, saturate: bool, subnormals: bool
) -> torch.Tensor:
    """``mixprec::round`` on ``x``: what ``round_to`` calls while torch.compile traces.

    Differentiable with gradient zero. Cost when run: the eager kernels plus the dispatcher.
    """
    return _round_op(
        x, f.name, f.exponent_bits, f.mantissa_bits, f.bias, f.encoding, rounding,
        bool(saturate), bool(subnormals),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# fp8 current scaling: mixprec::current_scaled_round
# ----------------------------------------------------------------------------------------------

# Inductor hands an extern op's inputs over in whatever layout its buffers have unless the op
# asks for the traced strides; the fake's output layout (empty_like) follows the traced ones
_LIB.define(
    "current_scaled_round(Tensor x, str name, int exponent_bits, int mantissa_bits, int bias, "
    "str encoding, float fmax) -> Tensor",
    tags=(torch.Tag.needs_exact_strides,),
)


def _current_scaled_round_cpu(
    x: torch.Tensor, name: str, exponent_bits: int, mantissa_bits: int, bias: int,
    encoding: str, fmax: float,
) -> torch.Tensor:  # fmt: skip
    """``current_scaled_round_to``'s values for ``x`` in a fresh tensor laid out like
    ``torch.empty_like(x)`` (run eagerly: one C call on one thread, or the threaded path)."""
    # imported here: scaled imports this module
    from mixprec.quantization.scaled import current_scaled_round_to

    f = _format(name, exponent_bits, mantissa_bits, bias, encoding)
    return _in_fake_layout(current_scaled_round_to(x, fmax, f), x)


_LIB.impl("current_scaled_round", _current_scaled_round_cpu, "CPU")
torch.library.register_fake("mixprec::current_scaled_round", _fake_like_x, lib=_LIB)


def current_scaled_round_op(x: torch.Tensor, fmt: FloatFormat, fmax: float) -> torch.Tensor:
    """``mixprec::current_scaled_round`` on ``x`` (a float32 CPU tensor that needs no
    gradient): what ``current_scaled_round_to`` calls for a large operand while torch.compile
    traces a CPU graph. Inductor calls it as an extern kernel: the C kernel's amax pass, one
    read and one write, plus ~4 us of dispatch (the traced ops compile to a vectorised amax
    pass and a scaled fp8 cast pass that inductor fuses into the kernel making the operand,
    which then computes that operand twice; alone they take ~4x the C call at 128k elements)."""
    return torch.ops.mixprec.current_scaled_round.default(
        x, fmt.name, fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.encoding, float(fmax)
    )
