"""``mixprec.formats.describe``: format_info, encoding_patterns, round_exact, bit_pattern, explain.

Expected values come from ml_dtypes / numpy (finfo, every bit pattern decoded by ml_dtypes),
``fractions.Fraction`` and ``math.nextafter``, or are written out by hand. The exact scalar
rounding is also compared with mixprec's own tensor kernels (``quantize``, ``encode``), which the
quantization tests check against ml_dtypes and torch: the two implementations must agree bit for
bit, over every format, mode and saturation.
"""

from __future__ import annotations

import ast
import bisect
import inspect
import math
import random
import re
import struct
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

import mixprec.formats as mf
import mixprec.formats.describe as describe_module
from mixprec.formats import FORMATS, get_format
from mixprec.quantization import ROUNDING_MODES, encode, quantize

ML_FORMATS = [
    "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "float8_e4m3", "float8_e3m4", "float8_e4m3b11fnuz", "float8_e8m0fnu", "float6_e3m2fn",
    "float6_e2m3fn", "float4_e2m1fn",
]  # fmt: skip
CUSTOM = ["e6m9", "e5m0", "e2m0", "e11m50", "e11m51", "e3m1"]
MODES = ("nearest", "toward_zero", "up", "down", "odd")


def _same(a: float, b: float) -> bool:
    """Equal values with equal signs (zeros included); NaN equals NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


# ----------------------------------------------------------------------------------------------
# the module stays in the bottom layer
# ----------------------------------------------------------------------------------------------


def test_no_torch_at_import() -> None:
    """formats has no tensor kernels: describe.py imports no torch (nor quantization) at all."""
    tree = ast.parse(inspect.getsource(describe_module))
    names = [
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not [n for n in names if n.startswith(("torch", "mixprec.quantization", "numpy"))]


def test_modes_match_quantize() -> None:
    assert set(describe_module.DETERMINISTIC_MODES) == set(ROUNDING_MODES) - {"stochastic"}


# ----------------------------------------------------------------------------------------------
# round_exact and bit_pattern against quantize and encode
# ----------------------------------------------------------------------------------------------


def _grid(name: str) -> list[float]:
    """Values to round in a format: its values and their midpoints near zero, the subnormal and
    normal boundaries and max, quarter steps, values past max, random floats, specials."""
    f = get_format(name)
    rng = random.Random(name)
    q = f.min_subnormal
    xs = [0.0, -0.0, math.inf, -math.inf, math.nan, f.max, f.min_normal, q]
    xs += [k * q / 4 for k in range(1, 40)]
    xs += [f.min_normal * (1 + k / 8) for k in range(-6, 20)]
    step = f.max * f.eps / 2  # the spacing just below max
    xs += [f.max + k * step / 4 for k in range(-9, 12)]
    xs += [f.max * 4, 1e308, 5e-324, 1.0, 1.5, 3.0, 0.1]
    xs += [math.ldexp(rng.random(), rng.randint(f.emin - f.mantissa_bits - 2, f.emax + 1))
           for _ in range(60)]  # fmt: skip
    return [s * x for x in xs for s in (1.0, -1.0)]


@pytest.mark.parametrize("name", [*FORMATS, *CUSTOM])
def test_round_exact_matches_quantize(name: str) -> None:
    f = get_format(name)
    xs = _grid(name)
    t = torch.tensor(xs, dtype=torch.float64)
    for mode in MODES:
        for saturate in (False, True):
            want = quantize(t, f, rounding=mode, saturate=saturate).tolist()
            for x, w in zip(xs, want, strict=True):
                got = mf.round_exact(x, f, mode, saturate)
                assert _same(got, w), (name, mode, saturate, x, got, w)


@pytest.mark.parametrize("name", [*FORMATS, *CUSTOM])
def test_bit_pattern_matches_encode(name: str) -> None:
    f = get_format(name)
    values = quantize(torch.tensor(_grid(name), dtype=torch.float64), f).tolist()
    if f.bits == 64:  # float64's own layout: struct; encode's int64 path cannot hold it
        want = [struct.unpack("<Q", struct.pack("<d", v))[0] for v in values if not math.isnan(v)]
        got = [mf.bit_pattern(v, f) for v in values if not math.isnan(v)]
        assert got == want
        assert mf.bit_pattern(math.nan, f) == 0x7FF8000000000000
        return
    codes = encode(torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64), f)
    mask = (1 << f.bits) - 1
    want = [c & mask for c in codes.tolist()]
    assert [mf.bit_pattern(v, f) for v in values if not math.isnan(v)] == want
    if f.has_nan:
        assert mf.bit_pattern(math.nan, f) == int(encode(torch.tensor([math.nan]), f)[0]) & mask
    else:
        assert mf.bit_pattern(math.nan, f) is None


def test_round_exact_uses_the_exact_value() -> None:
    # 1 + 2^-8 + 2^-60: float64 would round it to the bf16 tie 1 + 2^-8 (-> 1.0, ties to even);
    # the exact value lies above the tie
    x = Fraction(1) + Fraction(1, 2**8) + Fraction(1, 2**60)
    assert mf.round_exact(float(x), "bf16") == 1.0
    assert mf.round_exact(x, "bf16") == 1 + 2**-7
    assert mf.round_exact(Fraction(1, 10), "bf16", "down") == 0.099609375
    assert mf.round_exact(10**400, "fp16", "toward_zero") == 65504.0  # an int past float64's range
    assert mf.round_exact(3, "e8m0") == 4.0  # e8m0: ties go up
    assert mf.round_exact(Fraction(1, 2**200), "e8m0") == 2.0**-127  # no zero
    assert math.isnan(mf.round_exact(-2, "e8m0"))  # unsigned
    assert _same(mf.round_exact(-0.0, "e4m3fnuz"), 0.0)  # no negative zero
    assert _same(mf.round_exact(Fraction(-1, 10**30), "fp16"), -0.0)


def test_round_exact_bad_arguments() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown rounding mode 'stochastic' \(valid: nearest, toward_zero, up, down, odd\)",
    ):
        mf.round_exact(1, "bf16", "stochastic")
    with pytest.raises(TypeError, match="expected an int, float or Fraction, got str"):
        mf.round_exact("1", "bf16")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="saturate must be a bool, got"):
        mf.round_exact(1, "bf16", "nearest", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown format 'bf17'"):
        mf.round_exact(1, "bf17")


def test_bit_pattern_rejects_values_not_in_the_format() -> None:
    assert mf.bit_pattern(0.10009765625, "bf16") == 0x3DCD
    assert mf.bit_pattern(-0.0, "fp16") == 0x8000 and mf.bit_pattern(-0.0, "e4m3fnuz") == 0
    assert mf.bit_pattern(-math.inf, "e5m2") == 0xFC
    bad = ((0.1, "bf16"), (math.inf, "e4m3"), (0.0, "e8m0"), (-2.0, "e8m0"), (2**1024, "fp64"))
    for x, fmt in bad:
        with pytest.raises(ValueError, match="is not a value of"):
            mf.bit_pattern(x, fmt)


# ----------------------------------------------------------------------------------------------
# format_info, format_table, encoding_patterns (moved from the CLI tests: same assertions)
# ----------------------------------------------------------------------------------------------


def _expand(bits: str) -> str:
    return re.sub(r"([01])\{(\d+)\}", lambda m: m.group(1) * int(m.group(2)), bits)


def codes_of_pattern(pattern: str, e: int, m: int) -> set[int]:
    """All codes an encoding string such as 'S.11111.MM≠0' or '0x80' stands for."""
    if pattern == "none":
        return set()
    if pattern.startswith("0x"):
        return {int(pattern, 16)}
    s, ep, mp = pattern.split(".")
    ep = _expand(ep)
    assert s == "S" and len(ep) == e, pattern
    if mp.endswith("≠0"):
        mants = range(1, 1 << m)
    else:
        mp = _expand(mp)
        assert len(mp) == m, pattern
        mants = [int(mp, 2)]
    return {(sign << (e + m)) | (int(ep, 2) << m) | mt for sign in (0, 1) for mt in mants}


@pytest.mark.parametrize("name", [*ML_FORMATS, "float16"])
def test_special_encodings_match_ml_dtypes(name: str) -> None:
    d = mf.format_info(name)
    t = np.float16 if name == "float16" else getattr(ml_dtypes, name)
    bits = d["bits"]
    container = np.uint8 if bits <= 8 else np.uint16
    with np.errstate(invalid="ignore"):  # NaN patterns
        vals = np.arange(1 << bits, dtype=container).view(t).astype(np.float64)
    inf_codes = set(np.flatnonzero(np.isinf(vals)).tolist())
    nan_codes = set(np.flatnonzero(np.isnan(vals)).tolist())
    e, m = d["exponent_bits"], d["mantissa_bits"]
    assert codes_of_pattern(d["inf_encoding"], e, m) == inf_codes
    assert codes_of_pattern(d["nan_encoding"], e, m) == nan_codes
    assert d["has_infinity"] == bool(inf_codes) and d["has_nan"] == bool(nan_codes)
    finite = vals[np.isfinite(vals)]
    assert d["max"] == finite.max()
    assert d["min_subnormal"] == finite[finite > 0].min()
    assert d["has_negative_zero"] == any(
        v == 0 and math.copysign(1, v) < 0 for v in finite.tolist()
    )


def test_encoding_patterns_by_hand() -> None:
    assert mf.encoding_patterns("bf16") == {
        "inf": "S.11111111.0000000",
        "nan": "S.11111111.MMMMMMM≠0",
    }
    assert mf.encoding_patterns("fp64") == {"inf": "S.1{11}.0{52}", "nan": "S.1{11}.M{52}≠0"}
    assert mf.encoding_patterns("e4m3") == {"inf": "none", "nan": "S.1111.111"}
    assert mf.encoding_patterns("e4m3fnuz") == {"inf": "none", "nan": "0x80"}
    assert mf.encoding_patterns("e8m0") == {"inf": "none", "nan": "0xFF"}
    assert mf.encoding_patterns("fp4") == {"inf": "none", "nan": "none"}
    assert mf.encoding_patterns("e5m0") == {"inf": "S.11111.", "nan": "none"}  # no bit for NaN


def test_format_table_and_info() -> None:
    rows = mf.format_table()
    assert [d["name"] for d in rows] == list(FORMATS)
    by_name = {d["name"]: d for d in rows}
    assert by_name["bfloat16"]["torch_dtype"] == "torch.bfloat16"
    assert by_name["float6_e2m3fn"]["torch_dtype"] is None
    assert by_name["float64"]["ml_dtype"] == "numpy.float64"
    assert "bf16" in by_name["bfloat16"]["aliases"]
    d = mf.format_info("e6m9")
    assert d["max"] == (2 - 2**-9) * 2.0**31 and float.fromhex(d["max_hex"]) == d["max"]
    assert d["inf_encoding"] == "S.111111.0{9}" and d["aliases"] == []
    assert d["torch_dtype"] is None and d["ml_dtype"] is None


def test_hexfloat_and_exact_decimal() -> None:
    assert mf.hexfloat(0.1) == "0x1.999999999999ap-4" and mf.hexfloat(2.0**-1074) == "0x1p-1074"
    assert mf.hexfloat(-0.0) == "-0x0p+0" and mf.hexfloat(-math.inf) == "-inf"
    assert mf.hexfloat(math.nan) == "nan"
    assert mf.exact_decimal(Fraction(3, 8)) == "0.375" and mf.exact_decimal(Fraction(-5)) == "-5"
    assert mf.exact_decimal(Fraction(0.1)) == str(Fraction(0.1).numerator * 5**55).join(["0.", ""])
    with pytest.raises(ValueError, match="1/10 is not a binary fraction"):
        mf.exact_decimal(Fraction(1, 10))


# ----------------------------------------------------------------------------------------------
# parse_value
# ----------------------------------------------------------------------------------------------


def test_parse_value_forms() -> None:
    assert mf.parse_value("0.1").exact == Fraction(1, 10)
    assert mf.parse_value("-1e-5").exact == Fraction(-1, 100000)
    assert mf.parse_value("3/4").exact == Fraction(3, 4)
    assert mf.parse_value("0x1.99ap-4").exact == Fraction(0x199A, 2**16)
    assert mf.parse_value("1_000").exact == 1000
    assert mf.parse_value("0e999999").exact == 0
    neg_zero = mf.parse_value("-0")
    assert neg_zero.exact == 0 and neg_zero.negative and _same(neg_zero.nearest_float(), -0.0)
    assert mf.parse_value("-inf") == mf.ExactValue("-inf", "inf", True)
    assert mf.parse_value("NaN").kind == "nan"
    assert mf.parse_value("1/3").nearest_float() == 1 / 3
    assert mf.parse_value("1e400").nearest_float() == math.inf


def test_exact_value_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="kind 'big' is not one of 'finite', 'inf', 'nan'"):
        mf.ExactValue("1", "big", False, Fraction(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a finite value needs exact=a Fraction"):
        mf.ExactValue("1", "finite", False)
    with pytest.raises(ValueError, match="a nan value needs exact=None"):
        mf.ExactValue("nan", "nan", False, Fraction(0))


@pytest.mark.parametrize("bad", ["abc", "0x", "1/0", "--1", "1e", "0xg", ""])
def test_parse_value_bad(bad: str) -> None:
    with pytest.raises(ValueError, match=r"cannot parse VALUE .*hex float"):
        mf.parse_value(bad)


def test_parse_value_bounds() -> None:
    with pytest.raises(ValueError, match=r"VALUE '1e999999' is out of range: .*1e1000.*inf"):
        mf.parse_value("1e999999")
    for text in ("-1e99999999999999999999", "0x1p-99999", "1e-1001"):
        with pytest.raises(ValueError, match="out of range"):
            mf.parse_value(text)
    with pytest.raises(ValueError, match="too many digits"):
        mf.parse_value("1" * 1300)
    with pytest.raises(TypeError, match="expected the value as text"):
        mf.parse_value(0.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# explain
# ----------------------------------------------------------------------------------------------


def test_explain_bf16() -> None:
    e = mf.explain("0.1", "bf16")
    assert isinstance(e, mf.Explanation) and e.fmt.name == "bfloat16"
    # by hand: 0.1 = 1.6 * 2^-4; bf16 keeps 7 fraction bits: 1.1001100|11001...b -> rounds up
    lo_v, hi_v = 0.099609375, 0.10009765625
    assert (e.below, e.above, e.result) == (lo_v, hi_v, hi_v)
    assert dict(e.results) == {
        "nearest": hi_v, "toward_zero": lo_v, "up": hi_v, "down": lo_v, "odd": hi_v,
    }  # fmt: skip
    v, ulp = Fraction(1, 10), Fraction(hi_v) - Fraction(lo_v)
    assert e.stochastic == ((lo_v, (Fraction(hi_v) - v) / ulp), (hi_v, (v - Fraction(lo_v)) / ulp))
    info = e.value_info(hi_v)
    assert info is not None
    assert (info["code"], info["sign"], info["exponent"], info["mantissa"]) == (
        0x3DCD, "0", "01111011", "1001101",
    )  # fmt: skip
    assert info["class"] == "normal: +2^-4 × 1.1001101b (= +1.6015625 × 2^-4)"
    err = e.error(hi_v)
    assert err["ulps"] == 0.2 and Fraction(err["absolute_exact"]) == Fraction(hi_v) - v
    assert e.notes == (
        "the input is not a float64 value (nearest float64: 0.1); it is used exactly",
    )


def test_explain_to_json_document() -> None:
    d = mf.explain("0.1", "bf16", "up").to_json()
    assert list(d) == [
        "schema_version", "format", "input", "rounding", "saturate", "result", "neighbours",
        "modes", "notes",
    ]  # fmt: skip
    assert d["schema_version"] == 1 and d["input"] == {
        "text": "0.1", "kind": "finite", "exact": "1/10", "float64": 0.1,
    }  # fmt: skip
    assert list(d["modes"]) == [*MODES, "stochastic"]
    assert d["result"]["value"] == 0.10009765625
    d = mf.explain("nan", "fp4").to_json()
    assert d["result"]["value"] == "nan" and "code" not in d["result"]


@pytest.mark.parametrize(
    "name", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float6_e2m3fn",
             "float4_e2m1fn"],
)  # fmt: skip
def test_explain_against_ml_dtypes(name: str) -> None:
    t = getattr(ml_dtypes, name)
    bits = ml_dtypes.finfo(t).bits
    container = np.uint8 if bits <= 8 else np.uint16
    with np.errstate(invalid="ignore"):  # NaN patterns
        all_vals = np.arange(1 << bits, dtype=container).view(t).astype(np.float64)
    vals = sorted(set(all_vals[np.isfinite(all_vals)].tolist()))
    top = max(vals)
    rng = np.random.default_rng(sum(map(ord, name)))
    picks = rng.uniform(-top, top, 6).tolist()
    picks += [float(rng.choice(vals)) for _ in range(2)]  # exact values
    i = len(vals) // 2 + 3
    picks.append((vals[i] + vals[i + 1]) / 2)  # an exact tie
    for x in picks:
        d = mf.explain(x, name).to_json()
        k = bisect.bisect_right(vals, x) - 1
        lo = vals[k]
        hi = lo if lo == x else vals[k + 1]
        assert d["neighbours"]["below"]["value"] == lo, x
        assert d["neighbours"]["above"]["value"] == hi, x
        assert d["modes"]["down"]["value"] == lo and d["modes"]["up"]["value"] == hi, x
        tz = lo if x >= 0 else hi
        assert d["modes"]["toward_zero"]["value"] == tz, x
        near = float(np.float64(x).astype(t))
        got = d["modes"]["nearest"]["value"]
        assert got == near and math.copysign(1, got) == math.copysign(1, near), x


def test_explain_float64_ties_decided_exactly() -> None:
    # 1 + 2^-53 is exactly halfway between 1 and nextafter(1, 2): ties to even gives 1
    tie = Fraction(1) + Fraction(1, 2**53)
    up = math.nextafter(1.0, 2.0)
    e = mf.explain(tie, "fp64")
    assert e.results["nearest"] == 1.0 and e.results["odd"] == up
    assert (e.below, e.above) == (1.0, up)
    assert mf.explain(tie + Fraction(1, 10**70), "fp64").results["nearest"] == up
    assert mf.explain("0.1", "fp64").results["down"] == math.nextafter(0.1, 0)
    e = mf.explain("1e400", "fp64")
    assert e.results["nearest"] == math.inf and e.results["down"] == 1.7976931348623157e308


def test_explain_overflow_and_saturation() -> None:
    e = mf.explain(1000, "e4m3")
    assert math.isnan(e.results["nearest"]) and e.results["toward_zero"] == 448.0
    assert (e.below, e.above) == (448.0, None)
    assert any("overflows to NaN" in n for n in e.notes)
    assert mf.explain(1000, "e4m3", saturate=True).results["nearest"] == 448.0
    e = mf.explain(-1e9, "e5m2")
    assert e.results["nearest"] == -math.inf and e.results["up"] == -57344.0
    assert e.stochastic == ((-math.inf, Fraction(1)),)
    e = mf.explain(7, "fp4")
    assert e.results["nearest"] == 6.0 and any("always saturates" in n for n in e.notes)


def test_explain_specials_and_zeros() -> None:
    e = mf.explain(-math.inf, "e4m3")
    assert math.isnan(e.result) and (e.below, e.above) == (None, -448.0)
    assert e.notes == ("float8_e4m3fn has no infinity: inf gives NaN without saturation, ±max "
                       "with --saturate",)  # fmt: skip
    e = mf.explain("-inf", "e5m2")
    assert e.result == -math.inf and (e.below, e.above) == (-math.inf, -math.inf)
    e = mf.explain("-inf", "e8m0")  # unsigned: no neighbours, as for any negative value
    assert math.isnan(e.result) and (e.below, e.above) == (None, None)
    assert any("unsigned" in n for n in e.notes)
    e = mf.explain(-0.0, "e4m3fnuz")
    assert _same(e.result, 0.0) and any("no negative zero" in n for n in e.notes)
    assert _same(mf.explain("-0", "fp16").result, -0.0)
    e = mf.explain(3, "e8m0")
    assert (e.below, e.above, e.result) == (2.0, 4.0, 4.0)  # e8m0 ties go up
    e = mf.explain(Fraction(-1, 10**400), "e8m0")
    assert math.isnan(e.result) and (e.below, e.above) == (None, None)


def test_explain_subnormal_notes() -> None:
    e = mf.explain("0x1.8p-20", "fp16")
    assert e.result == float.fromhex("0x1.8p-20") and e.value_info(e.result)["code"] == 24
    assert any("subnormal range" in n for n in e.notes)
    e = mf.explain("1e-9", "fp16")
    assert e.results["nearest"] == 0.0 and e.results["up"] == 2.0**-24
    assert any("underflows to zero" in n for n in e.notes)


def test_explain_value_types() -> None:
    assert (
        mf.explain(Fraction(1, 10), "bf16").to_json()["modes"]
        == mf.explain("1/10", "bf16").to_json()["modes"]
    )
    assert mf.explain(0.5, "bf16").value == mf.ExactValue("0.5", "finite", False, Fraction(1, 2))
    assert mf.explain(math.nan, "bf16").value.kind == "nan"
    with pytest.raises(ValueError, match="out of range"):
        mf.explain(Fraction(1, 10**1001), "bf16")
    with pytest.raises(ValueError, match="unknown rounding mode 'sideways'"):
        mf.explain(1, "bf16", "sideways")
    with pytest.raises(TypeError, match="expected the value as text, an ExactValue"):
        mf.explain([1], "bf16")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="saturate must be a bool, got"):
        mf.explain(1, "bf16", saturate="yes")  # type: ignore[arg-type]
