"""MX block rounding for emulated regions: :func:`mixprec.mx_quantize`'s values, in place of it.

Why a second path: an emulated MX region rounds every GEMM operand and gradient, many of them
along an axis that is not the last (``B`` of ``A @ B`` along its rows, a conv weight along its
input channels). :func:`~mixprec.mx_quantize` moves the axis last (a copy), finds each block's
maximum with ``aminmax`` over 32-element rows (slow on CPU), and moves the axis back (another
copy). Here the blocks are a *view* of the contiguous tensor, ``(..., nblocks, block, ...)``,
reduced along their own dimension, so no copy is made and the result keeps the input's layout.

Bit-identical to ``mx_quantize(x, mx, block_size=block, axis=axis, scale_rounding="floor")``
(nearest rounding, saturating, subnormals kept): the same shared exponents (``frexp`` of the
same block maxima, NaN/inf blocks giving NaN), the same exact power-of-two scaling and the same
element rounding (:func:`mixprec.quantization.round_to`). A ragged last block is zero padded
(one copy); other cases (float16/bfloat16/float64 input, other scale rules) call
``mx_quantize``.
"""

from __future__ import annotations

import torch

from mixprec.formats.float_format import FloatFormat
from mixprec.formats.mx_format import MXFormat, get_mx_format
from mixprec.precision._tracing import trace_cache
from mixprec.quantization.blocks import mx_quantize
from mixprec.quantization.elementwise import round_to


@trace_cache(maxsize=64)
def _scale_params(element: FloatFormat) -> tuple[float, float] | None:
    """(``2^-emax_elem``, the smallest E8M0 scale) of ``element``'s MX format, or None when a
    float32 block maximum could need a scale above E8M0's largest (no such format exists)."""
    mx: MXFormat = get_mx_format(element)
    sf = mx.scale_format
    if mx.emax_elem < 0 or 127 - mx.emax_elem > sf.emax:
        return None
    return 2.0**-mx.emax_elem, 2.0**sf.emin


def _block_scales(amax: torch.Tensor, down: float, smallest: float) -> torch.Tensor:
    """``2^shared_exp`` of each block (the "floor" rule), NaN for blocks holding inf or NaN.

    ``2^floor(log2 amax)`` is amax with its mantissa bits cleared (0 for a subnormal amax,
    whose shared exponent clamps to E8M0's smallest anyway), times ``2^-emax_elem``, clamped
    below at E8M0's smallest scale: the values ``frexp`` gives :func:`mixprec.mx_quantize`, in
    a few tiny ops.
    """
    p2 = (amax.view(torch.int32) & 0x7F800000).view(torch.float32)
    scale = (p2 * down).clamp_min_(smallest)
    # torch's NaN, as mx_quantize's: amax's own NaN bits vary with the reduction's vector path
    return torch.where(torch.isfinite(amax), scale, float("nan"))


def _block_view(x: torch.Tensor, axis: int, block: int) -> tuple[torch.Tensor, int]:
    """Contiguous ``x`` as ``(..., nblocks, size, ...)`` along ``axis`` and the block dimension.

    A length above ``block`` that it does not divide is zero padded (a copy; padding zeros
    never change a block's maximum); a shorter one is one short block."""
    n = x.shape[axis]
    size = min(n, block)
    pad = -n % size
    if pad:
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1 - axis) + (0, pad))
    shape = (*x.shape[:axis], (n + pad) // size, size, *x.shape[axis + 1 :])
    return x.view(shape), axis + 1


def mx_round(
    x: torch.Tensor, element: FloatFormat, block: int, axis: int, scale_rounding: str
) -> torch.Tensor:
    """``x`` rounded to the MX format of ``element`` in blocks of ``block`` along ``axis``.

    A fresh contiguous tensor of ``x``'s shape. Cost: one pass for the block maxima (an ``abs``
    temporary), one allocation for the scaled copy, rounded and rescaled in place; tiny ops on
    the per-block exponents. No axis moves, no device sync.
    """
    params = _scale_params(element)
    if x.dtype != torch.float32 or scale_rounding != "floor" or x.dim() == 0 or not x.numel():
        params = None
    if params is None:
        return mx_quantize(x, element, block_size=block, axis=axis, scale_rounding=scale_rounding)
    ax = axis % x.dim()
    xb, dim = _block_view(x.contiguous(), ax, block)
    scale = _block_scales(xb.abs().amax(dim=dim, keepdim=True), *params)
    # x / 2^k is x * 2^-k exactly (both correctly rounded, same real value); NaN blocks: NaN
    scaled = xb / scale
    round_to(scaled, element, saturate=True, out=scaled)
    scaled = scaled.mul_(scale)  # exact: the rounded elements times 2^k
    if scaled.numel() == x.numel():
        return scaled.view(x.shape)
    flat = scaled.flatten(dim - 1, dim)  # drop the padding
    return flat.narrow(ax, 0, x.shape[ax]).contiguous()
