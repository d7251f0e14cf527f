"""Tests for the rounding-observer seam (mixprec.quantization.observers) and its use by the
sanitizer: registration through a RemovableHandle, removal, and exception safety."""

from __future__ import annotations

import pytest
import torch

import mixprec
from mixprec.formats import FloatFormat, get_format
from mixprec.quantization import observers, quantize, quantize_, register_rounding_observer


def registered() -> list[object]:
    return list(observers._OBSERVERS.values())


Call = tuple[torch.Tensor, torch.Tensor, FloatFormat]


def test_observer_sees_every_rounding_until_removed() -> None:
    seen: list[Call] = []
    x = torch.tensor([1.0, 1.0 + 2.0**-10, 3.0])
    handle = register_rounding_observer(lambda src, res, fmt: seen.append((src, res, fmt)))
    try:
        y = quantize(x, "bf16")
        out = torch.empty_like(x)
        quantize(x, "e4m3", out=out)
        z = x.clone()
        quantize_(z, "float16")
    finally:
        handle.remove()
    assert [c[2] for c in seen] == [get_format("bfloat16"), get_format("e4m3"), get_format("fp16")]
    assert seen[0][0] is x and seen[0][1] is y
    assert seen[1][0] is x and seen[1][1] is out
    assert seen[2][0] is z and seen[2][1] is z  # in place: the result is the input
    quantize(x, "bf16")
    assert len(seen) == 3  # removed: no more calls
    handle.remove()  # idempotent
    assert registered() == []


def test_observers_run_in_registration_order_and_may_remove_themselves() -> None:
    order: list[str] = []
    handles = []

    def once(src: torch.Tensor, res: torch.Tensor, fmt: FloatFormat) -> None:
        order.append("once")
        handles[0].remove()

    handles.append(register_rounding_observer(once))
    handles.append(register_rounding_observer(lambda *a: order.append("always")))
    try:
        quantize(torch.ones(2), "bf16")
        quantize(torch.ones(2), "bf16")
    finally:
        for h in handles:
            h.remove()
    assert order == ["once", "always", "always"]
    assert registered() == []


def test_handle_as_context_manager_removes_on_exception() -> None:
    seen: list[Call] = []
    handle = register_rounding_observer(lambda *a: seen.append(a))
    with pytest.raises(RuntimeError, match="boom"), handle:
        quantize(torch.ones(2), "bf16")
        raise RuntimeError("boom")
    assert len(seen) == 1 and registered() == []


def test_observer_exception_propagates_and_keeps_registration() -> None:
    def bad(src: torch.Tensor, res: torch.Tensor, fmt: FloatFormat) -> None:
        raise ValueError("observer failed")

    handle = register_rounding_observer(bad)
    try:
        with pytest.raises(ValueError, match="observer failed"):
            quantize(torch.ones(2), "bf16")
        assert registered() == [bad]  # the caller decides: remove through the handle
    finally:
        handle.remove()
    assert registered() == []


def test_register_rejects_non_callables() -> None:
    with pytest.raises(TypeError, match=r"callable.*int"):
        register_rounding_observer(3)  # type: ignore[arg-type]
    assert registered() == []


def test_public_path() -> None:
    assert mixprec.quantization.register_rounding_observer is register_rounding_observer
    assert "register_rounding_observer" in mixprec.quantization.__all__


def test_sanitizer_registers_only_while_active_also_on_exceptions() -> None:
    assert registered() == []
    with pytest.raises(RuntimeError, match="boom"), mixprec.sanitize():
        assert len(registered()) == 1
        raise RuntimeError("boom")
    assert registered() == []
    # a refused (nested) start registers nothing and leaves the outer one in place
    with mixprec.sanitize():
        with pytest.raises(RuntimeError, match="nested"), mixprec.sanitize():
            pass
        assert len(registered()) == 1
    assert registered() == []


def test_sanitizer_observer_sees_quantize() -> None:
    x = torch.full((8,), 1e-4)
    with mixprec.sanitize() as report:
        quantize(x, "e4m3")  # below e4m3's smallest subnormal: flushes to zero
    f = [f for f in report.findings if f.op == "mixprec.quantize"]
    assert len(f) == 1 and f[0].kind == "underflow" and f[0].count == 8
    assert f[0].location is not None and f[0].location.startswith("test_observers.py:")


def test_sanitizer_ignores_its_own_roundings_under_dtype_hint() -> None:
    """With dtype_hint, local-error inputs are rounded with quantize by the sanitizer itself:
    only the user's quantize is a rounding finding, at the user's line."""
    x = torch.full((16,), 3e-3)  # below e4m3's smallest normal (2^-6): loses bits
    with mixprec.sanitize(dtype_hint="e4m3") as report:
        xq = quantize(x, "e4m3")  # <user-quantize>
        xq * 0.5
    q = [f for f in report.findings if f.op == "mixprec.quantize"]
    assert len(q) == 1 and q[0].kind == "underflow"
    assert q[0].location.startswith("test_observers.py:") and q[0].count == 16
    assert q[0].code == 'xq = quantize(x, "e4m3")  # <user-quantize>'
