"""Double-double (~106-bit) arithmetic on float64 tensors, for the rare cancelling cases.

``logaddexp(x, y) = log(e^x + e^y)`` is near 0 when ``e^x + e^y ~ 1``: the float64 formula
``m + log1p(e^(y - m))`` then subtracts two numbers of size ``|m|`` and keeps only an absolute
accuracy of a few ``2^-53 |m|``, which is thousands of float32 ulps when the result is 2^-40
times smaller than ``|m|`` (such float32 inputs exist: 0.5% of the pairs next to the curve
``e^x + e^y = 1``). The fix evaluates ``s = e^x + e^y - 1 = expm1(m) + e^o`` in double-double
(each term to ~2^-104 relative, so the cancellation leaves plenty), rounds ``s`` once and
returns ``log1p(s)``. It only runs on the flagged elements (gathered), so its cost (~1000 small
torch ops per call that has any) does not touch the common case.

Error-free transformations: Knuth's two-sum, Dekker's split/two-product (no FMA needed); the
double-double operations are the "sloppy" ones of Hida, Li & Bailey's QD library (relative
error ~2^-104 for the magnitudes used here). Taylor coefficients are exact fractions rounded to
double-double.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import torch
from torch import Tensor

__all__ = ["dd_add", "dd_exp", "dd_expm1", "dd_mul", "dd_sum_rows", "two_prod", "two_sum"]

DD = tuple[Tensor, Tensor]
_SPLITTER = 134217729.0  # 2^27 + 1


def two_sum(a: Tensor, b: Tensor) -> DD:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _fast_two_sum(a: Tensor, b: Tensor) -> DD:  # |a| >= |b|
    s = a + b
    return s, b - (s - a)


def _split(a: Tensor) -> DD:
    c = a * _SPLITTER
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a: Tensor, b: Tensor) -> DD:
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def dd_add(a: DD, b: DD) -> DD:
    s, e = two_sum(a[0], b[0])
    return _fast_two_sum(s, e + (a[1] + b[1]))


def dd_mul(a: DD, b: DD) -> DD:
    p, e = two_prod(a[0], b[0])
    return _fast_two_sum(p, e + (a[0] * b[1] + a[1] * b[0]))


def _dd_mul_d(a: DD, b: Tensor) -> DD:
    p, e = two_prod(a[0], b)
    return _fast_two_sum(p, e + a[1] * b)


@cache
def _inv_factorials(n: int) -> tuple[tuple[float, float], ...]:
    out = []
    f = Fraction(1)
    for k in range(n + 1):
        if k:
            f /= k
        hi = float(f)
        out.append((hi, float(f - Fraction(hi))))
    return tuple(out)


def _const(x: Tensor, c: tuple[float, float]) -> DD:
    return torch.full_like(x, c[0]), torch.full_like(x, c[1])


def dd_expm1(m: Tensor, terms: int = 30) -> DD:
    """``e^m - 1`` for float64 ``|m| <= 1`` as a double-double (Taylor, ``terms`` terms)."""
    c = _inv_factorials(terms)
    acc = _const(m, c[terms])
    for k in range(terms - 1, 0, -1):
        acc = dd_add(_dd_mul_d(acc, m), _const(m, c[k]))
    return _dd_mul_d(acc, m)


# ln 2 in three parts; the first has 32 trailing zero bits so k * _LN2_HI is exact for |k| < 2^20
_LN2 = Fraction(
    "0.693147180559945309417232121458176568075500134360255254120680009493393621969694715605863"
)


def _ln2_parts() -> tuple[float, float, float]:
    hi = math.ldexp(math.floor(math.ldexp(float(_LN2), 21)), -21)
    mid = float(_LN2 - Fraction(hi))
    lo = float(_LN2 - Fraction(hi) - Fraction(mid))
    return hi, mid, lo


_LN2_HI, _LN2_MID, _LN2_LO = _ln2_parts()


def dd_exp(o: Tensor, terms: int = 24) -> DD:
    """``e^o`` for finite float64 ``o`` as a double-double.

    ``o = k ln2 + r`` with ``|r| <= ln2 / 2`` (``r`` in double-double), Taylor for ``e^r``
    (24 terms: truncation below 2^-110), then an exact scaling by ``2^k``. Results in the
    subnormal range lose the low part (they are not needed at that accuracy here).
    """
    k = torch.round(o / _LN2_HI)
    t = o - k * _LN2_HI  # exact (Sterbenz; k * HI is exact)
    p = two_prod(k, torch.full_like(o, _LN2_MID))
    r = dd_add((t, torch.zeros_like(t)), (-p[0], -p[1]))
    r = (r[0], r[1] - k * _LN2_LO)
    c = _inv_factorials(terms)
    acc = _const(o, c[terms])
    for j in range(terms - 1, -1, -1):
        acc = dd_add(dd_mul(acc, r), _const(o, c[j]))
    ki = k.to(torch.int32)
    # scale in two steps so that 2^k never overflows on its own
    half = torch.div(ki, 2, rounding_mode="floor")
    hi = torch.ldexp(torch.ldexp(acc[0], half), ki - half)
    lo = torch.ldexp(torch.ldexp(acc[1], half), ki - half)
    return hi, lo


def dd_sum_rows(v: DD) -> DD:
    """Row sums of a double-double ``(r, n)`` array (pairwise, vectorised over the rows)."""
    hi, lo = v
    while hi.shape[1] > 1:
        if hi.shape[1] % 2:
            z = torch.zeros_like(hi[:, :1])
            hi, lo = torch.cat([hi, z], 1), torch.cat([lo, z], 1)
        hi, lo = dd_add((hi[:, 0::2], lo[:, 0::2]), (hi[:, 1::2], lo[:, 1::2]))
    return hi, lo
