"""Bad and edge inputs to the public API: a clear error or the right answer, never a silent
wrong one (issue "no silent wrong answers").

Each property draws inputs with hypothesis and asserts that the call either raises
``ValueError``/``TypeError`` naming the bad value, raises what torch's own in-place/out= ops
raise (``RuntimeError``, torch's wording) for overlapping or self-overlapping written-to
memory, or returns a result bit-identical to a reference computed from a plain contiguous copy.
The validity oracles (which names exist, which codes are in range) are written here from the
documentation, independently of the library's code.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixprec.formats import ALIASES, FORMATS, FloatFormat, get_format
from mixprec.quantization import (
    MX_FORMATS,
    ROUNDING_MODES,
    decode,
    encode,
    fake_quantize,
    get_mx_format,
    mx_decode,
    mx_encode,
    mx_quantize,
    quantize,
    quantize_,
)

FAST = settings(max_examples=60, deadline=None, derandomize=True)
# the backend fixture only sets an environment variable: sharing it between examples is fine
FAST_FIXTURE = settings(
    FAST, suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40
)

VALID_NAMES = [*FORMATS, *ALIASES]
MX_NAMES = [*MX_FORMATS, "mxfp8", "mxfp6", "mxfp4"]  # docs/mx.md: the short names
MX_ELEMENTS = {m.element.name for m in MX_FORMATS.values()}
PARTIAL = "some elements of the input tensor and the written-to tensor refer to a single"
SELF_OVERLAP = "more than one element of the written-to tensor refers to a single memory"


_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit patterns (any NaN equals any NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    both_nan = torch.isnan(a) & torch.isnan(b)
    itype = _INT_OF[a.element_size()]
    ia, ib = a.reshape(-1).view(itype), b.reshape(-1).view(itype)
    return bool(((ia == ib) | both_nan.reshape(-1)).all())


# ----------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------


def _expected_format(name: str) -> FloatFormat | None:
    """The oracle, from docs/quantize.md: canonical names, aliases, plain eXmY; else None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in FORMATS:
        return FORMATS[key]
    m = re.fullmatch(r"e([1-9][0-9]*)m(0|[1-9][0-9]*)", key)
    if m and 2 <= int(m.group(1)) <= 11 and int(m.group(2)) <= 52:
        e, mm = int(m.group(1)), int(m.group(2))
        return FloatFormat(f"e{e}m{mm}", e, mm, (1 << (e - 1)) - 1, "ieee")
    return None


@st.composite
def near_misses(draw: st.DrawFn) -> str:
    """A valid name with one edit: a character inserted, dropped, replaced, or digits changed."""
    name = draw(st.sampled_from([*VALID_NAMES, *MX_NAMES]))
    i = draw(st.integers(0, len(name)))
    ch = draw(st.sampled_from(string.ascii_lowercase + string.digits + "_ "))
    kind = draw(st.sampled_from(["insert", "drop", "replace", "suffix", "case"]))
    if kind == "insert":
        return name[:i] + ch + name[i:]
    if kind == "drop" and name:
        return name[: max(i - 1, 0)] + name[i:]
    if kind == "replace" and i < len(name):
        return name[:i] + ch + name[i + 1 :]
    if kind == "suffix":
        return name + draw(st.sampled_from(["fn", "fnuz", "fnu", "_x2", "b11"]))
    return name.upper()


NAMES = st.one_of(
    near_misses(),
    st.text(max_size=12),
    st.from_regex(r"(float[0-9]{1,2}_)?e[0-9]{1,2}m[0-9]{1,2}(fn|fnuz|fnu)?", fullmatch=True),
    st.sampled_from(VALID_NAMES),
)


@FAST
@given(NAMES)
def test_get_format_names(name: str) -> None:
    expected = _expected_format(name)
    if expected is None:
        with pytest.raises(ValueError) as info:
            get_format(name)
        assert repr(name) in str(info.value)
        assert len(str(info.value)) < 300  # a pointer to the names, not the whole list
    else:
        got = get_format(name)
        assert (got.name, got.exponent_bits, got.mantissa_bits, got.bias, got.encoding) == (
            expected.name, expected.exponent_bits, expected.mantissa_bits, expected.bias,
            expected.encoding,
        )  # fmt: skip


@FAST
@given(NAMES)
def test_get_mx_format_names(name: str) -> None:
    key = name.strip().lower()
    elem = _expected_format(name)
    ok = key in MX_NAMES or (elem is not None and elem.name in MX_ELEMENTS)
    if ok:
        assert get_mx_format(name).element.name in MX_ELEMENTS
    else:
        with pytest.raises(ValueError) as info:
            get_mx_format(name)
        message = str(info.value)
        assert repr(name) in message or (elem is not None and elem.name in message)


@FAST
@given(name=NAMES, fn=st.sampled_from(["quantize", "quantize_", "encode", "fake_quantize"]))
def test_quantize_like_calls_check_the_name(name: str, fn: str) -> None:
    x = torch.linspace(-2, 2, 8)
    call: Callable[..., torch.Tensor] = {
        "quantize": quantize, "quantize_": quantize_, "encode": encode,
        "fake_quantize": fake_quantize,
    }[fn]  # fmt: skip
    expected = _expected_format(name)
    if expected is None:
        with pytest.raises(ValueError) as info:
            call(x.clone(), name)
        assert repr(name) in str(info.value)
        return
    got = call(x.clone(), name)
    if fn == "encode":
        assert torch.equal(got, encode(x, expected))
    else:
        assert _bits_equal(got, quantize(x, expected))


@FAST
@given(
    st.one_of(
        st.sampled_from(ROUNDING_MODES),
        st.text(max_size=12),
        st.sampled_from(["Nearest", "nearest ", "round", "toward-zero", "stochastic_", "ceil"]),
    )
)
def test_rounding_names(rounding: str) -> None:
    x = torch.linspace(-2, 2, 8)
    if rounding in ROUNDING_MODES:
        assert quantize(x, "e4m3", rounding=rounding).shape == (8,)
        return
    for call in (
        lambda: quantize(x, "e4m3", rounding=rounding),
        lambda: fake_quantize(x, "e4m3", grad_rounding=rounding),
        lambda: mx_quantize(x, rounding=rounding),
        lambda: mx_encode(x, rounding=rounding),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert repr(rounding) in str(info.value) and "toward_zero" in str(info.value)


BAD_OBJECTS = st.sampled_from([None, 3, 2.5, b"e4m3", ["e4m3"], {"fmt": 1}, np.float16, object()])


@FAST
@given(BAD_OBJECTS)
def test_wrong_types_name_the_type(bad: object) -> None:
    x = torch.ones(4)
    calls: list[Callable[[], object]] = [
        lambda: quantize(x, "e4m3", rounding=bad),  # type: ignore[arg-type]
        lambda: quantize(x, "e4m3", saturate=bad),  # type: ignore[arg-type]
        lambda: quantize(x, "e4m3", subnormals=bad),  # type: ignore[arg-type]
        lambda: encode(x, "e4m3", pack=bad),  # type: ignore[arg-type]
        lambda: decode(torch.zeros(4, dtype=torch.uint8), "e4m3", dtype=bad),  # type: ignore
        lambda: get_mx_format(bad),  # type: ignore[arg-type]
    ]
    if bad is not None:  # None is a valid generator, fmt=None and x=None are covered too
        calls += [
            lambda: quantize(x, "e4m3", generator=bad),  # type: ignore[arg-type]
            lambda: mx_quantize(x, generator=bad),  # type: ignore[arg-type]
            lambda: quantize(x, bad),  # type: ignore[arg-type]
            lambda: get_format(bad),  # type: ignore[arg-type]
            lambda: quantize(bad, "e4m3"),  # type: ignore[arg-type]
            lambda: decode(bad, "e4m3"),  # type: ignore[arg-type]
        ]
    for call in calls:
        with pytest.raises(TypeError) as info:
            call()
        assert type(bad).__name__ in str(info.value) or repr(bad) in str(info.value)


# ----------------------------------------------------------------------------------------------
# tensors: dtypes, shapes, layouts
# ----------------------------------------------------------------------------------------------

BAD_DTYPES = [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64,
              torch.float8_e4m3fn]  # fmt: skip
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FORMAT_CHOICES = ["e4m3", "e5m2", "bf16", "fp16", "fp4", "e3m2", "e8m0", "e6m9", "float8_e4m3"]


@FAST
@given(dtype=st.sampled_from(BAD_DTYPES), fn=st.integers(0, 5))
def test_non_float_tensors_are_refused(dtype: torch.dtype, fn: int) -> None:
    x = torch.ones(4).to(dtype)
    call = [
        lambda: quantize(x, "e4m3"), lambda: quantize_(x, "e4m3"), lambda: encode(x, "e4m3"),
        lambda: fake_quantize(x, "e4m3"), lambda: mx_quantize(x), lambda: mx_encode(x),
    ][fn]  # fmt: skip
    with pytest.raises(TypeError) as info:
        call()
    assert str(dtype) in str(info.value)


@st.composite
def layouts(draw: st.DrawFn) -> torch.Tensor:
    """0-d, empty, contiguous, transposed, strided, expanded (stride 0) float tensors."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["0d", "empty", "contig", "transposed", "strided", "expanded"]))
    base = (torch.randn(6, 10, generator=g) * 2.0 ** draw(st.integers(-20, 20))).to(dtype)
    if kind == "0d":
        return base[0, 0].clone()
    if kind == "empty":
        return base[:, :0]
    if kind == "transposed":
        return base.t()
    if kind == "strided":
        return base[::2, 1::3]
    if kind == "expanded":
        return base[:1].expand(5, 10)
    return base


@FAST_FIXTURE
@given(x=layouts(), fmt=st.sampled_from(FORMAT_CHOICES), rounding=st.sampled_from(ROUNDING_MODES))
def test_layouts_out_of_place(backend: str, x: torch.Tensor, fmt: str, rounding: str) -> None:
    gen = torch.Generator().manual_seed(5) if rounding == "stochastic" else None
    got = quantize(x, fmt, rounding=rounding, generator=gen)
    ref_gen = torch.Generator().manual_seed(5) if rounding == "stochastic" else None
    ref = quantize(x.contiguous(), fmt, rounding=rounding, generator=ref_gen)
    assert _bits_equal(got, ref)
    if x.dtype in (torch.float16, torch.bfloat16) and rounding != "stochastic":
        assert _bits_equal(got, quantize(x.float(), fmt, rounding=rounding).to(x.dtype))


@FAST_FIXTURE
@given(x=layouts(), fmt=st.sampled_from(FORMAT_CHOICES))
def test_layouts_in_place(backend: str, x: torch.Tensor, fmt: str) -> None:
    ref = quantize(x.contiguous(), fmt)
    if any(st == 0 and sz > 1 for sz, st in zip(x.shape, x.stride(), strict=True)):
        with pytest.raises(RuntimeError, match=SELF_OVERLAP):
            quantize_(x, fmt)
        return
    assert quantize_(x, fmt) is x
    assert _bits_equal(x, ref)


@FAST_FIXTURE
@given(
    n=st.integers(1, 12),
    a=st.integers(0, 12),
    b=st.integers(0, 12),
    dtype=st.sampled_from(FLOAT_DTYPES),
)
def test_out_overlapping_x(backend: str, n: int, a: int, b: int, dtype: torch.dtype) -> None:
    buf = torch.linspace(-5, 5, 24).to(dtype)
    x, out = buf[a : a + n], buf[b : b + n]
    ref = quantize(x.clone(), "e4m3")
    untouched = buf.clone()
    if a != b and abs(a - b) < n:
        with pytest.raises(RuntimeError, match=PARTIAL):
            quantize(x, "e4m3", out=out)
        assert torch.equal(buf, untouched)
        return
    assert quantize(x, "e4m3", out=out) is out
    assert _bits_equal(out, ref)


# ----------------------------------------------------------------------------------------------
# generators
# ----------------------------------------------------------------------------------------------


@FAST
@given(
    st.sampled_from(
        [3, "seed", 1.5, np.random.default_rng(0), torch.manual_seed, torch.Generator, [1]]
    ),
    st.sampled_from(["quantize", "quantize_", "encode", "fake", "mx", "mx_encode"]),
)
def test_generators_of_the_wrong_type(gen: object, fn: str) -> None:
    x = torch.linspace(-1, 1, 32)
    call = {
        "quantize": lambda: quantize(x, "e4m3", rounding="stochastic", generator=gen),
        "quantize_": lambda: quantize_(x.clone(), "e4m3", rounding="stochastic", generator=gen),
        "encode": lambda: encode(x, "e4m3", rounding="stochastic", generator=gen),
        "fake": lambda: fake_quantize(x, "e4m3", rounding="stochastic", generator=gen),
        "mx": lambda: mx_quantize(x, rounding="stochastic", generator=gen),
        "mx_encode": lambda: mx_encode(x, rounding="stochastic", generator=gen),
    }[fn]
    with pytest.raises(TypeError, match=r"torch\.Generator") as info:
        call()
    assert type(gen).__name__ in str(info.value)


def test_generator_on_another_device() -> None:
    x = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match="generator is on device cpu but x is on meta"):
        quantize(x, "e4m3", rounding="stochastic", generator=torch.Generator())
    if torch.cuda.is_available():  # pragma: no cover - CPU-only CI
        with pytest.raises(ValueError, match="generator is on device cuda"):
            quantize(torch.ones(4), "e4m3", generator=torch.Generator(device="cuda"))


# ----------------------------------------------------------------------------------------------
# decode: code ranges, dtypes, packing
# ----------------------------------------------------------------------------------------------

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def _valid_range(bits: int) -> tuple[int, int]:
    """Oracle: 0..2^bits-1, plus two's-complement negatives where the code fills its storage
    (encode's code dtypes: uint8 up to 8 bits, then int16/int32/int64), e.g. an int8 view of
    fp8 codes or a sign-extended copy of bfloat16's int16 codes."""
    storage = next(b for b in (8, 16, 32, 64) if bits <= b)
    return (-(1 << (bits - 1)) if bits == storage else 0), (1 << bits) - 1


@FAST
@given(
    fmt=st.sampled_from(["e4m3", "e5m2", "e8m0", "fp4", "e3m2", "e2m3", "bf16", "fp16", "e5m6"]),
    dtype=st.sampled_from(INT_DTYPES),
    data=st.data(),
)
def test_decode_code_ranges(fmt: str, dtype: torch.dtype, data: st.DataObject) -> None:
    f = get_format(fmt)
    info = torch.iinfo(dtype)
    values = data.draw(st.lists(st.integers(info.min, info.max), min_size=1, max_size=6))
    codes = torch.tensor(values, dtype=dtype)
    lo, hi = _valid_range(f.bits)
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        with pytest.raises(ValueError) as err:
            decode(codes, f)
        assert f"= {bad[0]} " in str(err.value) and f"{lo}..{hi}" in str(err.value)
        return
    masked = torch.tensor([v & ((1 << f.bits) - 1) for v in values], dtype=torch.int64)
    got = decode(codes, f, dtype=torch.float64)
    assert _bits_equal(got, decode(masked, f, dtype=torch.float64))


@FAST
@given(dtype=st.sampled_from([*INT_DTYPES, *BAD_DTYPES, *FLOAT_DTYPES]))
def test_decode_output_dtype(dtype: torch.dtype) -> None:
    codes = torch.tensor([0x38, 0x40], dtype=torch.uint8)  # e4m3 1.0, 2.0
    if dtype.is_floating_point:
        assert decode(codes, "e4m3", dtype=dtype).float().tolist() == [1.0, 2.0]
        return
    with pytest.raises(TypeError) as info:
        decode(codes, "e4m3", dtype=dtype)
    assert str(dtype) in str(info.value)


@FAST
@given(
    values=st.lists(st.integers(-300, 300), min_size=2, max_size=8).filter(lambda v: not len(v) % 2)
)
def test_decode_packed_bytes(values: list[int]) -> None:
    codes = torch.tensor(values, dtype=torch.int64)
    bad = [v for v in values if not -128 <= v <= 255]
    if bad:
        with pytest.raises(ValueError, match=f"= {bad[0]} "):
            decode(codes, "fp4", packed=True)
        with pytest.raises(ValueError, match=f"= {bad[0]} "):
            mx_decode(torch.tensor([127]), codes, "mxfp4", packed=True, block_size=64)
        return
    got = decode(codes, "fp4", packed=True)
    nibbles = [n for v in values for n in ((v & 0xFF) & 0xF, (v & 0xFF) >> 4)]
    assert _bits_equal(got, decode(torch.tensor(nibbles, dtype=torch.uint8), "fp4"))


def test_decode_packed_edge_cases() -> None:
    with pytest.raises(ValueError, match="0-d"):
        decode(torch.tensor(3, dtype=torch.uint8), "fp4", packed=True)
    with pytest.raises(ValueError, match="at most 4 bits"):
        decode(torch.zeros(2, dtype=torch.uint8), "e4m3", packed=True)
    with pytest.raises(ValueError, match=r"unpacked codes\[1\] = 8 .*e2m0"):
        decode(torch.tensor([0x80], dtype=torch.uint8), "e2m0", packed=True)  # 3-bit codes
    with pytest.raises(TypeError, match="complex"):
        decode(torch.zeros(2, dtype=torch.complex64), "e4m3")
    with pytest.raises(ValueError, match=r"^codes = 300 is out of range"):
        decode(torch.tensor(300), "e4m3")  # 0-d


def test_mx_decode_scales_out_of_range() -> None:
    codes = torch.zeros(32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"scales\[0\] = -129"):
        mx_decode(torch.tensor([-129]), codes, "mxfp8_e4m3")
