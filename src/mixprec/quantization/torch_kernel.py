"""Device-agnostic quantization kernel in plain torch integer ops.

The same algorithm as ``_kernels.c`` (read its header comment), written with tensor ops so it
runs wherever torch runs (CUDA, MPS, CPU without a C compiler). Bit-exact and FTZ/DAZ-proof for
the deterministic modes; stochastic rounding draws its random bits with ``torch.randint`` (so a
``torch.Generator`` makes it reproducible on this path too, with a different stream from the C
kernel's). Every intermediate is int64: twice the memory traffic of int32, but no unsigned
arithmetic is needed, which torch lacks on several devices.

:func:`quantize_bits_compiled` (``MIXPREC_BACKEND=torch-compiled``) is the same algorithm as one
torch.compile'd function of tensor parameters, giving the same bits (see the section at the end).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import lru_cache

import torch

from mixprec.quantization.params import (
    F_FLUSH,
    F_NEG_NAN,
    F_NO_NEGZERO,
    ROUNDING_CODES,
    KernelParams,
)

_LAYOUT = {32: (23, 127, torch.int32), 64: (52, 1023, torch.int64)}
# torch.where, or the compiled function's bitwise select (see _pick)
Select = Callable[[torch.Tensor, torch.Tensor | int, torch.Tensor | int], torch.Tensor]


def ilog2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2(v)) for 0 < v < 2^53 (int64), exact via the float64 exponent field."""
    return (v.to(torch.float64).view(torch.int64) >> 52) - 1023


_CPU_CHUNK = 1 << 15  # ~30 int64 temporaries of this size stay in cache: ~9x faster on CPU


def quantize_bits(
    x: torch.Tensor,
    p: KernelParams,
    rounding: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Round a float32/float64 tensor; returns a new tensor of the same dtype.

    On CPU, large tensors are processed in cache-sized chunks (same results, chunk by chunk).
    """
    if x.device.type == "cpu" and x.numel() > 2 * _CPU_CHUNK:
        flat = x.reshape(-1)
        out = torch.empty_like(flat)
        for start in range(0, flat.numel(), _CPU_CHUNK):
            chunk = flat[start : start + _CPU_CHUNK]
            out[start : start + _CPU_CHUNK] = _quantize_bits(chunk, p, rounding, generator)
        return out.reshape(x.shape)
    return _quantize_bits(x, p, rounding, generator)


def _quantize_bits(
    x: torch.Tensor,
    p: KernelParams,
    rounding: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    P, _, itype = _LAYOUT[p.width]
    mode = ROUNDING_CODES[rounding]
    u = x.contiguous().view(itype).to(torch.int64) & ((1 << p.width) - 1)
    neg = (u & (1 << (p.width - 1))) != 0
    a = u & ((1 << (p.width - 1)) - 1)  # magnitude bits
    m, ulp_in = _significand(a, P, p.width, torch.where)
    e = ilog2(m) + ulp_in
    qe = e.clamp(min=p.emin) - p.mantissa_bits  # exponent of the target's quantum at x
    d = qe - ulp_in  # bits to drop
    k = _round_significand(m, d, neg, mode, p, x.shape, generator)
    r = torch.where(d <= 0, a, _rebuild(k, qe, p.width, torch.where))
    out = _finish(r, a, u, neg, mode, p)
    if p.width == 32:
        out = torch.where(out >= 1 << 31, out - (1 << 32), out)
    return out.to(itype).view(x.dtype).reshape(x.shape)


def _significand(
    a: torch.Tensor, P: int, width: int, where: Select
) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer significand with the implicit bit, exponent of its last bit) of magnitudes."""
    bias = _LAYOUT[width][1]
    ef = a >> P
    mant = a & ((1 << P) - 1)
    m = where(ef > 0, mant | (1 << P), mant)
    return m, ef.clamp(min=1) - (bias + P)


def _round_significand(
    m: torch.Tensor,
    d: torch.Tensor,
    neg: torch.Tensor,
    mode: int,
    p: KernelParams,
    shape: torch.Size,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``m`` with its low ``d`` bits rounded off (per ``mode``): the target's significand k."""
    dc = d.clamp(1, _LAYOUT[p.width][0] + 2)
    one = torch.ones_like(dc)
    k = m >> dc
    rem = m & ((one << dc) - 1)
    half = one << (dc - 1)
    inexact = rem != 0
    if mode == ROUNDING_CODES["nearest"]:
        return k + ((rem > half) | ((rem == half) & ((k & 1) == 1))).to(torch.int64)
    if mode == ROUNDING_CODES["stochastic"]:
        return k + _stochastic_carry(m, d, rem, p.width, shape, generator)
    if mode == ROUNDING_CODES["up"]:
        return k + (inexact & ~neg).to(torch.int64)
    if mode == ROUNDING_CODES["down"]:
        return k + (inexact & neg).to(torch.int64)
    if mode == ROUNDING_CODES["odd"]:
        return k | inexact.to(torch.int64)
    return k  # toward_zero: truncation


def _stochastic_carry(
    m: torch.Tensor,
    d: torch.Tensor,
    rem: torch.Tensor,
    width: int,
    shape: torch.Size,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """1 where a uniform random draw falls below the dropped fraction ``rem / 2^d``, else 0."""
    r_bits = 62 if width == 64 else 32
    rnd = torch.randint(
        0, 1 << r_bits, shape, generator=generator, device=m.device, dtype=torch.int64
    ).reshape(m.shape)
    dd = d.clamp(1, r_bits + 63)
    up_shift = (r_bits - dd).clamp(min=0)
    down_shift = (dd - r_bits).clamp(0, 63)
    thr = torch.where(dd <= r_bits, rem << up_shift, m >> down_shift)
    return (rnd < thr).to(torch.int64)


def _rebuild(k: torch.Tensor, qe: torch.Tensor, width: int, where: Select) -> torch.Tensor:
    """The container bits of ``k * 2^qe`` (normal, subnormal, inf on overflow, 0 for k = 0)."""
    P, bias, _ = _LAYOUT[width]
    inf_bits = ((1 << (width - 1 - P)) - 1) << P
    safe_k = k.clamp(min=1)
    lk = ilog2(safe_k)
    big_e = lk + qe
    frac = (safe_k << (P - lk).clamp(min=0)) & ((1 << P) - 1)
    normal = ((big_e + bias).clamp(min=0) << P) | frac
    sub = k << (qe + (bias - 1 + P)).clamp(0, 62)
    r = where(big_e >= 1 - bias, normal, sub)
    r = where(big_e > bias, torch.full_like(r, inf_bits), r)
    return where(k == 0, torch.zeros_like(r), r)


def _finish(
    r: torch.Tensor, a: torch.Tensor, u: torch.Tensor, neg: torch.Tensor, mode: int,
    p: KernelParams,
) -> torch.Tensor:  # fmt: skip
    """Overflow, flush, zero, sign and NaN rules applied to rounded magnitude bits ``r``."""
    P = _LAYOUT[p.width][0]
    inf_bits = ((1 << (p.width - 1 - P)) - 1) << P
    r = torch.where(r > p.max_bits, _overflow_bits(r, a == inf_bits, neg, mode, p), r)
    if p.flags & F_FLUSH:
        r = torch.where(r < p.minnorm_bits, torch.zeros_like(r), r)
    r = torch.where(r == 0, torch.full_like(r, p.zero_bits), r)
    if p.flags & F_NEG_NAN:
        nan = torch.full_like(r, inf_bits | (1 << (P - 1)))
        out = torch.where(neg & (a != 0), nan, r)
    else:
        s = neg
        if p.flags & F_NO_NEGZERO:
            s = s & (r != 0)
        out = r | (s.to(torch.int64) << (p.width - 1))
    return torch.where(a > inf_bits, u | (1 << (P - 1)), out)  # NaN in: quiet NaN out


def _overflow_bits(
    r: torch.Tensor, is_inf: torch.Tensor, neg: torch.Tensor, mode: int, p: KernelParams
) -> torch.Tensor:
    """What an overflowing result becomes: the overflow value, or max in a directed mode
    rounding toward zero from a finite input (IEEE 754 section 7.4)."""
    ovf = torch.full_like(r, p.ovf_bits)
    mx = torch.full_like(r, p.max_bits)
    if mode in (ROUNDING_CODES["nearest"], ROUNDING_CODES["stochastic"]):
        return ovf
    if mode == ROUNDING_CODES["up"]:
        return torch.where(is_inf | ~neg, ovf, mx)
    if mode == ROUNDING_CODES["down"]:
        return torch.where(is_inf | neg, ovf, mx)
    return torch.where(is_inf, ovf, mx)


# ----------------------------------------------------------------------------------------------
# compiled variant (MIXPREC_BACKEND=torch-compiled)
# ----------------------------------------------------------------------------------------------
#
# One generic function of (x, params, random bits): the format and the rounding mode are tensor
# inputs and every mode's result is computed and selected (see _pick), so torch.compile
# (dynamic shapes, on flattened tensors) builds one graph per input dtype for the deterministic
# modes and one for stochastic rounding (which takes its random bits as an extra input), never
# one per format, mode or size. The bits are those of the eager kernel above: same algorithm,
# and stochastic rounding consumes the generator exactly as the eager path does.

# layout of the parameter tensor
_M, _EMIN, _MAX, _OVF, _MINNORM, _ZERO, _FLAGS, _MODE = range(8)


@lru_cache(maxsize=512)
def _param_tensor(p: KernelParams, mode: int, device: torch.device) -> torch.Tensor:
    """The kernel parameters as one int64 tensor on ``device`` (cached: no copy per call)."""
    values = [p.mantissa_bits, p.emin, p.max_bits, p.ovf_bits, p.minnorm_bits, p.zero_bits,
              p.flags, mode]  # fmt: skip
    return torch.tensor(values, dtype=torch.int64, device=device)


def _random_bits(x: torch.Tensor, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """The stochastic bits the eager path draws for ``x`` (flattened), in the same calls: per
    chunk on CPU for large tensors, else one draw."""
    r_bits = 62 if width == 64 else 32
    n = x.numel()

    def draw(count: int) -> torch.Tensor:
        return torch.randint(0, 1 << r_bits, (count,), generator=generator, device=x.device,
                             dtype=torch.int64)  # fmt: skip

    if x.device.type == "cpu" and n > 2 * _CPU_CHUNK:
        return torch.cat([draw(min(_CPU_CHUNK, n - s)) for s in range(0, n, _CPU_CHUNK)])
    return draw(n)


def _pick(cond: torch.Tensor, a: torch.Tensor | int, b: torch.Tensor | int) -> torch.Tensor:
    """``torch.where(cond, a, b)`` for int64 values, as a bitwise blend.

    The compiled function selects with this, not ``torch.where``: inductor's AVX2 code for an
    int64 ``where`` whose operands are computed in the same kernel returns wrong values (torch
    2.13; its AVX-512 code is right), which the tests showed under ``ATEN_CPU_CAPABILITY=avx2``
    and now check with ``cpp.simdlen`` 256. Masks and ors are exact on every ISA, and fuse.
    """
    mask = -cond.to(torch.int64)  # all ones where cond
    return (a & mask) | (b & ~mask)


def _select_mode(mode: torch.Tensor, by_mode: dict[str, torch.Tensor]) -> torch.Tensor:
    """by_mode[name] where mode == ROUNDING_CODES[name] (toward_zero otherwise)."""
    out = by_mode["toward_zero"]
    for name, value in by_mode.items():
        out = _pick(mode == ROUNDING_CODES[name], value, out)
    return out


def _round_any_mode(
    m: torch.Tensor, d: torch.Tensor, neg: torch.Tensor, mode: torch.Tensor, width: int,
    rnd: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """:func:`_round_significand` with the mode as a tensor: every mode, then a select."""
    dc = d.clamp(1, _LAYOUT[width][0] + 2)
    one = torch.ones_like(dc)
    k = m >> dc
    rem = m & ((one << dc) - 1)
    half = one << (dc - 1)
    inexact = rem != 0
    by_mode = {
        "toward_zero": k,
        "nearest": k + ((rem > half) | ((rem == half) & ((k & 1) == 1))).to(torch.int64),
        "up": k + (inexact & ~neg).to(torch.int64),
        "down": k + (inexact & neg).to(torch.int64),
        "odd": k | inexact.to(torch.int64),
    }
    if rnd is not None:
        by_mode["stochastic"] = k + _carry(m, d, rem, width, rnd)
    return _select_mode(mode, by_mode)


def _carry(
    m: torch.Tensor, d: torch.Tensor, rem: torch.Tensor, width: int, rnd: torch.Tensor
) -> torch.Tensor:
    """:func:`_stochastic_carry` with the random bits given."""
    r_bits = 62 if width == 64 else 32
    dd = d.clamp(1, r_bits + 63)
    up_shift = (r_bits - dd).clamp(min=0)
    down_shift = (dd - r_bits).clamp(0, 63)
    thr = _pick(dd <= r_bits, rem << up_shift, m >> down_shift)
    return (rnd < thr).to(torch.int64)


def _finish_any(
    r: torch.Tensor, a: torch.Tensor, u: torch.Tensor, neg: torch.Tensor, prm: torch.Tensor,
    width: int,
) -> torch.Tensor:  # fmt: skip
    """:func:`_finish` with the parameters (flags and mode included) as a tensor."""
    P = _LAYOUT[width][0]
    inf_bits = ((1 << (width - 1 - P)) - 1) << P
    mode, flags = prm[_MODE], prm[_FLAGS]
    ovf, mx = prm[_OVF], prm[_MAX]
    is_inf = a == inf_bits
    directed = {
        "toward_zero": _pick(is_inf, ovf, mx),
        "nearest": ovf.expand_as(r),
        "stochastic": ovf.expand_as(r),
        "up": _pick(is_inf | ~neg, ovf, mx),
        "down": _pick(is_inf | neg, ovf, mx),
    }
    r = _pick(r > mx, _select_mode(mode, directed), r)
    flush = (flags & F_FLUSH) != 0
    r = _pick(flush & (r < prm[_MINNORM]), torch.zeros_like(r), r)
    r = _pick(r == 0, prm[_ZERO], r)
    nan = _pick(neg & (a != 0), inf_bits | (1 << (P - 1)), r)
    s = neg & ~(((flags & F_NO_NEGZERO) != 0) & (r == 0))
    out = _pick((flags & F_NEG_NAN) != 0, nan, r | (s.to(torch.int64) << (width - 1)))
    return _pick(a > inf_bits, u | (1 << (P - 1)), out)  # NaN in: quiet NaN out


def quantize_bits_generic(
    x: torch.Tensor, prm: torch.Tensor, rnd: torch.Tensor | None
) -> torch.Tensor:
    """Round a flat contiguous float32/float64 tensor with parameters ``prm`` (see
    :func:`_param_tensor`) and, for stochastic rounding, random bits ``rnd``: the function
    torch.compile compiles. Eager, it costs every mode's work and no chunking."""
    width = 64 if x.dtype == torch.float64 else 32
    P, _, itype = _LAYOUT[width]
    u = x.view(itype).to(torch.int64) & ((1 << width) - 1)
    neg = (u & (1 << (width - 1))) != 0
    a = u & ((1 << (width - 1)) - 1)
    m, ulp_in = _significand(a, P, width, _pick)
    qe = torch.maximum(ilog2(m) + ulp_in, prm[_EMIN]) - prm[_M]
    d = qe - ulp_in
    k = _round_any_mode(m, d, neg, prm[_MODE], width, rnd)
    r = _pick(d <= 0, a, _rebuild(k, qe, width, _pick))
    out = _finish_any(r, a, u, neg, prm, width)
    if width == 32:
        out = _pick(out >= 1 << 31, out - (1 << 32), out)
    return out.to(itype).view(x.dtype)


class _CompiledKernel:
    """``torch.compile(quantize_bits_generic)``, built on first use. If compiling or running it
    fails (no compiler, an unsupported platform), warns once and runs eagerly from then on."""

    def __init__(self) -> None:
        self.fn: Callable[..., torch.Tensor] | None = None
        self.failed = False

    def __call__(
        self, x: torch.Tensor, prm: torch.Tensor, rnd: torch.Tensor | None
    ) -> torch.Tensor:
        if not self.failed:
            try:
                if self.fn is None:
                    self.fn = torch.compile(quantize_bits_generic, dynamic=True, fullgraph=True)
                return self.fn(x, prm, rnd)
            except Exception as exc:  # any compiler or backend failure: eager is still exact
                self.failed = True
                warnings.warn(
                    f"mixprec: torch.compile of the quantize kernel failed ({type(exc).__name__}:"
                    f" {exc}); MIXPREC_BACKEND=torch-compiled runs the eager torch kernel instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return quantize_bits_generic(x, prm, rnd)


compiled_kernel = _CompiledKernel()


def quantize_bits_compiled(
    x: torch.Tensor,
    p: KernelParams,
    rounding: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """:func:`quantize_bits` through the compiled generic kernel: same bits (same random bits
    too), one graph per dtype for all formats, modes and sizes (stochastic rounding adds one).

    Cost: the first call compiles (~15-30 s on CPU); then one fused pass over ``x`` (plus the
    random bits' draw for stochastic rounding).
    """
    if x.numel() < 2:  # dynamo specialises sizes 0 and 1: eager, rather than two more graphs
        return quantize_bits(x, p, rounding, generator)
    mode = ROUNDING_CODES[rounding]
    # detached: not a view of x's base, whose size dynamo would guard on (a recompile per base)
    flat = x.contiguous().reshape(-1).detach()
    rnd = _random_bits(flat, p.width, generator) if rounding == "stochastic" else None
    prm = _param_tensor(p, mode, flat.device)
    return compiled_kernel(flat, prm, rnd).reshape(x.shape)
