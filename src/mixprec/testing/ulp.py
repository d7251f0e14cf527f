"""ULP audit machinery for :mod:`mixprec.stable` (the tests and ``benchmarks/ulp_audit.py``).

Definitions (also in ``docs/stable.md``):

* For a target format with ``p`` stored mantissa bits and smallest normal exponent ``emin``,
  the unit in the last place at a real number ``y`` is
  ``ulp(y) = 2^(max(e(y), emin) - p)`` with ``e(y) = floor(log2 |y|)`` (``ulp(0)`` is the
  smallest subnormal). It is the spacing of the format's numbers around ``y``.
* The error of a computed value ``c`` against the exact value ``y`` is ``|c - y| / ulp(y)``
  ulps; a correctly rounded result is within 0.5 ulp. ``y`` comes from mpmath at 50 significant
  digits and is carried as a float64 pair ``hi + lo`` (106 bits), so float64 results are measured
  too. ``|y|`` at or beyond the format's overflow threshold (``max + ulp(max)/2``) counts as
  ``+-inf``. Non-finite values must match exactly (0 ulp) or count as ``inf`` ulps.

mpmath is a development dependency: it is imported only when references are computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mixprec.formats.float_format import get_format

__all__ = [
    "AUDIT_DTYPES",
    "ELEMENTWISE",
    "ROWWISE",
    "TARGET_ULP",
    "ElementwiseSpec",
    "RowSpec",
    "elementwise_points",
    "pair_points",
    "reference_elementwise",
    "reference_rows",
    "row_cases",
    "to_pair",
    "ulp_error",
]

AUDIT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
#: The issue's accuracy targets (float64 has none: reported, not required).
TARGET_ULP = {torch.float32: 2.0, torch.float16: 1.0, torch.bfloat16: 1.0}
DPS = 50


# --------------------------------------------------------------------------------------------
# the metric
# --------------------------------------------------------------------------------------------
def to_pair(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """mpmath numbers -> float64 ``(hi, lo)`` arrays with ``hi + lo`` ~ the value to 106 bits."""
    import mpmath as mp

    hi = np.empty(len(values))
    lo = np.zeros(len(values))
    with mp.workdps(DPS):
        for i, v in enumerate(values):
            if mp.isnan(v):
                hi[i] = math.nan
            elif mp.isinf(v) or abs(v) >= mp.mpf(np.finfo(np.float64).max) + mp.mpf(2) ** 970:
                hi[i] = math.inf if v > 0 else -math.inf
            else:
                h = float(v)
                hi[i] = h
                lo[i] = float(v - mp.mpf(h))
    return hi, lo


def ulp_error(computed: Tensor, hi: Tensor, lo: Tensor, dtype: torch.dtype) -> Tensor:
    """Error of ``computed`` (any float dtype) against ``hi + lo`` in ulps of ``dtype``.

    See the module docstring for the definition; returns a float64 tensor (``inf`` for a
    non-finite mismatch, 0 for matching NaN/inf).
    """
    fmt = get_format(dtype)
    c = computed.detach().to(torch.float64).cpu()
    hi = torch.as_tensor(hi, dtype=torch.float64)
    lo = torch.as_tensor(lo, dtype=torch.float64)
    p, emin, emax = fmt.mantissa_bits, fmt.emin, fmt.emax
    overflow = fmt.max + 2.0 ** (emax - p - 1)  # rounds to inf at or above this
    ref_inf = hi.abs() >= overflow
    ref = torch.where(ref_inf, torch.copysign(torch.full_like(hi, math.inf), hi), hi)
    mant, expo = torch.frexp(hi)
    e = expo.to(torch.float64) - 1.0  # |hi| = m 2^expo with m in [0.5, 1): floor(log2) = expo-1
    # hi a power of two with lo pulling |y| below it: y's binade is the one below
    e = torch.where((mant.abs() == 0.5) & (lo * hi < 0), e - 1.0, e)
    ulp = torch.exp2(torch.clamp(e, min=float(emin)) - p)
    err = ((c - hi) - lo).abs() / ulp
    nan_ref, nan_c = torch.isnan(ref), torch.isnan(c)
    finite_ref = torch.isfinite(ref)
    err = torch.where(finite_ref & ~torch.isfinite(c), math.inf, err)
    inf_ref = torch.isinf(ref)
    err = torch.where(inf_ref, torch.where(c == ref, 0.0, math.inf), err)
    err = torch.where(nan_ref | nan_c, torch.where(nan_ref & nan_c, 0.0, math.inf), err)
    return err


# --------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------
def _round_to(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return torch.as_tensor(values, dtype=torch.float64).to(dtype).to(torch.float64).numpy()


def _all_finite(dtype: torch.dtype) -> np.ndarray:
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    v = bits.view(dtype).to(torch.float64).numpy()
    return v[np.isfinite(v)]


def _log_sweep(
    dtype: torch.dtype, per_binade: int, rng: np.random.Generator, stride: int = 1
) -> np.ndarray:
    """``per_binade`` values (random mantissas, plus the binade's ends) from every ``stride``-th
    binade of ``dtype`` (the last one always), subnormals included, both signs."""
    fmt = get_format(dtype)
    p = fmt.mantissa_bits
    out = []
    binades = list(range(fmt.emin - p, fmt.emax + 1))
    for e in sorted(set(binades[::stride]) | {binades[-1], -1, 0}):
        frac = rng.random(per_binade)
        m = np.concatenate([[0.0, 1.0 - 2.0**-p], frac])
        out.append(np.ldexp(1.0 + m, e))
    v = np.concatenate(out)
    v = v[np.isfinite(v)]
    v = np.concatenate([v, -v])
    return _round_to(v, dtype)


def _specials(dtype: torch.dtype) -> np.ndarray:
    fmt = get_format(dtype)
    base = [0.0, fmt.min_subnormal, fmt.min_normal, 1.0, fmt.max, math.inf]
    return np.array(base + [-b for b in base])


def _neighbours(center: float, dtype: torch.dtype, count: int) -> np.ndarray:
    """``count`` consecutive ``dtype`` numbers on each side of ``center`` (rounded)."""
    c = torch.tensor([center], dtype=torch.float64).to(dtype)
    out = [c]
    up = down = c
    inf = torch.tensor([math.inf], dtype=dtype)
    for _ in range(count):
        up = torch.nextafter(up, inf) if dtype in (torch.float32, torch.float64) else _next(up, 1)
        down = (
            torch.nextafter(down, -inf)
            if dtype in (torch.float32, torch.float64)
            else _next(down, -1)
        )
        out += [up, down]
    return torch.cat(out).to(torch.float64).numpy()


def _next(t: Tensor, direction: int) -> Tensor:
    # torch.nextafter has no CPU kernel for half types: step the bit pattern
    b = t.view(torch.int16).to(torch.int32)
    positive = b >= 0
    step = torch.where(positive == (direction > 0), 1, -1)
    b = torch.where(b == 0, 1 if direction > 0 else -32767, b + step)
    return b.to(torch.int16).view(t.dtype)


def elementwise_points(
    dtype: torch.dtype,
    *,
    dense: Sequence[tuple[float, float]] = (),
    centers: Sequence[float] = (),
    per_binade: int = 4,
    dense_count: int = 200,
    neighbours: int = 16,
    exhaustive: bool = False,
    domain: Callable[[np.ndarray], np.ndarray] | None = None,
    seed: int = 0,
    binade_stride: int = 1,
) -> np.ndarray:
    """Sorted unique ``dtype``-representable points (as float64) covering the whole range.

    Every binade (subnormals included) contributes ``per_binade`` points, each interval in
    ``dense`` ``dense_count`` uniform points, each value in ``centers`` its ``neighbours``
    nearest numbers on each side; ``exhaustive`` (float16/bfloat16 only) takes every finite
    value. ``domain`` filters (a boolean function of the float64 points). No NaN.
    ``binade_stride`` > 1 visits only every so many binades (float64 has 2098).
    """
    rng = np.random.default_rng(seed)
    parts = [_specials(dtype), _log_sweep(dtype, per_binade, rng, binade_stride)]
    if exhaustive:
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"exhaustive grids exist for float16 and bfloat16, not {dtype}")
        parts.append(_all_finite(dtype))
    for lo, hi in dense:
        parts.append(_round_to(rng.uniform(lo, hi, dense_count), dtype))
    for c in centers:
        parts.append(_neighbours(c, dtype, neighbours))
    v = np.unique(np.concatenate(parts))
    v = v[~np.isnan(v)]
    if domain is not None:
        v = v[domain(v)]
    return v


def pair_points(
    dtype: torch.dtype,
    axis: np.ndarray,
    *,
    extra: int = 0,
    extra_fn: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The outer product ``axis x axis`` plus ``extra`` pairs from ``extra_fn`` (rounded)."""
    xs, ys = np.meshgrid(axis, axis, indexing="ij")
    x, y = xs.ravel(), ys.ravel()
    if extra and extra_fn is not None:
        ex, ey = extra_fn(np.random.default_rng(seed), extra)
        x = np.concatenate([x, _round_to(ex, dtype)])
        y = np.concatenate([y, _round_to(ey, dtype)])
    return x, y


# --------------------------------------------------------------------------------------------
# function specs with mpmath references
# --------------------------------------------------------------------------------------------
def _mp():
    import mpmath

    return mpmath


def _sigmoid(mp: Any, x: Any) -> Any:
    if mp.isinf(x):
        return mp.mpf(1) if x > 0 else mp.mpf(0)
    return 1 / (1 + mp.exp(-x))


def _ref_softplus(mp: Any, x: Any) -> Any:
    return mp.log1p(mp.exp(x)) if not mp.isinf(x) else (x if x > 0 else mp.mpf(0))


def _ref_log1mexp(mp: Any, x: Any) -> Any:
    if x > 0:
        return mp.nan
    if x == 0:
        return -mp.inf
    # log1p keeps the digits of log(1 - tiny) that 50-digit log(-expm1(x)) would lose
    return mp.log1p(-mp.exp(x)) if x < -1 else mp.log(-mp.expm1(x))


def _ref_dlog1mexp(mp: Any, x: Any) -> Any:
    if x > 0:
        return mp.nan
    if x == 0:
        return -mp.inf
    if mp.isinf(x):
        return mp.mpf(0)
    return -1 / mp.expm1(-x)


def _ref_logcosh(mp: Any, x: Any) -> Any:
    if mp.isinf(x):
        return mp.inf
    a = abs(x)
    if a >= 1:  # a - ln2 + log1p(e^-2a): no cosh of huge arguments, no cancellation
        return a - mp.log(2) + mp.log1p(mp.exp(-2 * a))
    if a == 0:
        return mp.mpf(0)
    # cosh(x) = 1 + x^2/2 + ...: carry enough extra digits that x^2/2 survives the 1 +
    extra = int(-2 * mp.log10(a)) + 10
    with mp.workdps(DPS + extra):
        return +mp.log(mp.cosh(x))


def _ref_lambertw(branch: int) -> Callable[[Any, Any], Any]:
    def ref(mp: Any, z: Any) -> Any:
        if z < -1 / mp.e or (branch == -1 and z > 0):
            return mp.nan
        if z == 0:
            return mp.mpf(0) if branch == 0 else -mp.inf
        if mp.isinf(z):
            return mp.inf
        return mp.re(mp.lambertw(z, branch))

    return ref


def _ref_dlambertw(branch: int) -> Callable[[Any, Any], Any]:
    w_of = _ref_lambertw(branch)

    def ref(mp: Any, z: Any) -> Any:
        w = w_of(mp, z)
        if mp.isnan(w):
            return mp.nan
        if z == 0:
            return mp.mpf(1) if branch == 0 else -mp.inf
        if mp.isinf(z):
            return mp.mpf(0)
        if w == -1:
            return mp.inf
        return w / (z * (1 + w))

    return ref


def _ref_logaddexp(mp: Any, x: Any, y: Any) -> Any:
    m = max(x, y)
    if mp.isinf(m):
        return m
    return m + mp.log1p(mp.exp(min(x, y) - m))


def _ref_dlogaddexp_x(mp: Any, x: Any, y: Any) -> Any:
    if x == y and mp.isinf(x):
        return mp.mpf(0)
    if mp.isinf(x) or mp.isinf(y):
        return mp.mpf(1) if x > y else mp.mpf(0)
    return _sigmoid(mp, x - y)


def _ref_xlogy(mp: Any, x: Any, y: Any) -> Any:
    if x == 0:  # the convention of torch.xlogy and scipy: 0 unless y is NaN
        return mp.mpf(0)
    if y < 0:
        return mp.nan
    if y == 0:
        return -mp.inf if x > 0 else mp.inf
    return x * mp.log(y)


def _ref_xlog1py(mp: Any, x: Any, y: Any) -> Any:
    if x == 0:
        return mp.mpf(0)
    if y < -1:
        return mp.nan
    if y == -1:
        return -mp.inf if x > 0 else mp.inf
    return x * mp.log1p(y)


def _ref_dxlogy_x(mp: Any, x: Any, y: Any) -> Any:
    if y < 0:
        return mp.nan
    return mp.log(y) if y > 0 else -mp.inf


def _ref_dxlogy_y(mp: Any, x: Any, y: Any) -> Any:
    if x == 0:  # f(0, y) = 0 for every y
        return mp.mpf(0)
    if y < 0:
        return mp.nan
    if y == 0:
        return mp.inf if x > 0 else -mp.inf
    return x / y


def _ref_dxlog1py_x(mp: Any, x: Any, y: Any) -> Any:
    if y < -1:
        return mp.nan
    return mp.log1p(y) if y > -1 else -mp.inf


def _ref_dxlog1py_y(mp: Any, x: Any, y: Any) -> Any:
    if x == 0:
        return mp.mpf(0)
    if y < -1:
        return mp.nan
    if y == -1:
        return mp.inf if x > 0 else -mp.inf
    return x / (1 + y)


@dataclass(frozen=True)
class ElementwiseSpec:
    """An elementwise function of one or two arguments, with its references and grid."""

    name: str
    arity: int
    stable: Callable[..., Tensor]
    naive: Callable[..., Tensor]
    builtin: Callable[..., Tensor] | None
    ref: Callable[..., Any]
    dref: tuple[Callable[..., Any], ...]
    dense: tuple[tuple[float, float], ...] = ()
    centers: tuple[float, ...] = ()
    domain: Callable[[np.ndarray], np.ndarray] | None = None
    grad_domain: Callable[..., np.ndarray] | None = None
    extra_pairs: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]] | None = None
    notes: str = ""


def _naive_lambertw(branch: int) -> Callable[[Tensor], Tensor]:
    """The loop the issue replaces: Newton steps until the largest update is tiny."""

    def naive(z: Tensor) -> Tensor:
        if branch == 0:
            w = torch.log1p(z)
        else:
            lz = torch.log(-z)
            w = lz - torch.log(-lz)
        eps = torch.finfo(z.dtype).eps
        for _ in range(100):
            ew = torch.exp(w)
            step = (w * ew - z) / (ew * (w + 1))
            w = w - step
            big = torch.nan_to_num(step.abs(), nan=0.0).amax()
            if big <= eps * 4:  # data-dependent exit (a device sync per step on GPU)
                break
        return w

    return naive


def _elementwise_specs() -> tuple[ElementwiseSpec, ...]:
    from mixprec.stable import functions as stable

    return (*_log_exp_specs(stable), *_other_unary_specs(stable), *_binary_specs(stable))


def _log_exp_specs(stable: Any) -> tuple[ElementwiseSpec, ...]:
    """Unary log/exp compositions."""
    import torch.nn.functional as F

    return (
        ElementwiseSpec(
            "softplus",
            1,
            stable.softplus,
            lambda x: torch.log(1 + torch.exp(x)),
            F.softplus,
            _ref_softplus,
            (_sigmoid,),
            dense=((-60.0, 60.0), (-2.0, 2.0)),
            centers=(0.0, 20.0, 37.0, -37.0, -720.0),
        ),
        ElementwiseSpec(
            "log_sigmoid",
            1,
            stable.log_sigmoid,
            lambda x: torch.log(torch.sigmoid(x)),
            F.logsigmoid,
            lambda mp, x: -_ref_softplus(mp, -x),
            (lambda mp, x: _sigmoid(mp, -x),),
            dense=((-60.0, 60.0), (-2.0, 2.0)),
            centers=(0.0, 20.0, -37.0, 37.0, 720.0),
        ),
        ElementwiseSpec(
            "log1pexp",
            1,
            stable.log1pexp,
            lambda x: torch.log(1 + torch.exp(x)),
            F.softplus,
            _ref_softplus,
            (_sigmoid,),
            dense=((-60.0, 60.0),),
            centers=(0.0,),
        ),
        ElementwiseSpec(
            "log1mexp",
            1,
            stable.log1mexp,
            lambda x: torch.log(1 - torch.exp(x)),
            None,
            _ref_log1mexp,
            (_ref_dlog1mexp,),
            dense=((-40.0, 0.0), (-1.5, 0.0)),
            centers=(-math.log(2.0), 0.0, -720.0),
            domain=lambda v: v <= 0,
        ),
    )


def _other_unary_specs(stable: Any) -> tuple[ElementwiseSpec, ...]:
    """log(cosh) and both real branches of the Lambert W function."""
    inv_e = -1.0 / math.e
    return (
        ElementwiseSpec(
            "logcosh",
            1,
            stable.logcosh,
            lambda x: torch.log(torch.cosh(x)),
            None,
            _ref_logcosh,
            (lambda mp, x: mp.tanh(x) if not mp.isinf(x) else mp.sign(x),),
            dense=((-100.0, 100.0), (-2.0, 2.0)),
            centers=(1.0, -1.0, 0.0),
        ),
        ElementwiseSpec(
            "lambertw",
            1,
            stable.lambertw,
            _naive_lambertw(0),
            None,
            _ref_lambertw(0),
            (_ref_dlambertw(0),),
            dense=((inv_e, 3.0), (inv_e, inv_e + 0.05), (-0.1, 0.1)),
            centers=(inv_e, 0.0, 3.0),
            domain=lambda v: v >= inv_e - 0.05,  # a few points below -1/e: NaN
            notes="branch 0",
        ),
        ElementwiseSpec(
            "lambertw_m1",
            1,
            lambda z: stable.lambertw(z, -1),
            _naive_lambertw(-1),
            None,
            _ref_lambertw(-1),
            (_ref_dlambertw(-1),),
            dense=((inv_e, 0.0), (inv_e, inv_e + 0.05), (-0.05, 0.0)),
            centers=(inv_e,),
            domain=lambda v: (v >= inv_e - 0.05) & (v <= 1e-3),
            notes="branch -1",
        ),
    )


def _binary_specs(stable: Any) -> tuple[ElementwiseSpec, ...]:
    """Two-argument functions (each with its hard argument pairs)."""
    return (
        ElementwiseSpec(
            "logaddexp",
            2,
            stable.logaddexp,
            lambda x, y: torch.log(torch.exp(x) + torch.exp(y)),
            torch.logaddexp,
            _ref_logaddexp,
            (_ref_dlogaddexp_x, lambda mp, x, y: _ref_dlogaddexp_x(mp, y, x)),
            extra_pairs=_logaddexp_pairs,
        ),
        ElementwiseSpec(
            "xlogy",
            2,
            stable.xlogy,
            lambda x, y: x * torch.log(y),
            torch.xlogy,
            _ref_xlogy,
            (_ref_dxlogy_x, _ref_dxlogy_y),
            domain=lambda v: v >= 0,
            extra_pairs=_xlogy_pairs,
        ),
        ElementwiseSpec(
            "xlog1py",
            2,
            stable.xlog1py,
            lambda x, y: x * torch.log(1 + y),
            torch.special.xlog1py,
            _ref_xlog1py,
            (_ref_dxlog1py_x, _ref_dxlog1py_y),
            domain=lambda v: v >= -1,
            extra_pairs=_xlog1py_pairs,
        ),
    )


def _logaddexp_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # near-equal arguments and the zero crossing log(e^x + e^y) = 0 (y = log(1 - e^x))
    x = rng.uniform(-30, 30, n)
    y = x + rng.normal(0, 1e-3, n)
    y[: n // 10] = x[: n // 10] - rng.uniform(700, 745, n // 10)  # subnormal gradients
    xs = -np.exp(rng.uniform(-20, 3, n))
    ys = np.log(-np.expm1(xs))
    return np.concatenate([x, xs]), np.concatenate([y, ys])


def _xlogy_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-10, 10, n)
    y = np.exp(rng.uniform(-1e-3, 1e-3, n))  # log(y) ~ 0
    return x, y


def _xlog1py_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-10, 10, n)
    y = rng.uniform(-1e-6, 1e-6, n)
    return x, y


_SPECS: tuple[ElementwiseSpec, ...] | None = None


def elementwise_specs() -> tuple[ElementwiseSpec, ...]:
    global _SPECS
    if _SPECS is None:
        _SPECS = _elementwise_specs()
    return _SPECS


ELEMENTWISE = (
    "softplus",
    "log_sigmoid",
    "log1pexp",
    "log1mexp",
    "logcosh",
    "lambertw",
    "lambertw_m1",
    "logaddexp",
    "xlogy",
    "xlog1py",
)
ROWWISE = ("logsumexp", "log_softmax")


def get_spec(name: str) -> ElementwiseSpec:
    for s in elementwise_specs():
        if s.name == name:
            return s
    raise ValueError(f"unknown function {name!r}; valid: {ELEMENTWISE}")


def reference_elementwise(
    fn: Callable[..., Any], *columns: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``fn(mp, *args)`` at 50 digits for every row of ``columns``, as a float64 pair."""
    mp = _mp()
    with mp.workdps(DPS):
        vals = [fn(mp, *(mp.mpf(float(c[i])) for c in columns)) for i in range(len(columns[0]))]
    return to_pair(vals)


# --------------------------------------------------------------------------------------------
# row-wise functions (logsumexp, log_softmax)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowSpec:
    name: str
    stable: Callable[..., Tensor]
    naive: Callable[..., Tensor]
    builtin: Callable[..., Tensor]
    notes: str = ""


ROW_SPECS = {
    "logsumexp": RowSpec(
        "logsumexp",
        lambda x: __import__("mixprec.stable", fromlist=["x"]).logsumexp(x, dim=-1, keepdim=True),
        lambda x: torch.log(torch.exp(x).sum(-1, keepdim=True)),
        lambda x: torch.logsumexp(x, dim=-1, keepdim=True),
    ),
    "log_softmax": RowSpec(
        "log_softmax",
        lambda x: __import__("mixprec.stable", fromlist=["x"]).log_softmax(x, dim=-1),
        lambda x: torch.log(torch.softmax(x, dim=-1)),
        lambda x: torch.log_softmax(x, dim=-1),
    ),
}


@dataclass
class RowCases:
    """Rows of equal length ``n`` (a batch), as float64 values representable in ``dtype``."""

    n: int
    rows: np.ndarray  # (r, n)
    weights: np.ndarray  # (r, n) upstream gradient used for log_softmax's vector-Jacobian
    labels: list[str] = field(default_factory=list)


def row_cases(dtype: torch.dtype, rows_per_kind: int, seed: int = 0) -> list[RowCases]:
    """Batches of rows covering: wide and narrow value ranges, a dominant entry with tiny rest
    (where ``log(1 + tiny)`` fails), ties at the maximum, ``-inf`` entries, all ``-inf``
    rows, huge magnitudes (naive overflow) and single-entry rows."""
    rng = np.random.default_rng(seed)
    fmt = get_format(dtype)
    big = min(fmt.max / 4, 1e300)
    out = []
    for n in (1, 2, 3, 7, 64):
        r = rows_per_kind
        kinds = []
        kinds.append(("normal", rng.normal(0, 3, (r, n))))
        kinds.append(("wide", rng.uniform(-80, 80, (r, n))))
        kinds.append(("huge", rng.uniform(-1, 1, (r, n)) * big))
        dom = rng.uniform(-3, 3, (r, n))
        dom[:, 1:] = dom[:, :1] - rng.uniform(20, 60, (r, n - 1))
        kinds.append(("dominant", dom))
        tie = rng.normal(0, 2, (r, n))
        tie[:, : max(1, n // 2)] = tie[:, :1]
        kinds.append(("ties", tie))
        # log-probabilities: logsumexp ~ 0, the cancelling case (log(1 - tiny) too)
        probs = rng.dirichlet(np.full(n, 0.3), r) if n > 1 else np.ones((r, 1))
        with np.errstate(divide="ignore"):
            kinds.append(("normalized", np.log(probs)))
        withinf = rng.normal(0, 5, (r, n))
        withinf[rng.random((r, n)) < 0.4] = -math.inf
        withinf[0, :] = -math.inf
        kinds.append(("-inf", withinf))
        for label, rows in kinds:
            rows = _round_to(rows, dtype).reshape(r, n)
            w = _round_to(rng.normal(0, 1, (r, n)), dtype).reshape(r, n)
            out.append(RowCases(n, rows, w, [label] * r))
    return out


def reference_rows(name: str, case: RowCases) -> tuple[np.ndarray, ...]:
    """mpmath references for a batch: ``(value_hi, value_lo, grad_hi, grad_lo)`` flattened.

    logsumexp: the value per row and its gradient ``softmax`` per entry (upstream gradient 1).
    log_softmax: the value per entry and the vector-Jacobian product with ``case.weights``:
    ``w_i - softmax_i * sum(w)``.
    """
    mp = _mp()
    vals: list[Any] = []
    grads: list[Any] = []
    with mp.workdps(DPS):
        for row, w in zip(case.rows, case.weights, strict=True):
            xs = [mp.mpf(float(v)) for v in row]
            finite = [v for v in xs if not mp.isinf(v)]
            if not finite:  # all -inf: value -inf, gradient 0 by convention
                lse = -mp.inf
                p = [mp.mpf(0)] * len(xs)
            else:
                m = max(finite)
                rest = list(finite)
                rest.remove(m)  # log1p of the others: 1 + e^-140 would lose them at 50 digits
                tail = mp.log1p(mp.fsum(mp.exp(v - m) for v in rest))
                lse = m + tail
                p = [mp.exp(v - lse) if not mp.isinf(v) else mp.mpf(0) for v in xs]
            if name == "logsumexp":
                vals.append(lse)
                grads.extend(p)
            else:
                ws = [mp.mpf(float(v)) for v in w]
                total = mp.fsum(ws)
                for v, pi, wi in zip(xs, p, ws, strict=True):
                    if mp.isinf(lse):
                        vals.append(-mp.inf)
                    elif mp.isinf(v):
                        vals.append(v)
                    else:  # v - m - log1p(s'): exact at 50 digits also when v - lse is tiny
                        vals.append((v - m) - tail)
                    grads.append(wi - pi * total if not mp.isinf(lse) else mp.mpf(0))
    vh, vl = to_pair(vals)
    gh, gl = to_pair(grads)
    return vh, vl, gh, gl


# --------------------------------------------------------------------------------------------
# running an audit
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditRow:
    """One line of the audit: a function, dtype, implementation and quantity (value/grad)."""

    function: str
    dtype: str
    variant: str  # "stable" | "naive" | "builtin"
    quantity: str  # "value" | "grad" | "grad_x" | "grad_y"
    points: int
    max_ulp: float
    mean_ulp: float  # over the points with a finite error
    bad: int  # points where the reference is finite but the result is not (or NaN mismatch)
    worst: str  # the input with the largest error


@dataclass(frozen=True)
class Level:
    """Grid density: ``ci`` (seconds, for the tests) or ``full`` (the benchmark)."""

    name: str
    per_binade: int
    binade_stride_f64: int
    dense_count: int
    neighbours: int
    pair_axis: int
    pair_extra: int
    rows_per_kind: int
    exhaustive_half: bool
    lambertw_scale: float  # fraction of the points for the (slow) mpmath lambertw


LEVELS = {
    "ci": Level("ci", 1, 24, 100, 6, 10, 150, 2, False, 0.5),
    "full": Level("full", 24, 2, 4000, 64, 80, 20000, 40, True, 1.0),
}


def _thin(v: np.ndarray, keep: float, rng: np.random.Generator) -> np.ndarray:
    if keep >= 1.0 or len(v) < 50:
        return v
    return np.sort(rng.choice(v, int(len(v) * keep), replace=False))


def unary_grid(spec: ElementwiseSpec, dtype: torch.dtype, level: Level) -> np.ndarray:
    pts = elementwise_points(
        dtype,
        dense=spec.dense,
        centers=spec.centers,
        per_binade=level.per_binade,
        dense_count=level.dense_count,
        neighbours=level.neighbours,
        exhaustive=level.exhaustive_half and dtype in (torch.float16, torch.bfloat16),
        domain=spec.domain,
        binade_stride=level.binade_stride_f64 if dtype == torch.float64 else 1,
    )
    if spec.name.startswith("lambertw"):
        pts = _thin(pts, level.lambertw_scale, np.random.default_rng(2))
    return np.unique(pts)


def binary_grid(
    spec: ElementwiseSpec, dtype: torch.dtype, level: Level
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    fmt = get_format(dtype)
    # the axis: every ~k-th binade of both signs, the specials, and a dense middle
    mags = np.exp2(np.linspace(fmt.emin - fmt.mantissa_bits, fmt.emax, level.pair_axis))
    mags = np.concatenate([mags, np.exp2(np.linspace(-6, 7, level.pair_axis))])
    mags = mags * (1 + rng.random(mags.size) * 0.9)
    mid = rng.uniform(-20, 20, level.pair_axis // 2)
    axis = np.concatenate([mags, -mags, mid, _specials(dtype), [0.5, 1.0, 2.0, -1.0]])
    axis = np.unique(_round_to(axis, dtype))
    axis = axis[np.isfinite(axis) | (axis > 0) | (axis < 0)]
    x, y = pair_points(dtype, axis, extra=level.pair_extra, extra_fn=spec.extra_pairs)
    if spec.domain is not None:
        keep = spec.domain(y)
        keep[::97] = True  # a few points outside the domain: they must give NaN
        x, y = x[keep], y[keep]
    return x, y


def _stats(err: Tensor, ref_finite: Tensor, inputs: Sequence[np.ndarray]) -> tuple:
    finite = torch.isfinite(err)
    bad = int((~finite).sum())
    mx = float(err.max()) if err.numel() else 0.0
    mean = float(err[finite].mean()) if finite.any() else 0.0
    if err.numel():
        i = int(torch.nan_to_num(err, posinf=1e308).argmax())
        worst = ", ".join(f"{float(c[i]):.9g}" for c in inputs)
    else:
        worst = ""
    return mx, mean, bad, worst


def audit_elementwise(name: str, dtype: torch.dtype, level: str = "ci") -> list[AuditRow]:
    """Value and gradient errors (ulps of ``dtype``) of the stable, naive and builtin versions."""
    spec = get_spec(name)
    lv = LEVELS[level]
    if spec.arity == 1:
        cols: tuple[np.ndarray, ...] = (unary_grid(spec, dtype, lv),)
    else:
        cols = binary_grid(spec, dtype, lv)
    vhi, vlo = reference_elementwise(spec.ref, *cols)
    grefs = [reference_elementwise(d, *cols) for d in spec.dref]
    qnames = ["grad"] if spec.arity == 1 else ["grad_x", "grad_y"]
    variants = [("stable", spec.stable), ("naive", spec.naive)]
    if spec.builtin is not None:
        variants.append(("builtin", spec.builtin))
    rows = []
    dname = str(dtype).replace("torch.", "")
    for vname, fn in variants:
        args = [torch.tensor(c, dtype=torch.float64).to(dtype).requires_grad_() for c in cols]
        try:
            out = fn(*args)
        except (RuntimeError, NotImplementedError) as exc:  # op missing for this dtype
            rows.append(
                AuditRow(name, dname, vname, f"n/a: {exc}"[:60], 0, math.nan, math.nan, 0, "")
            )
            continue
        err = ulp_error(out, vhi, vlo, dtype)
        rows.append(AuditRow(name, dname, vname, "value", len(cols[0]), *_stats(err, None, cols)))
        try:
            grads = torch.autograd.grad(out.sum(), args, allow_unused=True)
        except RuntimeError:
            continue
        for q, g, (ghi, glo) in zip(qnames, grads, grefs, strict=True):
            if g is None:
                continue
            gerr = ulp_error(g, ghi, glo, dtype)
            rows.append(AuditRow(name, dname, vname, q, len(cols[0]), *_stats(gerr, None, cols)))
    return rows


def audit_rows(name: str, dtype: torch.dtype, level: str = "ci") -> list[AuditRow]:
    """Errors of logsumexp / log_softmax (value and vector-Jacobian product) on row batches."""
    spec = ROW_SPECS[name]
    lv = LEVELS[level]
    cases = row_cases(dtype, lv.rows_per_kind)
    refs = [reference_rows(name, c) for c in cases]
    dname = str(dtype).replace("torch.", "")
    rows = []
    for vname, fn in (("stable", spec.stable), ("naive", spec.naive), ("builtin", spec.builtin)):
        verrs, gerrs, vin, gin = [], [], [], []
        for case, (vh, vl, gh, gl) in zip(cases, refs, strict=True):
            x = torch.tensor(case.rows, dtype=torch.float64).to(dtype).requires_grad_()
            out = fn(x)
            verrs.append(ulp_error(out.reshape(-1), vh, vl, dtype))
            w = torch.tensor(case.weights).to(dtype) if name == "log_softmax" else None
            (g,) = torch.autograd.grad(
                out, x, grad_outputs=w if w is not None else torch.ones_like(out)
            )
            gerrs.append(ulp_error(g.reshape(-1), gh, gl, dtype))
            label = np.array([f"n={case.n}:{lab}" for lab in case.labels])
            vin.append(label if name == "logsumexp" else np.repeat(label, case.n))
            gin.append(np.repeat(label, case.n))
        verr, gerr = torch.cat(verrs), torch.cat(gerrs)
        vlab, glab = np.concatenate(vin), np.concatenate(gin)
        for q, err, lab in (("value", verr, vlab), ("grad", gerr, glab)):
            finite = torch.isfinite(err)
            i = int(torch.nan_to_num(err, posinf=1e308).argmax())
            rows.append(
                AuditRow(
                    name,
                    dname,
                    vname,
                    q,
                    err.numel(),
                    float(err.max()),
                    float(err[finite].mean()) if finite.any() else 0.0,
                    int((~finite).sum()),
                    str(lab[i]),
                )
            )
    return rows
