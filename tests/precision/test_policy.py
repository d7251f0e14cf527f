"""Tests for mixprec.policy: Policy grammar and validation, FormatSpec, OpLists."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.formats import ALIASES, FORMATS
from mixprec.precision import (
    DEFAULT_FP32,
    DEFAULT_LOW,
    OpLists,
    Policy,
    policy_format_names,
    resolve_format,
)

MX = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1"]


# ---------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------


def test_from_string_long_and_short_keys_agree() -> None:
    long = Policy.from_string("params=float32,compute=bfloat16,output=float32")
    short = Policy.from_string("p=f32,c=bf16,o=f32")
    assert long == short == Policy("float32", "bfloat16", "float32")
    assert str(long) == "params=float32,compute=bfloat16,output=float32"


def test_aliases_canonicalise() -> None:
    p = Policy(params="fp32", compute="half", output="e4m3", grads="e5m2")
    assert (p.params, p.compute, p.output, p.grads) == (
        "float32", "float16", "float8_e4m3fn", "float8_e5m2",
    )  # fmt: skip
    assert Policy(compute=torch.bfloat16).compute == "bfloat16"
    assert Policy(compute="mxfp4").compute == "mxfp4_e2m1"
    assert Policy(compute="E6M9").compute == "e6m9"


def test_defaults_and_grads_in_string() -> None:
    assert Policy.from_string("c=bf16") == Policy(compute="bfloat16")
    p = Policy.from_string(" g = e5m2 , c = e4m3 ")
    assert p.grads == "float8_e5m2" and p.params == "float32" and p.output == "float32"
    assert str(p) == "params=float32,compute=float8_e4m3fn,output=float32,grads=float8_e5m2"
    assert p.grads_format.name == "float8_e5m2"
    assert Policy(compute="bf16").grads_format.name == "bfloat16"  # grads default: compute


def test_policy_is_frozen_and_hashable() -> None:
    p = Policy(compute="bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.compute = "fp16"  # type: ignore[misc]
    assert len({p, Policy.from_string(str(p))}) == 1
    assert p.replace(compute="fp16").compute == "float16"


def test_coerce() -> None:
    assert Policy.coerce("bf16") == Policy(compute="bfloat16")
    assert Policy.coerce("p=bf16,c=bf16") == Policy(params="bfloat16", compute="bfloat16")
    assert Policy.coerce(torch.float16) == Policy(compute="float16")
    p = Policy(compute="e4m3")
    assert Policy.coerce(p) is p
    with pytest.raises(TypeError, match="Policy"):
        Policy.coerce(3.5)  # type: ignore[arg-type]


format_names = st.sampled_from(sorted({*FORMATS, *ALIASES, *MX, "mxfp4", "e6m9", "e3m12"}))
keys = {
    "params": ["params", "p", "P", "param"],
    "compute": ["compute", "c", "C"],
    "output": ["output", "o", "out"],
    "grads": ["grads", "g", "grad"],
}


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    chosen=st.lists(st.sampled_from(list(keys)), unique=True, min_size=1, max_size=4),
)
def test_policy_string_round_trip(data: st.DataObject, chosen: list[str]) -> None:
    tokens = []
    values = {}
    for field in chosen:
        key = data.draw(st.sampled_from(keys[field]))
        fmt = data.draw(format_names)
        space = data.draw(st.sampled_from(["", " "]))
        tokens.append(f"{space}{key}{space}={space}{fmt}{space}")
        values[field] = fmt
    p = Policy.from_string(",".join(tokens))
    # every field parsed to the canonical name of the format given (independent resolver)
    for field, fmt in values.items():
        assert getattr(p, field) == resolve_format(fmt).name
    # str() round-trips, and is a fixed point
    assert Policy.from_string(str(p)) == p
    assert str(Policy.from_string(str(p))) == str(p)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty policy string"),
        ("   ", "empty policy string"),
        ("params=float32,compute", "token 'compute' is not key=value"),
        ("params=float32,comput=bf16", "unknown key 'comput'"),
        ("p=f32,c=bfloat17", "unknown format 'bfloat17'"),
        ("c=bf16,c=fp16", "given twice"),
        ("c=bf16,,o=f32", "token '' is not key=value"),
        ("x=1", "valid keys are params (p), compute (c), output (o), grads (g)"),
    ],
)
def test_bad_strings_name_token_and_choices(text: str, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        Policy.from_string(text)
    assert needle in str(info.value)


def test_bad_format_message_lists_valid_formats() -> None:
    with pytest.raises(ValueError) as info:
        Policy.from_string("c=fp7")
    msg = str(info.value)
    assert "'fp7'" in msg and "bfloat16" in msg and "mxfp4_e2m1" in msg and "eXmY" in msg
    with pytest.raises(ValueError, match=r"Policy.compute: unknown format 'nope'"):
        Policy(compute="nope")
    with pytest.raises(TypeError, match=r"Policy\.params"):
        Policy(params=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a str"):
        Policy.from_string(None)  # type: ignore[arg-type]


def test_unknown_format_is_short_with_a_suggestion() -> None:
    """The registry's did-you-mean, not a list of every name (it used to be ~900 characters)."""
    cases = {"bfloat17": "bfloat16", "mxfp8_e4m2": "mxfp8_e4m3", "mxfp9": "mxfp8", "fp7": "fp4"}
    for bad, meant in cases.items():
        with pytest.raises(ValueError, match=f"^unknown format {bad!r}; did you mean ") as info:
            resolve_format(bad)
        suggestion, _, rest = str(info.value).partition("?")
        assert repr(meant) in suggestion and len(suggestion + rest) < 300, str(info.value)


def test_short_mx_names_are_the_registry_aliases() -> None:
    assert Policy(compute="mxfp8").compute == "mxfp8_e4m3"
    assert Policy(compute="MXFP6").compute == "mxfp6_e2m3"
    assert Policy.from_string("c=mxfp4").compute == "mxfp4_e2m1"


def test_format_spec_properties() -> None:
    bf16 = resolve_format("bf16")
    assert not bf16.is_mx and bf16.torch_dtype == torch.bfloat16 and not bf16.operand_only
    mx = resolve_format("mxfp8_e4m3")
    assert mx.is_mx and mx.block_size == 32 and mx.element.name == "float8_e4m3fn"
    assert mx.torch_dtype is None and mx.operand_only
    assert resolve_format("e4m3").operand_only and resolve_format("tf32").operand_only
    assert not resolve_format("e6m9").operand_only  # 16-bit custom: a storage format
    assert resolve_format("fp32").is_float32
    assert set(MX) <= set(policy_format_names())


# ---------------------------------------------------------------------------------------------
# OpLists
# ---------------------------------------------------------------------------------------------


def test_default_categories() -> None:
    ol = OpLists.default()
    for name in ("linear", "matmul", "conv2d", "bmm", "baddbmm", "addmm",
                 "scaled_dot_product_attention"):  # fmt: skip
        assert ol.category(name) == "low", name
    for name in ("softmax", "log_softmax", "layer_norm", "batch_norm", "group_norm", "sum",
                 "mean", "norm", "var", "cross_entropy", "mse_loss", "exp", "log", "pow",
                 "cumsum"):  # fmt: skip
        assert ol.category(name) == "fp32", name
    for name in ("add", "gelu", "relu", "view", "cat", "some_unknown_op"):
        assert ol.category(name) == "follow", name
    assert ol.category(torch.nn.functional.linear) == "low"  # functions by __name__
    assert "fp32" in ol.explain("softmax") and "paper" in ol.explain("softmax")


def test_moves_and_removal() -> None:
    ol = OpLists().with_low("gelu").with_fp32("linear").without("softmax")
    assert ol.category("gelu") == "low"
    assert ol.category("linear") == "fp32" and "linear" not in ol.low
    assert ol.category("softmax") == "follow" and "softmax" not in ol.fp32
    assert OpLists().with_follow("exp").category("exp") == "follow"
    # the original is unchanged (frozen, values)
    assert OpLists().category("linear") == "low"
    assert OpLists() == OpLists.default()
    assert OpLists().with_low("linear") == OpLists()


def test_oplists_validation() -> None:
    with pytest.raises(ValueError, match=r"\['linear'\] are in both 'low' and 'fp32'"):
        OpLists(low={"linear"}, fp32={"linear"})
    with pytest.raises(TypeError, match="collection of op names"):
        OpLists(low="linear")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        OpLists().with_low(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        OpLists().with_low("")
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        OpLists.torch_amp("tpu")


def test_torch_amp_lists_differ_where_torch_differs() -> None:
    cpu = OpLists.torch_amp("cpu")
    cuda = OpLists.torch_amp("cuda")
    assert cpu.category("softmax") == "follow" and cuda.category("softmax") == "fp32"
    assert cpu.category("linear") == cuda.category("linear") == "low"
    assert DEFAULT_LOW.isdisjoint(DEFAULT_FP32)


# ---------------------------------------------------------------------------------------------
# MX scale rounding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["floor", "rceil", "ceil", "even"])
def test_scale_rounding_field_string_and_specs(rule: str) -> None:
    p = Policy(compute="mxfp8", output="bf16", scale_rounding=rule)
    assert p.compute_format.scale_rounding == rule and p.compute_format.is_mx
    assert p.output_format.scale_rounding == "floor"  # element formats keep the default
    text = str(p)
    assert text.endswith(f",scale_rounding={rule}") == (rule != "floor")
    assert Policy.from_string(text) == p
    assert Policy.from_string(f"c=mxfp4,scale_rounding={rule}").scale_rounding == rule


def test_scale_rounding_refused_where_it_changes_nothing_or_is_unknown() -> None:
    with pytest.raises(ValueError, match="applies to MX formats only"):
        Policy(compute="bf16", scale_rounding="rceil")
    with pytest.raises(ValueError, match=r"Policy\.scale_rounding must be one of \('floor'"):
        Policy(compute="mxfp8", scale_rounding="up")
    with pytest.raises(TypeError, match=r"Policy\.scale_rounding must be a str"):
        Policy(compute="mxfp8", scale_rounding=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token 'scale_rounding=nearest'"):
        Policy.from_string("c=mxfp8,scale_rounding=nearest")
    # an MX format anywhere in the policy is enough (here: the gradients)
    assert Policy(compute="e4m3", grads="mxfp8_e5m2", scale_rounding="ceil").grads_format.is_mx
