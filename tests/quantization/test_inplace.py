"""``quantize_`` and ``quantize(..., out=)`` behave like torch's own in-place and out= ops.

The reference for every expectation is torch itself: the same situation with ``round_`` /
``add_`` / ``torch.add(..., out=)`` must raise the same error (same type, same words) or leave
autograd in the same state. Each test runs through the C kernel and the pure-torch path (the
``backend`` fixture); before the fix the C kernel wrote raw memory without telling autograd, so
a backward silently used the rounded values.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from mixprec.quantization import (
    encode,
    fake_quantize,
    mx_quantize,
    quantize,
    quantize_,
    straight_through,
)

F = "float8_e4m3fn"
MODIFIED = "modified by an inplace operation"


def _torch_error(fn: Callable[[], object]) -> str:
    """The message torch's own op raises (the reference wording)."""
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value)


def _data() -> torch.Tensor:
    return torch.linspace(-3.3, 3.3, 24)


# ----------------------------------------------------------------------------------------------
# version counter: a backward that needs the old values must raise, as after round_()
# ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_quantize_bumps_the_version_counter(dtype: torch.dtype) -> None:
    x = _data().to(dtype)
    v = x._version
    quantize_(x, F)
    assert x._version > v
    out = torch.empty_like(x)
    v = out._version
    quantize(_data().to(dtype), F, out=out)
    assert out._version > v
    view = x[2:10]  # views share the counter with their base
    v = x._version
    quantize_(view, "e5m2")
    assert x._version > v


@pytest.mark.usefixtures("backend")
def test_saved_tensor_check_fires_after_in_place_rounding_under_no_grad() -> None:
    w = _data().requires_grad_()
    y = w.exp()  # exp saves its result for the backward
    with torch.no_grad():
        quantize_(y, F)
    with pytest.raises(RuntimeError, match=MODIFIED):
        y.sum().backward()
    # the torch reference
    y2 = w.exp()
    with torch.no_grad():
        y2.round_()
    with pytest.raises(RuntimeError, match=MODIFIED):
        y2.sum().backward()


@pytest.mark.usefixtures("backend")
def test_saved_tensor_check_fires_in_grad_mode() -> None:
    """In grad mode a non-leaf is rounded in place as round_ does: history rebased, and exp's
    saved output (now modified) makes the backward raise."""
    w = _data().requires_grad_()
    y = w.exp()
    quantize_(y, F)
    with pytest.raises(RuntimeError, match=MODIFIED):
        y.sum().backward()
    y2 = w.exp()
    y2.round_()
    with pytest.raises(RuntimeError, match=MODIFIED):
        y2.sum().backward()


@pytest.mark.usefixtures("backend")
def test_saved_tensor_check_fires_after_writing_out() -> None:
    a = _data().requires_grad_()
    o = torch.ones(24)
    z = a * o  # mul saves o for a's gradient
    quantize(_data(), F, out=o)
    with pytest.raises(RuntimeError, match=MODIFIED):
        z.sum().backward()


@pytest.mark.usefixtures("backend")
def test_detached_alias_shares_the_counter() -> None:
    """x.detach() shares x's version counter in torch: rounding it in place is seen."""
    w = _data().requires_grad_()
    y = w.exp()
    quantize_(y.detach(), F)
    with pytest.raises(RuntimeError, match=MODIFIED):
        y.sum().backward()


# ----------------------------------------------------------------------------------------------
# leaves that require grad, views of them, out= tensors that require grad
# ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("backend")
def test_leaf_requiring_grad_is_refused_in_grad_mode() -> None:
    w = _data().requires_grad_()
    expected = _torch_error(lambda: w.add_(1))
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        quantize_(w, F)
    assert torch.equal(w.detach(), before) and w._version == 0
    expected_view = _torch_error(lambda: w[:4].add_(1))
    with pytest.raises(RuntimeError, match=re.escape(expected_view)):
        quantize_(w[:4], F)
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        fp16 = _data().half().requires_grad_()
        quantize_(fp16, F)


@pytest.mark.usefixtures("backend")
def test_views_get_torch_own_error() -> None:
    """Views are refused by torch's own check (x.copy_), each with its own message."""
    ref_leaf = _data().requires_grad_()
    w = _data().requires_grad_()
    with torch.no_grad():
        ref_view, view = ref_leaf[:4], w[:4]
    cases = [
        (lambda: ref_view.add_(1), view),  # a view made under no_grad, written in grad mode
        (lambda: (ref_leaf * 2).unbind(0)[0].add_(1), (w * 2).unbind(0)[0]),  # multi-output
    ]
    for torch_op, target in cases:
        expected = _torch_error(torch_op)
        with pytest.raises(RuntimeError, match=re.escape(expected)):
            quantize_(target, F)
    assert torch.equal(w.detach(), _data())


@pytest.mark.usefixtures("backend")
def test_leaf_is_fine_under_no_grad() -> None:
    w = _data().requires_grad_()
    with torch.no_grad():
        assert quantize_(w, F) is w
    assert torch.equal(w.detach(), quantize(_data(), F))
    assert w._version == 1 and w.is_leaf and w.requires_grad


@pytest.mark.usefixtures("backend")
def test_out_requiring_grad_is_refused_like_torch_out_ops() -> None:
    req = _data().requires_grad_()
    plain = _data()
    torch_msg = _torch_error(lambda: torch.add(req, 1, out=torch.empty(24)))
    expected = torch_msg.replace("add()", "quantize()")
    for x, out in ((req, torch.empty(24)), (plain, torch.empty(24, requires_grad=True))):
        with pytest.raises(RuntimeError, match=re.escape(expected)):
            quantize(x, F, out=out)
    y = req * 2  # out=x on a non-leaf: also refused by torch
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        quantize(y, F, out=y)
    with torch.no_grad():
        out = torch.empty(24, requires_grad=True)
        assert quantize(req, F, out=out) is out
    assert torch.equal(out.detach(), quantize(_data(), F))


@pytest.mark.usefixtures("backend")
def test_non_leaf_in_place_has_zero_gradient_like_round_() -> None:
    w = _data().requires_grad_()
    y = w * 3
    quantize_(y, F)
    assert torch.equal(y.detach(), quantize(_data() * 3, F))
    y.sum().backward()
    w2 = _data().requires_grad_()
    y2 = w2 * 3
    y2.round_()
    y2.sum().backward()
    assert torch.equal(w.grad, w2.grad) and not w.grad.any()


# ----------------------------------------------------------------------------------------------
# memory overlap
# ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("shift", [1, -1, 5])
def test_partial_overlap_is_refused(shift: int) -> None:
    s = _data()
    before = s.clone()
    x, out = (s[:-shift], s[shift:]) if shift > 0 else (s[-shift:], s[:shift])
    expected = _torch_error(lambda: torch.add(x, 1, out=out))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        quantize(x, F, out=out)
    assert torch.equal(s, before)


@pytest.mark.usefixtures("backend")
def test_transposed_alias_is_refused() -> None:
    a = _data()[:16].reshape(4, 4).contiguous()
    expected = _torch_error(lambda: torch.add(a, 1, out=a.t()))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        quantize(a, F, out=a.t())


@pytest.mark.usefixtures("backend")
def test_full_alias_and_disjoint_views_are_fine() -> None:
    s = _data()
    ref = quantize(s, F)
    got = quantize(s.view(4, 6), F, out=s.view(4, 6))  # same memory, same layout: in place
    assert torch.equal(got.reshape(-1), ref) and torch.equal(s, ref)
    s = _data()
    quantize(s[:12], F, out=s[12:])  # same storage, no common element
    assert torch.equal(s[12:], ref[:12]) and torch.equal(s[:12], _data()[:12])


@pytest.mark.usefixtures("backend")
def test_interleaved_views_give_the_right_answer() -> None:
    """Not dense, so not refused (as in torch); the result must still be exact."""
    s = _data()
    quantize(s[::2], F, out=s[1::2])
    assert torch.equal(s[1::2], quantize(_data()[::2], F))
    assert torch.equal(s[::2], _data()[::2])


@pytest.mark.usefixtures("backend")
def test_self_overlapping_written_tensor_is_refused() -> None:
    e = torch.ones(1).expand(8)
    expected = _torch_error(lambda: e.add_(1))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        quantize_(e, F, rounding="stochastic")
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        quantize(torch.ones(8), F, out=torch.zeros(1).expand(8))
    assert quantize(e, F).shape == (8,)  # reading an expanded tensor is fine


@pytest.mark.usefixtures("backend")
def test_inference_tensor_outside_inference_mode() -> None:
    with torch.inference_mode():
        t, ref = _data(), _data()
    expected = _torch_error(lambda: ref.add_(1))  # (torch writes before it raises)
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        quantize_(t, F)
    assert torch.equal(t, _data())
    with torch.inference_mode():
        quantize_(t, F)
    assert torch.equal(t, quantize(_data(), F))


def test_out_of_the_wrong_kind() -> None:
    x = _data()
    with pytest.raises(ValueError, match=r"out has shape \(23,\)"):
        quantize(x, F, out=torch.empty(23))
    with pytest.raises(ValueError, match=r"out has dtype torch\.float64"):
        quantize(x, F, out=torch.empty(24, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"out has dtype torch\.int32"):
        quantize(x, F, out=torch.empty(24, dtype=torch.int32))
    with pytest.raises(ValueError, match="out is on device meta"):
        quantize(x, F, out=torch.empty(24, device="meta"))
    with pytest.raises(TypeError, match=r"out must be a torch\.Tensor, got list"):
        quantize(x, F, out=[0.0] * 24)


# ----------------------------------------------------------------------------------------------
# quantize of a tensor that requires grad: in the graph, gradient zero (like torch.round)
# ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_is_differentiable_with_zero_gradient(dtype: torch.dtype) -> None:
    x = _data().to(dtype).requires_grad_()
    q = quantize(x, F)
    assert q.requires_grad and q.grad_fn is not None and q.dtype == dtype
    assert torch.equal(q.detach(), quantize(_data().to(dtype), F))
    (q * x).sum().backward()  # d/dx (q(x) * x) = q(x) + 0 * x
    assert torch.equal(x.grad, q.detach())
    ref = _data().to(dtype).requires_grad_()
    (ref.round() * ref).sum().backward()  # torch's rounding: the same convention
    assert torch.equal(ref.grad, ref.detach().round())


@pytest.mark.usefixtures("backend")
def test_no_graph_without_grad_mode_and_fake_quantize_stays_straight_through() -> None:
    x = _data().requires_grad_()
    with torch.no_grad():
        assert not quantize(x, F).requires_grad
    fake_quantize(x, F).sum().backward()
    assert torch.equal(x.grad, torch.ones(24))
    assert encode(x, F).dtype == torch.uint8  # codes: integers, no graph


def test_straight_through_is_the_one_rounding_function() -> None:
    """forward(x) forward; backward(grad) or grad itself backward; its node is what quantize
    (zero gradient) and fake_quantize (identity) put in the graph."""
    x = _data().requires_grad_()
    w = torch.linspace(-1, 1, 24)
    y = straight_through(x, lambda t: quantize(t, F), lambda g: quantize(g, "e5m2"))
    assert torch.equal(y.detach(), quantize(_data(), F))
    (y * w).sum().backward()
    assert torch.equal(x.grad, quantize(w, "e5m2"))
    x.grad = None
    straight_through(x, lambda t: t * 2).sum().backward()
    assert torch.equal(x.grad, torch.ones(24))  # backward None: unchanged
    nodes = {type(q.grad_fn) for q in (y, quantize(x, F), fake_quantize(x, F))}
    assert len(nodes) == 1


@pytest.mark.usefixtures("backend")
def test_mx_quantize_gradient_is_the_same_on_both_backends() -> None:
    """It went through quantize_ on a non-leaf: straight-through with the C kernel (autograd
    never saw the write), zero with the torch path. Now zero on both, as quantize."""
    x = torch.linspace(-2, 2, 64).requires_grad_()
    mx_quantize(x, "mxfp8_e4m3").sum().backward()
    assert torch.equal(x.grad, torch.zeros(64))


class _Wrapper(torch.Tensor):
    """A minimal wrapper subclass with its own dispatch, as DTensor is."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> _Wrapper:
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        unwrap = lambda t: t.inner if isinstance(t, _Wrapper) else t  # noqa: E731
        return func(*[unwrap(a) for a in args], **(kwargs or {}))


@pytest.mark.parametrize("call", ["quantize", "quantize_", "out"])
def test_wrapper_subclasses_are_refused_not_misread(call: str) -> None:
    w = _Wrapper(torch.randn(8))
    with pytest.raises(TypeError, match="_Wrapper, a tensor subclass with its own dispatch"):
        if call == "quantize":
            quantize(w, "bf16")
        elif call == "quantize_":
            quantize_(w, "bf16")
        else:
            quantize(torch.randn(8), "bf16", out=w)
