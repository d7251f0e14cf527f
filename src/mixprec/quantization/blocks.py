"""OCP Microscaling (MX) block formats v1.0: ``mx_quantize``, ``mx_encode``, ``mx_decode``.

An MX block is ``block_size`` (32 in the spec) consecutive elements along one axis that share
one power-of-two scale stored in E8M0 (``float8_e8m0fnu``); each element is stored in a narrow
float format. The spec's conversion (section 6.3) for a block ``V``:

    shared_exp = floor(log2(max_i |V_i|)) - emax_elem        (clamped below at -127)
    X          = 2^shared_exp                                (the E8M0 scale)
    P_i        = quantize_to_element_format(V_i / X)         (normal overflow clamps to ±max)

and the value of element ``i`` is ``X * P_i``. ``emax_elem`` is the exponent of the element
format's largest binade: 8 for E4M3, 15 for E5M2, 4 for E3M2, 2 for E2M3 and E2M1.

Special cases, as the spec has them:

* a block whose largest magnitude is NaN or ±inf gets the NaN scale (E8M0 code ``0xFF``) and
  every element of it decodes to NaN;
* an all-zero block gets the smallest scale, 2^-127 (code 0), and zero elements (signs kept);
* a shared exponent below -127 is clamped to -127 (only float64 inputs, or float32 blocks of
  subnormals, get there); elements then round as they would with that scale;
* a shared exponent above 127 cannot be stored in E8M0 (only float64 inputs beyond ~2^129 get
  there): the block gets the NaN scale, like a float64 to E8M0 cast of such a value.

**Padding.** When the length of ``axis`` is not a multiple of ``block_size``, the last block is
padded with zeros (which never change a block's maximum) and the padding is dropped from the
result: ``mx_quantize`` returns ``x``'s shape, ``mx_encode`` returns element codes of ``x``'s shape
and ``ceil(n / block_size)`` scales along ``axis``.

**Scale rounding** (``scale_rounding=``). The spec's rule above rounds ``log2(amax)`` down
(``"floor"``), which can put a block's largest element above the element maximum (it then
clamps). Hardware and torchao (``ScaleCalculationMode``) offer three more rules, each giving the
shared exponent of a block with largest magnitude ``amax`` (before the same clamping):

* ``"floor"``: ``floor(log2(amax)) - emax_elem`` (OCP MX v1.0, the default);
* ``"ceil"``: ``ceil(log2(amax)) - emax_elem``: ``amax / X <= 2^emax_elem``, never clamps, but
  wastes up to one binade of range;
* ``"even"``: ``floor(log2(amax')) - emax_elem`` where ``amax'`` is ``amax`` rounded to the
  element format's mantissa width (round-to-nearest; a carry into the next binade only happens
  from an all-ones mantissa, where ties-to-even and ties-away agree): the block maximum then
  never rounds past the top binade;
* ``"rceil"``: ``ceil(log2(d))`` with ``d = amax / max_elem`` rounded to the working dtype (fp32
  for fp32/fp16/bf16 inputs): NVIDIA's MXFP8 recipe (cuBLAS block scaling, the
  ``cvt.rp.satfinite.ue8m0`` conversion): the smallest power of two with ``amax / X <= max_elem``
  (up to the rounding of ``d``). A ``d`` that underflows to 0 gets the smallest scale.

Compared with torchao 0.18's ``to_mx`` (float32/bfloat16 inputs), every rule gives the same
scales and elements bit for bit on ordinary blocks. torchao departs from the spec where mixprec
follows it: (1) a block whose scale is 2^-127 (code 0: all-zero or tiny blocks): torchao divides
by 2^-126 (``floor``/``ceil``/``even``) or multiplies by 1 (``rceil``) instead of by 2^127, so
its elements are not ``V_i / X``; (2) a block holding ±inf: torchao gives a finite scale
(``floor``/``ceil``/``even``; code 254 for ``rceil``) and clamped elements, the spec a NaN
scale; (3) ``rceil`` in torchao's eager fallback takes ``ceil(torch.log2(d))``, whose rounded
``log2`` can miss the next power of two when ``d`` lies a few float32 ulps above a power of
two; mixprec decides it exactly from ``d``'s bits, as the hardware conversion does.

**Exactness.** ``floor(log2(amax))`` comes from ``torch.frexp`` (exact, subnormals included), the
scales are built from their bit patterns, and ``x / X`` is a multiplication by an exact power of
two, so the only rounding is the element rounding done by :func:`mixprec.quantize` (bit
exact, every rounding mode). float16/bfloat16 inputs are processed in float32 and the result is
cast back; the cast is exact except for products below that dtype's smallest subnormal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixprec.formats.float_format import FloatFormat, check_flag, check_rounding
from mixprec.formats.mx_format import (
    MXFormat,
    check_scale_rounding,
    get_mx_format,
)
from mixprec.quantization import ops
from mixprec.quantization.elementwise import (
    _check_code_range,
    _check_codes_tensor,
    _check_float_dtype,
    _check_generator,
    _check_tensor,
    _pack_nibbles,
    decode,
    encode,
    extern_when_compiled,
    fused_mx_floor,
    quantize_,
    round_to,
)

# The shared scales' E8M0 constants (exponents -127 .. 127 in codes 0 .. 254, NaN 0xFF, bias
# 127) are read from MXFormat.scale_format, the float8_e8m0fnu FloatFormat.
# Scaled elements below this magnitude all round alike (far below half the smallest element
# subnormal, 2^-17 for E5M2); a nonzero element that underflowed to 0 in the working dtype is
# replaced by it so that up/down/odd rounding still sees "nonzero" (exact results, see below).
_TINY_EXP = -64


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check_args(x: torch.Tensor, block_size: int, axis: int, what: str = "x") -> tuple[int, int]:
    """Validate block_size and axis; returns (normalized axis, ndim-after-0d-promotion)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}: {axis!r}")
    ndim = max(x.dim(), 1)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for {what} with {x.dim()} dimension(s) "
            f"(valid: {-ndim}..{ndim - 1})"
        )
    return axis % ndim, ndim


def _check_call(
    x: object, elem_format: object, block_size: object, axis: object, rounding: object,
    saturate: object, subnormals: object, generator: object, scale_rounding: object,
) -> tuple[MXFormat, int]:  # fmt: skip
    """Every argument of mx_quantize / mx_encode, checked before any work (also for an empty
    ``x``); returns the format and the normalized axis."""
    x = _check_tensor(x)
    mx = get_mx_format(elem_format)  # type: ignore[arg-type]
    ax, _ = _check_args(x, block_size, axis)  # type: ignore[arg-type]
    check_rounding(rounding)
    check_flag(saturate, "saturate")
    check_flag(subnormals, "subnormals")
    _check_generator(generator, x)
    check_scale_rounding(scale_rounding)
    return mx, ax


def _blocked(
    x: torch.Tensor, mx: MXFormat, block_size: int, axis: int, scale_rounding: str
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """(blocks, length along axis, shared exponents, NaN-scale mask): see :func:`_to_blocks`."""
    blocks, n = _to_blocks(x, block_size, axis)
    shared, bad = _shared_exponents(blocks, mx, scale_rounding)
    return blocks, n, shared, bad


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 holds every scale (2^-127 is a float32 subnormal) and every product X * P_i of a
    # float32/16 input exactly; float64 inputs keep float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pow2(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact 2^exponent for integer exponents in [-1022, 1023], from float64 bit patterns."""
    bits = (exponent.to(torch.int64) + 1023) << 52
    return bits.view(torch.float64).to(dtype)


def _to_blocks(x: torch.Tensor, block_size: int, axis: int) -> tuple[torch.Tensor, int]:
    """``x`` in the working dtype as (..., nblocks, block_size), axis moved last, zero padded.

    Copies unless x is already float32/float64, ``axis`` is last and no padding is needed.
    """
    xt = x.reshape(1) if x.dim() == 0 else x
    xt = xt.movedim(axis, -1).to(_work_dtype(x.dtype))
    n = xt.shape[-1]
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    if pad:
        xt = torch.nn.functional.pad(xt, (0, pad))
    return xt.reshape(*xt.shape[:-1], nblocks, block_size), n


def _from_blocks(
    b: torch.Tensor, n: int, axis: int, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`: drop the padding, move the axis back, cast, contiguous."""
    flat = b.reshape(*b.shape[:-2], b.shape[-2] * b.shape[-1])
    if flat.shape[-1] != n:
        flat = flat[..., :n]
    return flat.movedim(-1, axis).to(dtype).contiguous().reshape(shape)


def _unclamped_exponents(amax: torch.Tensor, mx: MXFormat, scale_rounding: str) -> torch.Tensor:
    """The shared exponent of each block by ``scale_rounding`` (int32; meaningful where ``amax``
    is finite and positive). Exact: only ``frexp`` and comparisons, plus ``rceil``'s division,
    which is the rule's own rounding."""
    if scale_rounding == "rceil":
        d = amax / mx.element.max
        m, e = torch.frexp(d)  # d = m * 2^e, m in [0.5, 1): ceil(log2 d) = e - (m == 0.5)
        up = e - (m == 0.5).to(e.dtype)
        return torch.where(d == 0, torch.full_like(up, mx.scale_format.emin), up)
    # frexp: amax = m * 2^e with m in [0.5, 1), exact also for subnormals -> floor(log2) = e - 1
    m, e = torch.frexp(amax)
    log2 = e - 1
    if scale_rounding == "ceil":
        log2 = log2 + (m != 0.5).to(e.dtype)
    elif scale_rounding == "even":
        # amax rounded to the element's mantissa width reaches the next binade exactly when its
        # mantissa is at least 2 - 2^-(mbits+1), i.e. m >= 1 - 2^-(mbits+2)
        carry = m >= 1.0 - 2.0 ** -(mx.element.mantissa_bits + 2)
        log2 = log2 + carry.to(e.dtype)
    return log2 - mx.emax_elem


def _shared_exponents(
    blocks: torch.Tensor, mx: MXFormat, scale_rounding: str = "floor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: (shared exponent as int32 clamped to [-127, 127], NaN-scale mask).

    One read of ``blocks`` (``aminmax``, which propagates NaN, avoids an ``abs`` temporary).
    """
    if blocks.numel() == 0:
        shape = blocks.shape[:-1]
        return (
            torch.zeros(shape, dtype=torch.int32, device=blocks.device),
            torch.zeros(shape, dtype=torch.bool, device=blocks.device),
        )
    lo, hi = torch.aminmax(blocks, dim=-1)
    amax = torch.maximum(hi, -lo)
    shared = _unclamped_exponents(amax, mx, scale_rounding)
    emin, emax = mx.scale_format.emin, mx.scale_format.emax
    shared = torch.where(amax == 0, torch.full_like(shared, emin), shared)
    bad = ~torch.isfinite(amax) | (shared > emax)
    shared = shared.clamp(emin, emax)
    return shared, bad


def _scaled_elements(
    blocks: torch.Tensor, shared: torch.Tensor, bad: torch.Tensor, rounding: str
) -> torch.Tensor:
    """``V_i / X`` per element (a fresh tensor); NaN in NaN-scale blocks.

    The multiplication by ``2^-shared_exp`` is exact unless it underflows the working dtype,
    which needs an element ~2^150 (float32) below its block's maximum. Such an element lies far
    below half the element format's smallest subnormal, so round-to-nearest and toward-zero give
    (signed) zero either way, and a nonzero subnormal product rounds like the true quotient in
    every mode. Only a product that became zero loses information for up/down/odd rounding; it is
    replaced by ±2^-64, which rounds exactly like the true quotient. (Stochastic rounding compares
    32 random bits, so such an element never rounds away from zero either way.)
    """
    inv = _pow2(-shared, blocks.dtype)
    inv = torch.where(bad, torch.full_like(inv, float("nan")), inv)
    scaled = blocks * inv.unsqueeze(-1)
    if rounding in ("up", "down", "odd"):
        # only a product that underflowed to zero loses information: a nonzero (subnormal)
        # result, exact or not, still rounds like the true quotient
        lost = (scaled == 0) & (blocks != 0)
        tiny = torch.full((), 2.0**_TINY_EXP, dtype=scaled.dtype, device=scaled.device)
        scaled = torch.where(lost, torch.copysign(tiny, blocks), scaled)
    return scaled


def mx_scale_exponents(
    x: torch.Tensor,
    elem_format: str | MXFormat | FloatFormat = "float8_e4m3fn",
    *,
    block_size: int = 32,
    axis: int = -1,
    scale_rounding: str = "floor",
) -> torch.Tensor:
    """The shared exponent of every block as float (``log2`` of the scale; NaN for NaN scales).

    Shape: ``x``'s with ``axis`` replaced by the number of blocks. Useful for inspecting how
    much of a tensor's range the blocks use; ``scale_rounding`` as :func:`mx_quantize`. Cost:
    one pass over ``x`` (plus a copy when ``axis`` is not last or padding is needed).
    """
    _check_tensor(x)
    mx = get_mx_format(elem_format)
    ax, _ = _check_args(x, block_size, axis)
    check_scale_rounding(scale_rounding)
    _, _, shared, bad = _blocked(x, mx, block_size, ax, scale_rounding)
    out = shared.to(torch.float32).masked_fill(bad, float("nan"))
    return out.movedim(-1, ax).contiguous().reshape(_blocked_shape(x.shape, ax, out.shape[-1]))


def _blocked_shape(shape: torch.Size, axis: int, nblocks: int) -> tuple[int, ...]:
    dims = list(shape) if len(shape) else [1]
    dims[axis] = nblocks
    return tuple(dims)


# ----------------------------------------------------------------------------------------------
# the block-view path: float32, the spec's "floor" rule, nearest saturating elements
# ----------------------------------------------------------------------------------------------


# _view_params per MX format object, in eager code (format properties cost ~1 us a call, on
# every MX rounding of an emulated region); by id, each entry holding its format so that the id
# stays that format's
_VIEW_PARAMS: dict[int, tuple[MXFormat, tuple[float, float] | None]] = {}


def _view_params(mx: MXFormat) -> tuple[float, float] | None:
    """(``2^-emax_elem``, the smallest E8M0 scale) of ``mx``, or None when a float32 block
    maximum could need a scale above E8M0's largest (no spec format does)."""
    compiling = torch.compiler.is_compiling()  # dynamo traces the plain computation
    hit = None if compiling else _VIEW_PARAMS.get(id(mx))
    if hit is not None:
        return hit[1]
    sf = mx.scale_format
    params = None
    if mx.emax_elem >= 0 and 127 - mx.emax_elem <= sf.emax:
        params = 2.0**-mx.emax_elem, 2.0**sf.emin
    if not compiling:
        if len(_VIEW_PARAMS) > 256:  # formats made on the fly: keep the table small
            _VIEW_PARAMS.clear()
        _VIEW_PARAMS[id(mx)] = (mx, params)
    return params


def _view_scales(amax: torch.Tensor, down: float, smallest: float) -> torch.Tensor:
    """``2^shared_exp`` of each block by the "floor" rule, NaN for blocks holding inf or NaN.

    ``2^floor(log2 amax)`` is amax with its mantissa bits cleared (0 for a subnormal amax,
    whose shared exponent clamps to E8M0's smallest anyway), times ``2^-emax_elem``, clamped
    below at E8M0's smallest scale: :func:`_shared_exponents`' values in a few tiny ops.
    """
    p2 = (amax.view(torch.int32) & 0x7F800000).view(torch.float32)
    scale = (p2 * down).clamp_min_(smallest)
    # torch's NaN, as the general path's: amax's own NaN bits vary with the reduction's path
    return torch.where(torch.isfinite(amax), scale, float("nan"))


def _block_view(x: torch.Tensor, axis: int, size: int) -> tuple[torch.Tensor, int]:
    """Contiguous ``x``, whose length along ``axis`` is a multiple of ``size``, as
    ``(..., nblocks, size, ...)``, and the block dimension."""
    n = x.shape[axis]
    return x.view(*x.shape[:axis], n // size, size, *x.shape[axis + 1 :]), axis + 1


def _views_round(
    x: torch.Tensor, mx: MXFormat, size: int, axis: int, params: tuple[float, float]
) -> torch.Tensor:
    """The blocks of ``size`` elements along ``axis`` (a multiple of ``size`` long) of float32
    ``x``, rounded in views (``params``: :func:`_view_params`): :func:`_round_in_views`' torch
    ops. A fresh contiguous tensor."""
    xb, dim = _block_view(x.contiguous(), axis, size)
    scale = _view_scales(xb.abs().amax(dim=dim, keepdim=True), *params)
    # x / 2^k is x * 2^-k exactly (both correctly rounded, same real value); NaN blocks: NaN
    scaled = xb / scale
    round_to(scaled, mx.element, saturate=True, out=scaled)
    return scaled.mul_(scale).view(x.shape)  # exact: the rounded elements times 2^k


def _round_in_views(
    x: torch.Tensor, mx: MXFormat, block: int, axis: int, *, keep_layout: bool = False
) -> torch.Tensor | None:
    """:func:`mx_quantize` with the defaults (nearest, saturating, subnormals, "floor") for a
    float32 ``x``, bit for bit, with the blocks as a *view* of the contiguous tensor
    ``(..., nblocks, block, ...)`` reduced along their own dimension: no axis moves (the
    general path moves ``axis`` last and back, two copies, and reduces 32-element rows with
    ``aminmax``, slow on CPU). None where it does not apply (the general path decides).

    Cost: one pass for the block maxima (an ``abs`` temporary), one allocation for the scaled
    copy, rounded and rescaled in place; tiny ops on the per-block scales; for a ragged axis,
    copies of the whole blocks and of the last block, and their concatenation. No device sync.
    """
    params = _view_params(mx)
    if params is None or x.dtype != torch.float32 or x.dim() == 0 or not x.numel():
        return None
    # the same, in one C call (in x's layout with keep_layout: see fused_mx_floor)
    fused = fused_mx_floor(x, mx.element, block, axis, *params, keep_layout=keep_layout)
    if fused is not None:
        return fused
    size = min(x.shape[axis], block)
    if x.shape[axis] % size == 0:
        return _views_round(x, mx, size, axis, params)
    return _ragged_apart(x, axis, size, lambda part, n: _views_round(part, mx, n, axis, params))


def _ragged_apart(
    x: torch.Tensor, axis: int, size: int, round_blocks: Callable[[torch.Tensor, int], torch.Tensor]
) -> torch.Tensor:
    """``x``, whose length along ``axis`` exceeds a multiple of ``size``, rounded as its whole
    blocks of ``size`` and its short last block (a block of its own length), each part by
    ``round_blocks(part, block size)``, then concatenated. No zero padding: inductor (torch
    2.13) miscompiles a block reduction over a zero-padded view whose cut-back result is
    returned, reading past the data. Cost: the two parts' copies and the concatenation."""
    n = x.shape[axis]
    whole = n - n % size
    head = round_blocks(x.narrow(axis, 0, whole), size)
    return torch.cat([head, round_blocks(x.narrow(axis, whole, n - whole), n - whole)], axis)


def _quantize_blocks(
    x: torch.Tensor, mx: MXFormat, block_size: int, axis: int, rounding: str, saturate: bool,
    subnormals: bool, generator: torch.Generator | None, scale_rounding: str,
) -> torch.Tensor:  # fmt: skip
    """The general path of :func:`mx_quantize` (checked arguments, ``axis`` normalised)."""
    if x.numel() == 0:
        return x.clone()
    n = x.shape[axis] if x.dim() else 1
    if torch.compiler.is_compiling() and n > block_size and n % block_size:
        # traced: no zero padding (_ragged_apart); eager keeps one pass, whose stochastic draws
        # follow the elements' order
        rest = (axis, rounding, saturate, subnormals, generator, scale_rounding)
        return _ragged_apart(
            x, axis, block_size, lambda part, size: _quantize_blocks(part, mx, size, *rest)
        )
    blocks, n, shared, bad = _blocked(x, mx, block_size, axis, scale_rounding)
    scaled = _scaled_elements(blocks, shared, bad, rounding)
    quantize_(
        scaled, mx.element, rounding=rounding, saturate=saturate, subnormals=subnormals,
        generator=generator,
    )  # fmt: skip
    scale = _pow2(shared, scaled.dtype)  # NaN scales already made the elements NaN
    scaled.mul_(scale.unsqueeze(-1))  # exact: P_i * 2^k lies in the working dtype's range
    return _from_blocks(scaled, n, axis, x.shape, x.dtype)


def mx_round_to(
    x: torch.Tensor,
    mx: MXFormat | FloatFormat,
    block_size: int,
    axis: int,
    scale_rounding: str = "floor",
) -> torch.Tensor:
    """``mx_quantize(x, mx, block_size=block_size, axis=axis, scale_rounding=scale_rounding)``
    without its argument checks, for callers that validated once (the emulated regions round
    every GEMM operand with it): the unchecked seam, as :func:`round_to` is for elements.
    ``x`` must have a dimension ``axis``; ``mx`` an MX format or element format. Autograd does
    not see its float32 rounding: the result is detached on every path (callers attach their
    own gradient). Unlike ``mx_quantize``, the result keeps ``x``'s layout where ``x`` is a
    permutation of a contiguous one and the fused kernel serves it (a transposed operand: no
    transposing copy, and the GEMM then sums in the order it does in float32). While
    torch.compile traces a CPU graph, operands of 32k elements or more are rounded by the op
    ``mixprec::mx_round`` (:func:`~.ops.mx_round_op`: the C kernel, an extern call); smaller
    ones, and every operand off the CPU, by traced torch ops that inductor fuses."""
    fmt = get_mx_format(mx)
    ax = axis % x.dim() if x.dim() else 0
    if x.requires_grad:  # every path's result detached, as the kernel's is
        x = x.detach()
    if torch.compiler.is_compiling() and extern_when_compiled(x):
        return ops.mx_round_op(x, fmt.element, block_size, ax, scale_rounding)
    if scale_rounding == "floor":
        out = _round_in_views(x, fmt, block_size, ax, keep_layout=True)
        if out is not None:
            return out
    return _quantize_blocks(x, fmt, block_size, ax, "nearest", True, True, None, scale_rounding)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def mx_quantize(
    x: torch.Tensor,
    elem_format: str | MXFormat | FloatFormat = "float8_e4m3fn",
    *,
    block_size: int = 32,
    axis: int = -1,
    rounding: str = "nearest",
    saturate: bool = True,
    subnormals: bool = True,
    generator: torch.Generator | None = None,
    scale_rounding: str = "floor",
) -> torch.Tensor:
    """Round ``x`` to an MX format: blocks along ``axis`` share an E8M0 power-of-two scale.

    Args:
        x: float32, float64, float16 or bfloat16 tensor of any shape and device.
        elem_format: ``"mxfp8_e4m3"``, ``"mxfp8_e5m2"``, ``"mxfp6_e3m2"``, ``"mxfp6_e2m3"``,
            ``"mxfp4_e2m1"``, an element format name (``"float8_e4m3fn"``, ``"e2m1"``, ...),
            an :class:`MXFormat` or a :class:`~mixprec.formats.FloatFormat`.
        block_size: elements per shared scale (the spec's 32); the last block along ``axis``
            is zero-padded when the length is not a multiple (padding never changes a scale).
        axis: the dimension the blocks run along (for a matmul ``A @ B``: ``-1`` for ``A``,
            ``0`` for ``B``, the reduction dimension).
        rounding: element rounding, one of :data:`mixprec.ROUNDING_MODES`;
            ``"stochastic"`` draws from ``generator``.
        saturate: the spec clamps elements that overflow (``V_i / X`` can round past the
            element max, e.g. 480 in E4M3) to ±max; ``False`` gives the element format's
            non-saturating overflow (NaN for E4M3, inf for E5M2; fp6/fp4 always saturate).
        subnormals: ``False`` flushes element subnormals to zero.
        scale_rounding: how a block's shared exponent is chosen from its largest magnitude:
            ``"floor"`` (the spec's rule), ``"ceil"``, ``"even"`` or ``"rceil"`` (NVIDIA's
            MXFP8 recipe); see the module docstring. Each matches torchao's
            ``ScaleCalculationMode`` of that name bit for bit on ordinary blocks.

    Returns a tensor of ``x``'s dtype and shape (contiguous) whose values are ``X * P_i``.
    NaN or inf anywhere in a block makes the whole block NaN (the spec's NaN scale).

    Cost: with the defaults on float32 (nearest, saturating, subnormals, "floor"): the blocks
    as a view of ``x`` (no axis moves), one pass for the block maxima, one allocation for the
    scaled elements, rounded and rescaled in place. Otherwise: a working copy of ``x`` in
    float32/float64 blocks (free when ``x`` is contiguous float32/float64, ``axis`` is last
    and needs no padding), one reduction pass for the scales, one allocation for the scaled
    elements, and a copy back when ``axis`` is not last or ``x`` is float16/bfloat16. No device
    sync (except stochastic rounding's one seed draw on CUDA generators).
    """
    mx, ax = _check_call(
        x, elem_format, block_size, axis, rounding, saturate, subnormals, generator,
        scale_rounding,
    )  # fmt: skip
    defaults = rounding == "nearest" and saturate and subnormals and scale_rounding == "floor"
    # (not under autograd: the view path rounds through ``out=``, which autograd does not see,
    # while mx_quantize's gradient is zero like quantize's)
    if defaults and not (x.requires_grad and torch.is_grad_enabled()):
        out = _round_in_views(x, mx, block_size, ax)  # the defaults on float32: no axis moves
        if out is not None:
            return out
    return _quantize_blocks(
        x, mx, block_size, ax, rounding, saturate, subnormals, generator, scale_rounding
    )


def mx_encode(
    x: torch.Tensor,
    elem_format: str | MXFormat | FloatFormat = "float8_e4m3fn",
    *,
    block_size: int = 32,
    axis: int = -1,
    rounding: str = "nearest",
    saturate: bool = True,
    subnormals: bool = True,
    generator: torch.Generator | None = None,
    pack: bool = False,
    scale_rounding: str = "floor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` in an MX format: ``(scales, codes)``.

    Returns:
        scales: uint8 E8M0 codes (``2^(code - 127)``, ``0xFF`` = NaN), shape of ``x`` with
            ``axis`` replaced by ``ceil(n / block_size)``.
        codes: uint8 element codes (see :func:`mixprec.encode`), shape of ``x``
            (padding dropped). Elements of NaN-scale blocks get code 0 (the spec ignores them;
            fp6/fp4 have no NaN code). ``pack=True`` (MXFP4 only) stores two codes per byte
            along the last dimension, first element in the low nibble; it needs an even last
            dimension.

    Same arguments and rounding (``scale_rounding`` included) as :func:`mx_quantize`;
    ``mx_decode(*mx_encode(x, f), f, dtype=x.dtype) == mx_quantize(x, f)`` (the same random
    draws too, given equally seeded generators). Cost: as ``mx_quantize`` plus the encoding
    passes of :func:`mixprec.encode` (int64 temporaries; one device sync for its NaN
    check).
    """
    mx, ax = _check_call(
        x, elem_format, block_size, axis, rounding, saturate, subnormals, generator,
        scale_rounding,
    )  # fmt: skip
    if check_flag(pack, "pack") and mx.element.bits > 4:
        raise ValueError(f"pack=True needs a 4-bit element format (mxfp4); got {mx.name}")
    blocks, n, shared, bad = _blocked(x, mx, block_size, ax, scale_rounding)
    sf = mx.scale_format
    scales = torch.where(bad, sf.nan_code, shared + sf.bias).to(torch.uint8)
    nblocks = scales.shape[-1]
    scales = scales.movedim(-1, ax).contiguous().reshape(_blocked_shape(x.shape, ax, nblocks))
    if x.numel() == 0:
        codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    else:
        scaled = _scaled_elements(blocks, shared, bad, rounding)
        scaled = torch.where(bad.unsqueeze(-1), torch.zeros_like(scaled), scaled)
        codes = encode(
            scaled, mx.element, rounding=rounding, saturate=saturate, subnormals=subnormals,
            generator=generator,
        )  # fmt: skip
        codes = _from_blocks(codes, n, ax, x.shape, torch.uint8)
    if pack:
        codes = _pack_nibbles(codes, mx.element)
    return scales, codes


def mx_decode(
    scales: torch.Tensor,
    codes: torch.Tensor,
    elem_format: str | MXFormat | FloatFormat = "float8_e4m3fn",
    *,
    block_size: int = 32,
    axis: int = -1,
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, ...] | torch.Size | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """Values of MX-encoded data: ``2^(scale - 127) * element`` per element, as ``dtype``.

    Args:
        scales: integer tensor of E8M0 codes (``0xFF`` = NaN), one per block.
        codes: integer tensor of element codes; along ``axis`` either the true length ``n``
            or padded to whole blocks (``ceil(n / block_size) * block_size``), where ``n`` is
            given by ``shape``. With ``packed=True`` two 4-bit codes per byte along the last
            dimension (as ``mx_encode(..., pack=True)`` writes them).
        shape: the output shape; by default the (unpacked) shape of ``codes``. Give it to crop
            padded codes.

    Raises ``ValueError`` when the shapes of ``scales``, ``codes`` and ``shape`` disagree, and
    for codes or scales out of range (naming the first; see :func:`mixprec.decode`).
    Cost: one table look-up pass (:func:`mixprec.decode`), one multiply, and a copy
    when ``axis`` is not last. The range checks cost one host sync each, except where the
    dtype cannot hold a bad value (uint8/int8 scales, and codes of the 8-bit formats).
    """
    mx = get_mx_format(elem_format)
    _check_codes_tensor(scales, "scales")
    _check_codes_tensor(codes, "codes")
    sf = mx.scale_format
    _check_code_range(scales, sf.bits, f"{sf.name} scales", "scales")
    if check_flag(packed, "packed") and mx.element.bits > 4:
        raise ValueError(f"packed=True needs a 4-bit element format (mxfp4); got {mx.name}")
    work = _work_dtype(_check_float_dtype(dtype))
    values = decode(codes, mx.element, dtype=work, packed=packed)
    ax, _ = _check_args(values, block_size, axis, "codes")
    out_shape = _decode_shape(values, ax, axis, shape)
    n = out_shape[ax] if out_shape else 1
    nblocks = -(-n // block_size)
    blocks = _value_blocks(values, ax, axis, n, block_size)
    expected = _blocked_shape(torch.Size(out_shape), ax, nblocks)
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"scales have shape {tuple(scales.shape)}; expected {expected} for {n} elements "
            f"along axis {axis} in blocks of {block_size}"
        )
    sc = scales.reshape(expected).movedim(ax, -1).to(torch.int64) & ((1 << sf.bits) - 1)
    scale = _pow2(sc - sf.bias, work)
    scale = torch.where(sc == sf.nan_code, torch.full_like(scale, float("nan")), scale)
    blocks = blocks * scale.unsqueeze(-1)
    return _from_blocks(blocks, n, ax, torch.Size(out_shape), dtype)


def _decode_shape(
    values: torch.Tensor, ax: int, axis: int, shape: tuple[int, ...] | torch.Size | None
) -> tuple[int, ...]:
    """The output shape: ``shape``, or the codes' own; they may differ only along ``axis``."""
    out_shape = tuple(values.shape) if shape is None else tuple(int(s) for s in shape)
    if len(out_shape) != values.dim() or any(
        a != b for i, (a, b) in enumerate(zip(out_shape, values.shape, strict=True)) if i != ax
    ):
        raise ValueError(
            f"shape {out_shape} does not match codes of shape {tuple(values.shape)} "
            f"(they may differ only along axis {axis})"
        )
    return out_shape


def _value_blocks(
    values: torch.Tensor, ax: int, axis: int, n: int, block_size: int
) -> torch.Tensor:
    """Decoded element values as (..., nblocks, block_size), ``ax`` moved last.

    The codes hold ``n`` elements along ``ax``, or that many padded to whole blocks.
    """
    nblocks = -(-n // block_size)
    length = values.shape[ax] if values.dim() else 1
    if length not in (n, nblocks * block_size):
        raise ValueError(
            f"codes have {length} elements along axis {axis}; expected {n} or "
            f"{nblocks * block_size} (padded to whole blocks of {block_size})"
        )
    vals = values.reshape(1) if values.dim() == 0 else values
    vals = vals.movedim(ax, -1)
    if length != nblocks * block_size:  # unpadded codes: pad the last block with zeros
        vals = torch.nn.functional.pad(vals, (0, nblocks * block_size - length))
    return vals.reshape(*vals.shape[:-1], nblocks, block_size)
