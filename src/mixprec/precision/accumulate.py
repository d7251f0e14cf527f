"""Emulated accumulation precision (``autocast(..., accumulate=...)``): blocked sums over K.

Hardware accumulates a GEMM's products in a fixed format (fp32 on tensor cores). To study a
narrower accumulator, a matmul-family op is recomputed as a sum of partial products over blocks
of ``block_k`` elements of the reduction dimension K: each block's partial product is computed
in fp32 and the running sum is rounded to the accumulator format after every block is added.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mixprec.formats.float_format import FloatFormat
from mixprec.precision.policy import FormatSpec, resolve_format
from mixprec.quantization.elementwise import round_to

#: K-block size of emulated narrow accumulation when ``accumulate=`` names only a format.
DEFAULT_ACCUMULATE_BLOCK = 32

_BLOCK_BUDGET = 1 << 23  # elements of partial products materialised at once (32 MiB fp32)


@dataclass(frozen=True)
class Accumulate:
    """An emulated accumulator: the running sum is rounded to ``format`` every ``block_k``
    products along K.

    Attributes:
        format: the accumulator's element format (any name, alias, ``eXmY``, FloatFormat or
            torch dtype is accepted and resolved; MX block formats are refused).
        block_k: products of K summed in fp32 before each rounding (a positive int).
    """

    format: FloatFormat
    block_k: int = DEFAULT_ACCUMULATE_BLOCK

    def __post_init__(self) -> None:
        k = self.block_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"accumulate block_k must be a positive int, got {k!r}")
        spec = resolve_format(self.format)  # type: ignore[arg-type]
        if spec.is_mx:
            raise ValueError(
                f"accumulate={spec.name!r}: an accumulator is an element format (float16, "
                "bfloat16, e8m13, ...), not an MX block format"
            )
        object.__setattr__(self, "format", spec.element)

    @classmethod
    def coerce(cls, value: AccumulateLike) -> Accumulate | None:
        """None, an :class:`Accumulate`, a format, or ``(format, block_k)``."""
        if value is None or isinstance(value, Accumulate):
            return value
        if isinstance(value, tuple):
            if len(value) != 2:
                raise ValueError(
                    f"accumulate must be a format or (format, block_k) with block_k a positive "
                    f"int, got {value!r}"
                )
            return cls(*value)
        return cls(value)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.format.name}/{self.block_k}"


FormatLike = str | FloatFormat | FormatSpec | torch.dtype
#: What ``accumulate=`` takes: see :meth:`Accumulate.coerce`.
AccumulateLike = Accumulate | FormatLike | tuple[FormatLike, int] | None


# ----------------------------------------------------------------------------------------------
# blocked products
# ----------------------------------------------------------------------------------------------


def _block_products(a: torch.Tensor, b: torch.Tensor, block: int) -> Iterator[torch.Tensor]:
    """The fp32 partial products ``a_k @ b_k`` of consecutive K-blocks, in order.

    ``a`` and ``b`` are at least 2-d; K is zero padded to whole blocks. Groups of blocks are
    multiplied in one batched call, at most ``_BLOCK_BUDGET`` output elements at a time.
    """
    k = a.shape[-1]
    nb = max(1, -(-k // block))
    pad = nb * block - k
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
        b = torch.nn.functional.pad(b, (0, 0, 0, pad))
    a_b = a.unflatten(-1, (nb, block)).movedim(-2, 0)  # (nb, ..., M, block)
    b_b = b.unflatten(-2, (nb, block)).movedim(-3, 0)  # (nb, ..., block, N)
    out_shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    group = max(1, _BLOCK_BUDGET // max(1, math.prod(out_shape)))
    for g0 in range(0, nb, group):
        yield from torch.matmul(a_b[g0 : g0 + group], b_b[g0 : g0 + group]).unbind(0)


def blocked_matmul(a: torch.Tensor, b: torch.Tensor, acc: FloatFormat, block: int) -> torch.Tensor:
    """``a @ b`` (torch.matmul semantics) accumulated in ``acc`` over blocks of ``block`` of K.

    Each block's partial product is computed in fp32; the running sum is rounded to ``acc``
    after every block is added (the first block initialises it, rounded). No autograd (the
    caller attaches the fp32-accumulation gradient). Cost: one rounding pass over the output
    per block of K.
    """
    squeeze_a, squeeze_b = a.dim() == 1, b.dim() == 1
    parts = _block_products(
        a.unsqueeze(0) if squeeze_a else a, b.unsqueeze(-1) if squeeze_b else b, block
    )
    # round_to: acc is a resolved format, and the loop rounds once per block of K
    total = round_to(next(parts), acc)  # there is at least one block
    for p in parts:
        total.add_(p)
        round_to(total, acc, out=total)
    if squeeze_a:
        total = total.squeeze(-2)
    if squeeze_b:
        total = total.squeeze(-1)
    return total


def accumulated(name: str, args: tuple, kwargs: dict, acc: Accumulate) -> torch.Tensor | None:
    """Blocked-accumulation result of a matmul-family call, or None if not supported."""
    fmt, block = acc.format, acc.block_k
    if name in ("matmul", "mm", "bmm") and len(args) == 2 and not kwargs:
        return blocked_matmul(args[0], args[1], fmt, block)
    if name == "linear":
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        y = blocked_matmul(x, w.t() if w.dim() == 2 else w, fmt, block)
        if bias is not None:
            y.add_(bias)
            round_to(y, fmt, out=y)
        return y
    if name in ("addmm", "baddbmm") and len(args) == 3:
        beta = float(kwargs.get("beta", 1))
        alpha = float(kwargs.get("alpha", 1))
        y = blocked_matmul(args[1], args[2], fmt, block)
        if alpha != 1:
            y.mul_(alpha)
        y.add_(args[0], alpha=beta)
        round_to(y, fmt, out=y)
        return y
    return None
