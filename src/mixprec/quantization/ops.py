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
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from mixprec.formats.float_format import FloatFormat

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
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    pass  # the backward needs nothing saved: the gradient of a rounding is zero


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    # rounding is piecewise constant: gradient zero, as torch.round (and eager quantize) has it
    return (torch.zeros_like(grad),) + (None,) * 8


_round_op.register_autograd(_backward, setup_context=_setup_context)


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
