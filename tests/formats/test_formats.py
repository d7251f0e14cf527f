"""``mixprec.formats``: names, aliases, custom eXmY formats and their derived properties.

Expected values come from outside mixprec: ``torch.finfo`` where torch has the dtype,
``ml_dtypes.finfo`` for the ml_dtypes formats, and hand-derived exact values (``float.fromhex``
and integer arithmetic from the format definitions) for everything, tfloat32 and custom formats
included.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

from mixprec.formats import FORMATS, FloatFormat, get_format

H = float.fromhex

# name: (exponent bits, mantissa bits, bias, bits, max, min normal, min subnormal, eps,
#        has_infinity, has_nan, has_negative_zero, torch dtype)
EXPECTED = {
    "float64": (11, 52, 1023, 64, H("0x1.fffffffffffffp+1023"), H("0x1p-1022"), H("0x1p-1074"),
                H("0x1p-52"), True, True, True, torch.float64),
    "float32": (8, 23, 127, 32, H("0x1.fffffep+127"), H("0x1p-126"), H("0x1p-149"), H("0x1p-23"),
                True, True, True, torch.float32),
    "tfloat32": (8, 10, 127, 19, H("0x1.ffcp+127"), H("0x1p-126"), H("0x1p-136"), H("0x1p-10"),
                 True, True, True, None),
    "bfloat16": (8, 7, 127, 16, H("0x1.fep+127"), H("0x1p-126"), H("0x1p-133"), H("0x1p-7"),
                 True, True, True, torch.bfloat16),
    "float16": (5, 10, 15, 16, 65504.0, H("0x1p-14"), H("0x1p-24"), H("0x1p-10"),
                True, True, True, torch.float16),
    "float8_e4m3fn": (4, 3, 7, 8, 448.0, H("0x1p-6"), H("0x1p-9"), 0.125,
                      False, True, True, torch.float8_e4m3fn),
    "float8_e4m3fnuz": (4, 3, 8, 8, 240.0, H("0x1p-7"), H("0x1p-10"), 0.125,
                        False, True, False, torch.float8_e4m3fnuz),
    "float8_e5m2": (5, 2, 15, 8, 57344.0, H("0x1p-14"), H("0x1p-16"), 0.25,
                    True, True, True, torch.float8_e5m2),
    "float8_e5m2fnuz": (5, 2, 16, 8, 57344.0, H("0x1p-15"), H("0x1p-17"), 0.25,
                        False, True, False, torch.float8_e5m2fnuz),
    "float8_e4m3": (4, 3, 7, 8, 240.0, H("0x1p-6"), H("0x1p-9"), 0.125, True, True, True, None),
    "float8_e3m4": (3, 4, 3, 8, 15.5, 0.25, H("0x1p-6"), H("0x1p-4"), True, True, True, None),
    "float8_e4m3b11fnuz": (4, 3, 11, 8, 30.0, H("0x1p-10"), H("0x1p-13"), 0.125,
                           False, True, False, None),
    "float8_e8m0fnu": (8, 0, 127, 8, H("0x1p127"), H("0x1p-127"), H("0x1p-127"), 1.0,
                       False, True, False, torch.float8_e8m0fnu),
    "float6_e3m2fn": (3, 2, 3, 6, 28.0, 0.25, 0.0625, 0.25, False, False, True, None),
    "float6_e2m3fn": (2, 3, 1, 6, 7.5, 1.0, 0.125, 0.125, False, False, True, None),
    "float4_e2m1fn": (2, 1, 1, 4, 6.0, 1.0, 0.5, 0.5, False, False, True, None),
}  # fmt: skip

ALIASES = {  # docs/design.md's short names (and the usual spellings) -> canonical name
    "fp64": "float64", "fp32": "float32", "tf32": "tfloat32", "bf16": "bfloat16",
    "fp16": "float16", "half": "float16", "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2",
    "e2m1": "float4_e2m1fn", "e3m2": "float6_e3m2fn", "e2m3": "float6_e2m3fn",
    "e8m0": "float8_e8m0fnu", "e4m3fn": "float8_e4m3fn", "e4m3fnuz": "float8_e4m3fnuz",
    "e5m2fnuz": "float8_e5m2fnuz", "e3m4": "float8_e3m4", "fp4": "float4_e2m1fn",
}  # fmt: skip

FIELDS = (
    "exponent_bits", "mantissa_bits", "bias", "bits", "max", "min_normal", "min_subnormal", "eps",
    "has_infinity", "has_nan", "has_negative_zero", "torch_dtype",
)  # fmt: skip


def _fields(f: FloatFormat) -> tuple:
    return tuple(getattr(f, name) for name in FIELDS)


def test_every_design_name_is_there():
    assert set(EXPECTED) <= set(FORMATS)
    for name in EXPECTED:
        assert FORMATS[name] is get_format(name)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_canonical_properties(name):
    f = get_format(name)
    assert f.name == name
    got = _fields(f)
    for field, g, e in zip(FIELDS, got, EXPECTED[name], strict=True):
        assert g == e and type(g) is type(e), f"{name}.{field}: {g!r} != {e!r}"
        if isinstance(e, float):
            assert g.hex() == e.hex()


@pytest.mark.parametrize("alias", list(ALIASES))
def test_aliases(alias):
    assert get_format(alias) is get_format(ALIASES[alias])
    assert get_format(alias).name == ALIASES[alias]


@pytest.mark.parametrize(
    "name", [n for n, e in EXPECTED.items() if e[-1] is not None and n not in ("float64",)]
)
def test_against_torch_finfo(name):
    f = get_format(name)
    fi = torch.finfo(f.torch_dtype)
    assert f.bits == fi.bits
    assert f.max == fi.max
    # e8m0 is unsigned: torch's finfo.min is its smallest value, not -max
    assert fi.min == (f.min_subnormal if name == "float8_e8m0fnu" else -f.max)
    assert f.min_normal == fi.tiny == fi.smallest_normal
    if name != "float8_e5m2fnuz":  # torch 2.13 reports eps 0.125 for e5m2fnuz; it has 2 bits
        assert f.eps == fi.eps
    assert get_format(f.torch_dtype) is f


@pytest.mark.parametrize(
    "name", [n for n in EXPECTED if hasattr(ml_dtypes, n) and n.startswith(("float8", "float6",
                                                                            "float4", "bfloat"))]
)  # fmt: skip
def test_against_ml_dtypes_finfo(name):
    f = get_format(name)
    fi = ml_dtypes.finfo(getattr(ml_dtypes, name))
    assert f.bits == fi.bits
    assert f.max == float(fi.max)
    assert f.min_normal == float(fi.smallest_normal)
    assert f.min_subnormal == float(fi.smallest_subnormal)
    assert f.eps == float(fi.eps)
    assert f.mantissa_bits == fi.nmant
    assert f.exponent_bits == fi.nexp


def test_float64_float32_float16_against_numpy():
    for name, t in (("float64", np.float64), ("float32", np.float32), ("float16", np.float16)):
        f, fi = get_format(name), np.finfo(t)
        assert (f.max, f.min_normal, f.min_subnormal, f.eps) == (
            float(fi.max), float(fi.smallest_normal), float(fi.smallest_subnormal), float(fi.eps)
        )  # fmt: skip


def test_torch_dtype_lookup():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16,
                  torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu):  # fmt: skip
        assert get_format(dtype).torch_dtype == dtype
    with pytest.raises(ValueError):
        get_format(torch.int32)


# ----------------------------------------------------------------------------------------------
# custom eXmY
# ----------------------------------------------------------------------------------------------


def _custom_expected(x: int, y: int) -> tuple:
    """IEEE-style eXmY from the definition, in exact arithmetic."""
    bias = (1 << (x - 1)) - 1
    emax = (1 << x) - 2 - bias  # all-ones exponent is inf/NaN
    vmax = (2 - Fraction(1, 1 << y)) * Fraction(2) ** emax
    min_normal = Fraction(2) ** (1 - bias)
    min_sub = min_normal / (1 << y)  # y = 0: no subnormals, the smallest value is min_normal
    has_nan = y > 0  # with no mantissa bits the all-ones exponent can only mean inf
    return (x, y, bias, 1 + x + y, float(vmax), float(min_normal), float(min_sub),
            float(Fraction(1, 1 << y)), True, has_nan, True)  # fmt: skip


# docs/design.md's short aliases win over the eXmY rule (e4m3 is the OCP float8_e4m3fn, ...)
ALIASED_EXMY = {"e4m3", "e5m2", "e2m1", "e3m2", "e2m3", "e8m0", "e3m4"}


@pytest.mark.parametrize("x", range(2, 12))
def test_custom_formats(x):
    for y in range(53):
        name = f"e{x}m{y}"
        if name in ALIASED_EXMY:
            assert get_format(name) is get_format(ALIASES[name])
            continue
        f = get_format(name)
        assert isinstance(f, FloatFormat)
        assert f.name == name
        assert _fields(f)[:-1] == _custom_expected(x, y), name


def test_custom_formats_that_are_standard_ones():
    """e5m10, e8m7, e8m23, e11m52 have exactly the values of float16/bfloat16/float32/float64."""
    for custom, std in (("e5m10", "float16"), ("e8m7", "bfloat16"), ("e8m23", "float32"),
                        ("e11m52", "float64"), ("e8m10", "tfloat32")):  # fmt: skip
        assert _fields(get_format(custom))[:-1] == _fields(get_format(std))[:-1]


@pytest.mark.parametrize("bad", ["e1m2", "e12m3", "e3m53", "e0m0", "e4m100", "e20m1"])
def test_custom_out_of_range(bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        get_format(bad)


# ----------------------------------------------------------------------------------------------
# errors and value semantics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["float7", "fp8", "", "e4m3fnuzz", "bfloat32", "int8"])
def test_unknown_names_short_message(bad):
    """The bad value and where to find the names, not a list of every name."""
    with pytest.raises(ValueError) as info:
        get_format(bad)
    message = str(info.value)
    assert message.startswith(f"unknown format {bad!r}")
    assert "mixprec formats" in message and "eXmY" in message
    assert len(message) < 220, message


@pytest.mark.parametrize(
    ("bad", "meant"),
    [
        # floatN_eXmY near-misses used to be read as IEEE-style customs with inf (float4_e2m1
        # had max 3 and overflowed to inf), a signed e8m0, or ignored N (float99_e5m2)
        ("float4_e2m1", "float4_e2m1fn"), ("float6_e3m2", "float6_e3m2fn"),
        ("float6_e2m3", "float6_e2m3fn"), ("float8_e8m0", "float8_e8m0fnu"),
        ("float99_e5m2", "float8_e5m2"), ("float16_e5m10", "e5m10"),
        ("bfloat17", "bfloat16"), ("e4m3fnuzz", "e4m3fnuz"), ("float8_e4m3fnz", "float8_e4m3fnuz"),
        ("fp8", "fp8_e5m2"), ("float8", "float8_e4m3fn"), ("e04m3", "e4m3"),
    ],
)  # fmt: skip
def test_near_misses_are_refused_with_a_suggestion(bad, meant):
    with pytest.raises(ValueError, match="did you mean") as info:
        get_format(bad)
    message = str(info.value)
    assert message.startswith(f"unknown format {bad!r}; did you mean ")
    assert repr(meant) in message.split("?")[0]
    assert len(message) < 250, message


@pytest.mark.parametrize(
    "bad", ["float8_e4m3fnu", "float8_e5m2fn", "e5m2fnuz_", "e4m3 fn", "e4m3\n1", "e٤m3",
            "fp4_e2m1fn", "float8_e4m3b11", "e5m6fn", "float8e4m3", "e+4m3"],
)  # fmt: skip
def test_invalid_spellings_are_refused(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        get_format(bad)


def test_mx_names_point_to_mixprec_mx():
    with pytest.raises(ValueError, match="'mxfp8_e4m3' is an MX block format") as info:
        get_format("mxfp8_e4m3")
    assert "'float8_e4m3fn'" in str(info.value) and "mx_quantize" in str(info.value)
    # the short MX names are MX formats too (one registry): mxfp8 is mxfp8_e4m3
    with pytest.raises(ValueError, match="'mxfp8' is an MX block format") as info:
        get_format("mxfp8")
    assert "'float8_e4m3fn'" in str(info.value)
    with pytest.raises(ValueError, match="did you mean 'mxfp8_e4m3' or 'mxfp8_e5m2'"):
        get_format("mxfp8_e4m2")


def test_exact_names_still_accepted():
    """Case and surrounding blanks are forgiven; every canonical name, alias and eXmY works."""
    assert get_format(" BF16 ") is get_format("bfloat16")
    assert get_format("Float8_E4M3FN") is get_format("float8_e4m3fn")
    assert get_format("float8_e4m3").has_infinity  # the canonical IEEE-style 8-bit e4m3
    assert get_format("e6m9").name == "e6m9"


@pytest.mark.parametrize("bad", [3, 2.5, None, b"bf16", ["bf16"], np.float16])
def test_non_strings_raise_type_error(bad):
    with pytest.raises(TypeError):
        get_format(bad)


def test_frozen_and_hashable():
    f = get_format("bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.mantissa_bits = 3  # type: ignore[misc]
    assert get_format(f) is f
    assert {f: 1}[get_format("bfloat16")] == 1
    assert get_format("e4m3") != get_format("float8_e4m3")  # OCP e4m3fn vs IEEE-style e4m3
    assert get_format("e5m7") == get_format("e5m7")
