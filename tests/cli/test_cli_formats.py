"""Tests for ``mixprec formats`` and ``mixprec explain`` (run in-process through cli.main).

What they print: the tables, the JSON documents, the errors. Expected values come from ml_dtypes
/ numpy (finfo), ``fractions.Fraction`` and ``math.nextafter``, or are written out by hand; the
analysis itself (every bit pattern against ml_dtypes, rounding against quantize) is tested on the
library functions in tests/formats/test_describe.py, and here the JSON must be theirs.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from mixprec.cli import main
from mixprec.formats import explain, format_info, format_table

ML_FORMATS = [
    "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "float8_e4m3", "float8_e3m4", "float8_e4m3b11fnuz", "float8_e8m0fnu", "float6_e3m2fn",
    "float6_e2m3fn", "float4_e2m1fn",
]  # fmt: skip
NUMPY_FORMATS = ["float64", "float32", "float16"]


@pytest.fixture(autouse=True)
def piped_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tables here are the piped layout (200 columns), whatever COLUMNS the shell exports;
    tests/cli/test_cli_width.py covers other widths."""
    monkeypatch.delenv("COLUMNS", raising=False)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    rc, out, err = run_cli(capsys, argv[0], "--json", *argv[1:])  # before a "--"
    assert rc == 0, err
    return json.loads(out)


def finfo(name: str) -> tuple[float, float, float, float, int]:
    """(max, min normal, min subnormal, eps, bits) from numpy / ml_dtypes."""
    t = getattr(np, name) if name in NUMPY_FORMATS else getattr(ml_dtypes, name)
    fi = np.finfo(t) if name in NUMPY_FORMATS else ml_dtypes.finfo(t)
    return (
        float(fi.max),
        float(fi.smallest_normal),
        float(fi.smallest_subnormal),
        float(fi.eps),
        int(fi.bits),
    )


# ----------------------------------------------------------------------------------------------
# mixprec formats
# ----------------------------------------------------------------------------------------------


def test_formats_table_text(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "formats")
    assert rc == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert set(ML_FORMATS + NUMPY_FORMATS) <= set(rows)
    assert "3.38953e+38" in rows["bfloat16"]  # bf16 max
    for name in ML_FORMATS + NUMPY_FORMATS:
        cells = [c.strip() for c in rows[name].split("│")[1:-1]]
        mx, mn, sub, eps, bits = finfo(name)
        assert cells[1] == str(bits), name
        assert cells[5:9] == [f"{mx:.6g}", f"{mn:.6g}", f"{sub:.6g}", f"{eps:.6g}"], name
    # hand-written: TF32 is fp32's range with 10 mantissa bits
    tf32 = [c.strip() for c in rows["tfloat32"].split("│")[1:-1]]
    assert tf32[1:5] == ["19", "8", "10", "127"]
    assert tf32[5] == f"{(2 - 2**-10) * 2.0**127:.6g}"
    e4m3 = [c.strip() for c in rows["float8_e4m3fn"].split("│")[1:-1]]
    assert e4m3[9:] == ["none", "S.1111.111", "float8_e4m3fn", "ml_dtypes.float8_e4m3fn"]
    e5m2 = [c.strip() for c in rows["float8_e5m2"].split("│")[1:-1]]
    assert e5m2[9:11] == ["S.11111.00", "S.11111.MM≠0"]
    assert [c.strip() for c in rows["float8_e4m3fnuz"].split("│")[1:-1]][10] == "0x80"
    assert [c.strip() for c in rows["float4_e2m1fn"].split("│")[1:-1]][9:11] == ["none", "none"]


def test_formats_json_all(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "formats")
    assert doc["schema_version"] == 1
    by_name = {d["name"]: d for d in doc["formats"]}
    for name in ML_FORMATS + NUMPY_FORMATS:
        mx, mn, sub, eps, bits = finfo(name)
        d = by_name[name]
        assert (d["max"], d["min_normal"], d["min_subnormal"], d["eps"], d["bits"]) == (
            mx, mn, sub, eps, bits,
        )  # fmt: skip
        assert float.fromhex(d["max_hex"]) == mx
    assert by_name["bfloat16"]["torch_dtype"] == "torch.bfloat16"
    assert by_name["float6_e2m3fn"]["torch_dtype"] is None
    assert by_name["float64"]["inf_encoding"] == "S.1{11}.0{52}"
    assert "bf16" in by_name["bfloat16"]["aliases"]


def test_formats_custom(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "formats", "--format", "e6m9")
    assert rc == 0
    assert "bias            │ 31" in out
    assert "4.29077e+09" in out  # (2 - 2^-9) * 2^31 = 4290772992
    d = run_json(capsys, "formats", "-f", "e6m9")["formats"][0]
    assert d["max"] == (2 - 2**-9) * 2.0**31
    assert d["min_subnormal"] == 2.0 ** (1 - 31 - 9)
    assert d["inf_encoding"] == "S.111111.0{9}"
    assert d["torch_dtype"] is None and d["ml_dtype"] is None


def test_formats_json_is_the_library_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_json(capsys, "formats")["formats"] == format_table()
    assert run_json(capsys, "formats", "-f", "e4m3")["formats"] == [format_info("e4m3")]


def test_formats_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "formats", "--format", "float7")
    assert rc == 2 and out == ""
    assert "unknown format 'float7'; did you mean 'float'?" in err and "mixprec formats" in err


# ----------------------------------------------------------------------------------------------
# mixprec explain
# ----------------------------------------------------------------------------------------------


def test_explain_bf16_text(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "explain", "0.1", "--format", "bf16")
    assert rc == 0
    # by hand: 0.1 = 1.6 * 2^-4; bf16 keeps 7 fraction bits: 1.1001100|11001...b -> rounds up
    # to 1.1001101b * 2^-4 = 205/2048 = 0.10009765625; below: 204/2048 = 0.099609375
    assert "0.10009765625" in out and "0.099609375" in out
    assert "0 | 01111011 | 1001101" in out  # exponent 123 = -4 + 127
    assert "0x3DCD" in out and "0x3DCC" in out
    assert "0x1.9ap-4" in out
    assert "+0.2 ulp" in out


def test_explain_bf16_json(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "explain", "0.1", "--format", "bf16")
    v = Fraction(1, 10)
    below = np.float64(0.1).astype(ml_dtypes.bfloat16)  # ml_dtypes rounds to nearest
    code = int(np.array([below]).view(np.uint16)[0])
    lo_v = float(np.array([code - 1], dtype=np.uint16).view(ml_dtypes.bfloat16)[0])
    hi_v = float(below)
    assert (lo_v, hi_v) == (0.099609375, 0.10009765625)
    assert d["result"]["value"] == hi_v and d["result"]["code"] == code
    assert (d["result"]["sign"], d["result"]["exponent"], d["result"]["mantissa"]) == (
        "0", "01111011", "1001101",
    )  # fmt: skip
    assert d["result"]["decimal"] == "0.10009765625"
    assert d["neighbours"]["below"]["value"] == lo_v
    assert d["neighbours"]["above"]["value"] == hi_v
    ulp = Fraction(hi_v) - Fraction(lo_v)
    assert d["result"]["error"]["ulps"] == float((Fraction(hi_v) - v) / ulp)
    assert d["result"]["error"]["relative"] == float((Fraction(hi_v) - v) / v)
    modes = d["modes"]
    assert [modes[m]["value"] for m in ("nearest", "toward_zero", "up", "down", "odd")] == [
        hi_v, lo_v, hi_v, lo_v, hi_v,  # 0x3DCD is the odd code
    ]  # fmt: skip
    sto = {c["value"]: Fraction(c["probability_exact"]) for c in modes["stochastic"]}
    assert sto == {lo_v: (Fraction(hi_v) - v) / ulp, hi_v: (v - Fraction(lo_v)) / ulp}


@pytest.mark.parametrize(
    ("argv", "value", "fmt", "kw"),
    [
        (["0.1", "-f", "bf16"], "0.1", "bf16", {}),
        (["-f", "e4m3", "-r", "up", "--saturate", "--", "-1e9"], "-1e9", "e4m3",
         {"rounding": "up", "saturate": True}),
        (["nan", "-f", "fp4"], "nan", "fp4", {}),
    ],
)  # fmt: skip
def test_explain_json_is_the_library_document(
    argv: list[str], value: str, fmt: str, kw: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_json(capsys, "explain", *argv) == json.loads(
        json.dumps(explain(value, fmt, **kw).to_json())
    )


def test_explain_overflow(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "explain", "1000", "--format", "e4m3")
    assert d["modes"]["nearest"]["value"] == "nan"  # OCP e4m3fn has no inf
    assert d["modes"]["toward_zero"]["value"] == 448.0
    assert d["neighbours"]["above"] is None and d["neighbours"]["below"]["value"] == 448.0
    assert any("overflows to NaN" in n for n in d["notes"])
    d = run_json(capsys, "explain", "1000", "--format", "e4m3", "--saturate")
    assert d["modes"]["nearest"]["value"] == 448.0
    d = run_json(capsys, "explain", "--format", "e5m2", "--", "-1e9")
    assert d["modes"]["nearest"]["value"] == "-inf"
    assert d["modes"]["up"]["value"] == -57344.0
    d = run_json(capsys, "explain", "7", "--format", "fp4")
    assert d["modes"]["nearest"]["value"] == 6.0
    assert any("always saturates" in n for n in d["notes"])


def test_explain_float64_exact_ties(capsys: pytest.CaptureFixture[str]) -> None:
    # 1 + 2^-53 is exactly halfway between 1 and nextafter(1, 2): ties to even gives 1
    tie = Fraction(1) + Fraction(1, 2**53)
    dec = str(tie.numerator * 5**53)
    text = dec[0] + "." + dec[1:]
    assert Fraction(text) == tie
    up = math.nextafter(1.0, 2.0)
    d = run_json(capsys, "explain", text, "--format", "fp64")
    assert d["modes"]["nearest"]["value"] == 1.0
    assert d["modes"]["odd"]["value"] == up
    assert d["neighbours"]["below"]["value"] == 1.0 and d["neighbours"]["above"]["value"] == up
    d = run_json(capsys, "explain", text + "1", "--format", "fp64")  # just above the tie
    assert d["modes"]["nearest"]["value"] == up
    d = run_json(capsys, "explain", "0.1", "--format", "fp64")
    assert d["modes"]["nearest"]["value"] == 0.1
    assert d["modes"]["down"]["value"] == math.nextafter(0.1, 0)
    d = run_json(capsys, "explain", "1e400", "--format", "fp64")
    assert d["modes"]["nearest"]["value"] == "inf"
    assert d["modes"]["down"]["value"] == 1.7976931348623157e308


def test_explain_double_rounding_avoided(capsys: pytest.CaptureFixture[str]) -> None:
    # x = 1 + 2^-8 + 2^-60: float64 would round it to the bf16 tie 1 + 2^-8 (-> 1.0 by ties to
    # even); the exact value lies above the tie, so bf16 nearest is 1 + 2^-7
    x = Fraction(1) + Fraction(1, 2**8) + Fraction(1, 2**60)
    assert float(x) == 1 + 2**-8
    hex_text = f"0x{x.numerator:x}p-60"
    d = run_json(capsys, "explain", hex_text, "--format", "bf16")
    assert d["input"]["exact"] == str(x)
    assert d["modes"]["nearest"]["value"] == 1 + 2**-7


def test_explain_specials(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "explain", "--format", "e4m3", "--", "-inf")
    assert d["modes"]["nearest"]["value"] == "nan"
    d = run_json(capsys, "explain", "--format", "e5m2", "--", "-inf")
    assert d["modes"]["nearest"]["value"] == "-inf" and d["result"]["code"] == 0xFC
    d = run_json(capsys, "explain", "nan", "--format", "fp4")
    assert d["result"]["value"] == "nan" and "code" not in d["result"]
    assert any("no NaN encoding" in n for n in d["notes"])
    d = run_json(capsys, "explain", "-0", "--format", "e4m3fnuz")
    assert d["result"]["code"] == 0 and any("no negative zero" in n for n in d["notes"])
    d = run_json(capsys, "explain", "-0", "--format", "fp16")
    assert d["result"]["code"] == 0x8000 and d["result"]["decimal"] == "-0"
    d = run_json(capsys, "explain", "3", "--format", "e8m0")
    assert d["neighbours"]["below"]["value"] == 2.0 and d["neighbours"]["above"]["value"] == 4.0
    assert d["modes"]["nearest"]["value"] == 4.0  # e8m0 ties go up


def test_explain_hex_and_subnormal(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "explain", "0x1.8p-20", "--format", "fp16")
    # fp16 subnormals are multiples of 2^-24: 1.5 * 2^-20 = 24 * 2^-24, code 24
    assert d["result"]["value"] == float.fromhex("0x1.8p-20") and d["result"]["code"] == 24
    assert any("subnormal range" in n for n in d["notes"])
    d = run_json(capsys, "explain", "1e-9", "--format", "fp16")
    assert d["modes"]["nearest"]["value"] == 0.0
    assert d["modes"]["up"]["value"] == 2.0**-24
    assert any("underflows to zero" in n for n in d["notes"])


@pytest.mark.parametrize("bad", ["abc", "0x", "1/0", "--1", "1e", "0xg"])
def test_explain_bad_value(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "explain", "--format", "bf16", "--", bad)
    assert rc == 2 and out == ""
    assert "cannot parse VALUE" in err and "hex float" in err


def test_explain_bad_format(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(capsys, "explain", "1", "--format", "bf17")
    assert rc == 2 and "unknown format 'bf17'; did you mean 'bf16'?" in err
