"""Property-based tests (hypothesis) of ``mixprec.quantize``, through both backends.

Properties: idempotence, monotonicity, decode(encode(x)) == quantize(x), sign symmetry (nearest,
toward_zero, odd) and up(x) == -down(-x), stochastic results are neighbours, quantize_ and out=
equal quantize, float64 and half-precision inputs agree with float32 inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixprec.formats import FORMATS
from mixprec.quantization import decode, encode, quantize, quantize_

NAMES = [*FORMATS, "e3m1", "e2m0", "e5m0", "e6m9", "e11m40", "e9m2"]
SIGNED = [n for n in NAMES if n != "float8_e8m0fnu"]
# no NaN code: fp6 / fp4 (finite), and IEEE-style eXm0 (no mantissa bit to tell NaN from inf)
NO_NAN = {"float6_e3m2fn", "float6_e2m3fn", "float4_e2m1fn", "e2m0", "e5m0"}
SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0]
FNUZ = {"float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz"}
DETERMINISTIC = ("nearest", "toward_zero", "up", "down", "odd")

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # reproducible CI runs; the exhaustive sweeps live in the other files
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # backend is per test, fine
)


def _bits_to_floats(width: int) -> st.SearchStrategy[np.ndarray]:
    itype, ftype = (np.uint32, np.float32) if width == 32 else (np.uint64, np.float64)
    return st.lists(st.integers(0, (1 << width) - 1), min_size=1, max_size=40).map(
        lambda b: np.array(b, dtype=itype).view(ftype)
    )


def float_arrays(width: int) -> st.SearchStrategy[np.ndarray]:
    """Mixed: hypothesis' float edge cases, values near the fp8/fp16 ranges, raw bit patterns."""
    ftype = np.float32 if width == 32 else np.float64
    floats = st.one_of(
        st.floats(width=width),
        st.floats(-70000, 70000, width=width),
        st.floats(-(2.0**-5), 2.0**-5, width=width),
    )
    listed = st.lists(floats, min_size=1, max_size=40).map(lambda v: np.array(v, dtype=ftype))
    return st.tuples(listed, _bits_to_floats(width)).map(np.concatenate)


def tensors() -> st.SearchStrategy[torch.Tensor]:
    return st.one_of(float_arrays(32), float_arrays(64)).map(torch.from_numpy)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, any NaN equals any NaN."""
    ia = a.view(torch.int64 if a.dtype == torch.float64 else torch.int32)
    ib = b.view(torch.int64 if b.dtype == torch.float64 else torch.int32)
    return bool(((ia == ib) | (torch.isnan(a) & torch.isnan(b))).all())


def _equal_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as numbers (-0 == +0), NaN equals NaN."""
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


@SETTINGS
@given(
    x=tensors(),
    name=st.sampled_from(NAMES),
    mode=st.sampled_from((*DETERMINISTIC, "stochastic")),
    saturate=st.booleans(),
    subnormals=st.booleans(),
)
def test_idempotent(backend, x, name, mode, saturate, subnormals):
    opts = {"rounding": mode, "saturate": saturate, "subnormals": subnormals}
    q = quantize(x, name, **opts)
    assert q.dtype == x.dtype and q.shape == x.shape
    assert _same(quantize(q, name, **opts), q)
    # a representable value is unchanged by every rounding mode
    for other in DETERMINISTIC:
        assert _same(quantize(q, name, rounding=other, saturate=saturate, subnormals=subnormals), q)


# a tensor, a format, a deterministic rounding mode and a saturate flag
DETERMINISTIC_CASE = {
    "x": tensors(),
    "name": st.sampled_from(NAMES),
    "mode": st.sampled_from(DETERMINISTIC),
    "saturate": st.booleans(),
}


@SETTINGS
@given(**DETERMINISTIC_CASE, subnormals=st.booleans())
def test_monotone(backend, x, name, mode, saturate, subnormals):
    xs = torch.sort(x[~torch.isnan(x)]).values
    q = quantize(xs, name, rounding=mode, saturate=saturate, subnormals=subnormals)
    q = q[~torch.isnan(q)]  # overflow to NaN / e8m0 negatives: outside any order
    assert bool((q[1:] >= q[:-1]).all()), (xs.tolist(), q.tolist())


@SETTINGS
@given(**DETERMINISTIC_CASE)
def test_decode_encode_is_quantize(backend, x, name, mode, saturate):
    x = torch.cat([x, torch.tensor(SPECIALS, dtype=x.dtype)])
    if name in NO_NAN:
        x = x[~torch.isnan(x)]  # no NaN code: encode raises (tested in test_encode_decode.py)
    q = quantize(x, name, rounding=mode, saturate=saturate)
    codes = encode(x, name, rounding=mode, saturate=saturate)
    assert codes.shape == x.shape and not codes.dtype.is_floating_point
    assert _same(decode(codes, name, dtype=x.dtype), q)


@SETTINGS
@given(x=tensors(), name=st.sampled_from(SIGNED), saturate=st.booleans(), sub=st.booleans())
def test_sign_symmetry(backend, x, name, saturate, sub):
    opts = {"saturate": saturate, "subnormals": sub}
    for mode in ("nearest", "toward_zero", "odd"):
        a, b = quantize(-x, name, rounding=mode, **opts), -quantize(x, name, rounding=mode, **opts)
        # fnuz formats have no -0: q(-tiny) = +0 while -q(tiny) = -0
        assert _equal_values(a, b) if name in FNUZ else _same(a, b), mode
    up = quantize(x, name, rounding="up", **opts)
    down_neg = -quantize(-x, name, rounding="down", **opts)
    assert _equal_values(up, down_neg) if name in FNUZ else _same(up, down_neg)


@SETTINGS
@given(x=tensors(), name=st.sampled_from(NAMES), seed=st.integers(0, 2**32))
def test_stochastic_gives_a_neighbour(backend, x, name, seed):
    g = torch.Generator().manual_seed(seed)
    q = quantize(x, name, rounding="stochastic", generator=g)
    lo, hi = quantize(x, name, rounding="down"), quantize(x, name, rounding="up")
    hit_lo = (q == lo) | (torch.isnan(q) & torch.isnan(lo))
    hit_hi = (q == hi) | (torch.isnan(q) & torch.isnan(hi))
    # where down gives -max and up overflows (or the reverse), stochastic may give either
    assert bool((hit_lo | hit_hi).all())


@SETTINGS
@given(
    x=tensors(),
    name=st.sampled_from(NAMES),
    mode=st.sampled_from(DETERMINISTIC),
    half=st.sampled_from([None, torch.float16, torch.bfloat16]),
    strided=st.booleans(),
)
def test_inplace_and_out_equal_quantize(backend, x, name, mode, half, strided):
    if half is not None:
        x = x.to(half)
    if strided:
        x = torch.stack([x, torch.zeros_like(x)], 1)[:, 0]  # a non-contiguous view
    q = quantize(x, name, rounding=mode)
    if half is not None:  # widened, rounded, narrowed back (nearest) into the input dtype
        assert _same(q.float(), quantize(x.float(), name, rounding=mode).to(half).float())
    out = torch.full_like(x, 7.0)
    assert quantize(x, name, rounding=mode, out=out) is out
    assert _same(out.float(), q.float())
    y = x.clone()
    assert quantize_(y, name, rounding=mode) is y
    assert _same(y.float(), q.float())
    base = torch.stack([x, x], 1)
    view = base[:, 1]
    quantize_(view, name, rounding=mode)
    assert _same(base[:, 1].float(), q.float()) and _same(base[:, 0].float(), x.float())


@SETTINGS
@given(x=float_arrays(32), name=st.sampled_from(NAMES), mode=st.sampled_from(DETERMINISTIC))
def test_float64_inputs_agree_with_float32(backend, x, name, mode):
    x32 = torch.from_numpy(x)
    q32 = quantize(x32, name, rounding=mode)
    q64 = quantize(x32.double(), name, rounding=mode)
    assert _same(q64, q32.double()), name


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_monotone_dense(backend, mode):
    """A dense sorted sweep over fp32 (every 2^15-th / 2^17-th bit pattern), every format."""
    step = 1 << 15 if backend == "c" else 1 << 17  # the torch path is slower
    pos = torch.arange(0, 0x7F800001, step, dtype=torch.int64).to(torch.int32)
    xs = torch.cat([-pos.view(torch.float32).flip(0), pos.view(torch.float32)])
    for name in NAMES:
        q = quantize(xs, name, rounding=mode)
        q = q[~torch.isnan(q)]
        assert bool((q[1:] >= q[:-1]).all()), name


@pytest.mark.parametrize("mode", DETERMINISTIC)
@pytest.mark.parametrize("saturate", [False, True])
def test_formats_wider_than_the_container_stop_at_a_format_value(
    backend: str, mode: str, saturate: bool
) -> None:
    """e9m2's range passes float32's: the largest e9m2 value float32 holds is 1.75 * 2^127,
    not float32's max (which needs 23 mantissa bits). Saturation and directed overflow stop
    there, as decode(encode(x)) does; formats with float32's precision or more (e11m40) stop at
    float32's max."""
    top = 1.75 * 2.0**127
    x = torch.tensor([float("inf"), 3.4e38, 3.3e38, 3.1e38, 2.9e38, 2.5e38])
    x = torch.cat([x, -x])
    q = quantize(x, "e9m2", rounding=mode, saturate=saturate)
    assert _same(q, decode(encode(x, "e9m2", rounding=mode, saturate=saturate), "e9m2"))
    finite = q[torch.isfinite(q)]
    assert bool((finite.abs() <= top).all()) and bool((finite.abs() == top).any())
    if saturate:
        assert torch.equal(q[[0, 6]], torch.tensor([top, -top]))
    fmax = torch.finfo(torch.float32).max
    wide = quantize(x, "e11m40", rounding=mode, saturate=True)
    assert float(wide[0]) == fmax and float(wide[6]) == -fmax
