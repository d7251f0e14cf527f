"""What counts as an error in each real format: thresholds and the bits-lost measure (private).

Definitions (per output element; see the package docstring and docs/sanitize.md):

* ``rel = |x - s| / max(|s|, 2^(-threshold_bits/2) * max|s|)``: the floor makes elements far
  below the tensor's largest magnitude count at the tensor's scale;
* ``bits_lost = clip(log2(rel / eps) + 1, 0, mantissa_bits + 1)``;
* an element is flagged when its local ``bits_lost > threshold_bits`` (default: half the real
  format's mantissa bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from mixprec.formats import FloatFormat, get_format

# real dtypes whose formats the checks know (float64 reals are never checked)
_REAL_FORMATS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class FmtInfo:
    """What the checks need to know about a real tensor's format (precomputed floats)."""

    name: str
    mantissa_bits: int
    eps: float  # 2^-mantissa_bits
    min_normal: float
    max: float
    threshold_bits: float
    tol: float  # relative error above which more than threshold_bits are lost
    floor: float  # 2^-(threshold_bits / 2): noise floor relative to the tensor's max magnitude
    fmt: FloatFormat | None = None  # set for emulated formats (dtype_hint): local-input rounding


@lru_cache(maxsize=64)  # every sanitize() entry asks again; FmtInfo is immutable
def make_fmt_info(fmt: FloatFormat, threshold_bits: float | None) -> FmtInfo:
    p = fmt.mantissa_bits
    thr = p / 2 if threshold_bits is None else float(threshold_bits)
    # bits_lost = log2(rel / eps) + 1  ->  bits_lost > thr  <=>  rel > eps * 2^(thr - 1)
    return FmtInfo(
        name=fmt.name,
        mantissa_bits=p,
        eps=fmt.eps,
        min_normal=fmt.min_normal,
        max=fmt.max,
        threshold_bits=thr,
        tol=fmt.eps * 2.0 ** (thr - 1),
        floor=2.0 ** (-thr / 2),
    )


def real_formats(
    threshold_bits: float | None, dtype_hint: FloatFormat | None
) -> dict[torch.dtype, FmtInfo]:
    """FmtInfo per real dtype; with ``dtype_hint``, float32 tensors are judged in that format."""
    fmts = {
        dt: make_fmt_info(get_format(name), threshold_bits) for dt, name in _REAL_FORMATS.items()
    }
    if dtype_hint is not None:
        fmts[torch.float32] = replace(make_fmt_info(dtype_hint, threshold_bits), fmt=dtype_hint)
    return fmts


def bits_lost(rel: float, info: FmtInfo) -> float:
    """Bits of the real format's significand that are wrong for relative error ``rel``.

    ``log2(rel / eps) + 1`` clipped to ``[0, mantissa_bits + 1]``: a correctly rounded result
    (``rel <= eps/2``) loses 0 bits, one ulp of error loses 1 bit, ``rel >= 1`` loses them all.
    """
    if not rel > 0.0:
        return 0.0
    if math.isinf(rel) or math.isnan(rel):
        return float(info.mantissa_bits + 1)
    return min(max(math.log2(rel / info.eps) + 1.0, 0.0), float(info.mantissa_bits + 1))
