"""Tests for mixprec.autocast / apply_policy (emulated and native execution of a Policy).

Oracles are independent of the code under test: torch's own dtype casts (``.to(bfloat16)``,
``.to(float8_e4m3fn)``), torch.autocast, float64 reference products, numpy float16 arithmetic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode

from mixprec import Policy, apply_policy, autocast, get_format
from mixprec.precision import (
    Accumulate,
    CurrentScaling,
    DelayedScaling,
    Executor,
    Fp8Recipe,
    OpLists,
    cpu_has_fast_bf16,
    native_is_fast,
    resolve_format,
)

AC = sys.modules["mixprec.precision.region"]

DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
UNIT = {"bf16": 2.0**-8, "fp16": 2.0**-11}  # unit roundoff
MIN_NORMAL = {"bf16": 2.0**-126, "fp16": 2.0**-14}
U32 = 2.0**-24


def rep(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Every value of t is exactly representable in dtype (torch's own cast as oracle)."""
    t = t.detach().float()
    return bool(torch.equal(t.to(dtype).float(), t))


def seeded_linear(
    seed: int, n_in: int, n_out: int, *, batch: int
) -> tuple[nn.Linear, torch.Tensor]:
    """``nn.Linear(n_in, n_out)`` and a ``(batch, n_in)`` input, from torch's seeded global RNG."""
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out), torch.randn(batch, n_in)


class Probe(TorchDispatchMode):
    """Records (aten op name, input tensors, output tensors) of every aten call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[torch.Tensor], list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        for a in args:
            if isinstance(a, (list, tuple)):
                ins += [b for b in a if isinstance(b, torch.Tensor)]
        seq = out if isinstance(out, (tuple, list)) else [out]
        outs = [o for o in seq if isinstance(o, torch.Tensor)]
        self.calls.append((func.__name__, [i.detach().clone() for i in ins],
                           [o.detach().clone() for o in outs]))  # fmt: skip
        return out

    def find(self, prefix: str) -> list[tuple[str, list[torch.Tensor], list[torch.Tensor]]]:
        return [c for c in self.calls if c[0].split(".")[0] == prefix]


def no_region_left() -> None:
    assert AC._LOCAL.entries == [] and AC._LOCAL.mode == []
    assert not any(isinstance(m, AC._PolicyMode) for m in _get_current_function_mode_stack())
    assert not torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------------------------------------
# emulated low ops == torch.autocast (inputs rounded, fp32 accumulation, output rounded)
# ---------------------------------------------------------------------------------------------


def _check_against_native(fmt: str, fn, args: tuple, exact: torch.Tensor, absprod: torch.Tensor,
                          k: int) -> None:  # fmt: skip
    dt = DT[fmt]
    with autocast(fmt, emulate=True):
        emu = fn(*args)
    with torch.autocast("cpu", dt):
        nat = fn(*args).float()
    assert emu.dtype == torch.float32 and rep(emu, dt)
    # both results are the correctly rounded exact value, up to fp32 accumulation error
    # (|sum error| <= gamma_K * sum|a||b|, any summation order) and the output rounding
    gamma = k * U32 / (1 - k * U32)
    u = UNIT[fmt]
    for y in (emu, nat):
        bound = (u * exact.abs() + (1 + u) * gamma * absprod) * (1 + 1e-6) + MIN_NORMAL[fmt]
        assert bool(((y.double() - exact).abs() <= bound).all())
    # and where they differ it is by accumulation order: adjacent values of the format
    diff = emu != nat
    if diff.any():
        big = torch.maximum(emu.abs(), nat.abs())[diff].double()
        ulp = torch.exp2(torch.floor(torch.log2(big)) - (7 if fmt == "bf16" else 10))
        assert bool(((emu - nat).abs()[diff].double() <= ulp).all())
    assert (emu == nat).double().mean() > 0.99


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_linear_matches_torch_autocast(fmt: str) -> None:
    lin, x = seeded_linear(0, 96, 40, batch=24)
    dt = DT[fmt]
    xr, wr, br = (t.detach().to(dt).double() for t in (x, lin.weight, lin.bias))
    exact = xr @ wr.T + br
    absprod = xr.abs() @ wr.T.abs() + br.abs()
    _check_against_native(fmt, lin, (x,), exact, absprod, 97)


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_conv2d_matches_torch_autocast(fmt: str) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(2, 6, 9, 9)
    dt = DT[fmt]
    xr, wr, br = (t.detach().to(dt).double() for t in (x, conv.weight, conv.bias))
    exact = F.conv2d(xr, wr, br, padding=1)
    absprod = F.conv2d(xr.abs(), wr.abs(), br.abs(), padding=1)
    _check_against_native(fmt, conv, (x,), exact, absprod, 6 * 9 + 1)


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_batched_matmul_matches_torch_autocast(fmt: str) -> None:
    torch.manual_seed(2)
    a, b = torch.randn(3, 20, 64), torch.randn(3, 64, 12)
    dt = DT[fmt]
    ar, br = a.to(dt).double(), b.to(dt).double()
    _check_against_native(fmt, torch.matmul, (a, b), ar @ br, ar.abs() @ br.abs(), 64)
    _check_against_native(fmt, lambda p, q: p @ q, (a, b), ar @ br, ar.abs() @ br.abs(), 64)


def test_low_op_inputs_are_rounded_and_fp32_accumulated() -> None:
    lin, x = seeded_linear(3, 32, 8, batch=5)
    probe = Probe()
    with autocast("fp16", emulate=True), probe:
        y = lin(x)
    ((_, ins, outs),) = probe.find("addmm")
    assert all(i.dtype == torch.float32 for i in ins)  # fp32 compute...
    assert all(rep(i, torch.float16) for i in ins)  # ...on fp16 operands (bias included)
    assert not rep(outs[0], torch.float16)  # the fp32 accumulator is not rounded...
    assert rep(y, torch.float16)  # ...until the result is written


# ---------------------------------------------------------------------------------------------
# op categories
# ---------------------------------------------------------------------------------------------


def test_fp32_ops_run_in_fp32_emulated() -> None:
    lin, x = seeded_linear(4, 16, 16, batch=4)
    probe = Probe()
    with autocast("bf16", emulate=True), probe:
        h = lin(x)
        s = F.softmax(h, dim=-1)
        n = F.layer_norm(h, (16,))
    assert rep(h, torch.bfloat16)
    # softmax/layer_norm got the bf16 values as fp32 and their fp32 results stay unrounded
    ((_, ins, _),) = probe.find("_softmax")
    assert ins[0].dtype == torch.float32
    assert torch.equal(s, torch.softmax(h.detach(), -1))
    assert not rep(s, torch.bfloat16)
    assert torch.equal(n, F.layer_norm(h.detach(), (16,)))
    assert not rep(n, torch.bfloat16)


def test_fp32_ops_run_in_fp32_native() -> None:
    lin, x = seeded_linear(5, 16, 16, batch=4)
    probe = Probe()
    with autocast("bf16", emulate=False, device_type="cpu"), probe:
        h = lin(x)
        s = F.softmax(h, dim=-1)
    assert h.dtype == torch.bfloat16  # low op: native bf16
    ((_, ins, _),) = probe.find("_softmax")
    assert ins[0].dtype == torch.float32 and s.dtype == torch.float32
    # plain torch.autocast on CPU would have run softmax in bf16
    probe2 = Probe()
    with torch.autocast("cpu", torch.bfloat16), probe2:
        F.softmax(lin(x), dim=-1)
    assert probe2.find("_softmax")[0][1][0].dtype == torch.bfloat16


def test_native_region_honours_torch_autocast_switched_off_inside() -> None:
    # HF's "force float32" blocks (GPT-2's upcast attention, MoE routers): torch.autocast(
    # device, enabled=False) inside the region; the region used to cast the GEMM to bf16
    # anyway. The oracle: plain torch.autocast, which runs the block as written
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 8), torch.randn(2, 8, 5)

    def scores() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", enabled=False):
            inner = torch.baddbmm(torch.empty(2, 5, 5), q.float(), k.float(), beta=0, alpha=0.5)
        return inner, torch.bmm(q, k)

    with torch.autocast("cpu", torch.bfloat16):
        want_inner, want_outer = scores()
    with autocast("bf16", emulate=False, device_type="cpu"):
        got_inner, got_outer = scores()
    assert got_inner.dtype == torch.float32 and torch.equal(got_inner, want_inner)
    assert got_outer.dtype == torch.bfloat16 and torch.equal(got_outer, want_outer)


def test_follow_ops_keep_input_format() -> None:
    lin, x = seeded_linear(6, 16, 16, batch=4)
    with autocast("bf16", emulate=True):
        h = lin(x)
        g = F.gelu(h)
        t = torch.tanh(h) * 3.3
        v = h.t().reshape(-1)
        mixed = h + x  # bf16 + fp32 promotes to fp32 (torch's rule)
    hb = h.detach().to(torch.bfloat16)
    # torch's own bf16 kernels are the oracle: compute in fp32, round the result once
    assert torch.equal(g, F.gelu(hb).float())
    assert torch.equal(t, (torch.tanh(hb) * 3.3).float())
    assert torch.equal(v, hb.t().reshape(-1).float())
    assert torch.equal(mixed, h.detach() + x)
    assert not rep(mixed, torch.bfloat16)


@pytest.mark.parametrize(
    ("name", "op"),
    [
        ("vdot", lambda a, b: torch.vdot(a.flatten(), b.flatten())),
        ("dot", lambda a, b: torch.dot(a.flatten(), b.flatten())),
        ("inner", lambda a, b: torch.inner(a[0], b[0])),
        ("linalg_cross", lambda a, b: torch.linalg.cross(a[:, :3], b[:, :3])),
        ("linalg_vecdot", torch.linalg.vecdot),
        ("lerp", lambda a, b: torch.lerp(a, b, 0.25)),
        ("index_add", lambda a, b: a.index_add(0, torch.tensor([0, 2]), b[:2])),
        ("scatter_add", lambda a, b: a.scatter_add(0, torch.zeros_like(b, dtype=torch.long), b)),
        ("masked_scatter", lambda a, b: a.masked_scatter(a > 0, b)),
    ],
)
def test_native_promotes_ops_that_refuse_mixed_dtypes(name: str, op: object) -> None:
    # a low op's bf16 result meeting a float32 tensor: torch refuses these ops outright (no
    # type promotion); the region widens the bf16 operand, exactly, as emulation's float32
    # containers and "widest input wins" make it
    torch.manual_seed(0)
    a, b = torch.randn(4, 4), torch.randn(4, 4).bfloat16()
    with pytest.raises(RuntimeError):
        op(a, b)  # type: ignore[operator]
    with autocast("bf16", emulate=False, device_type="cpu"):
        got = op(a, b)  # type: ignore[operator]
    want = op(a, b.float())  # type: ignore[operator]
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_native_spectral_norm_trains() -> None:
    # torch's spectral_norm: sigma = vdot(u, mv(W, v)); mv is a low op, u a float32 buffer
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(4, 8)
    with autocast("bf16", emulate=False, device_type="cpu"):
        out = model(x)
    out.float().sum().backward()
    w = model[0].parametrizations.weight.original
    assert w.grad is not None and bool(torch.isfinite(w.grad).all())


def _func_model() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    return m, {k: v.detach() for k, v in m.named_parameters()}, torch.randn(4, 8)


@pytest.mark.parametrize("fmt", ["bf16", "e4m3", "mxfp8_e4m3"])
def test_torch_func_grad_equals_autograd_in_emulated_regions(fmt: str) -> None:
    # torch.func's wrappers hold no memory (the C kernels cannot take them) and forbid .data
    # writes: the region rounds them out of place, through the autograd Function
    from torch.func import functional_call, grad

    m, params, x = _func_model()

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(m, p, (xi,)).sum()

    with autocast(fmt, emulate=True):
        got = grad(loss)(params, x)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    with autocast(fmt, emulate=True):
        loss(leaves, x).backward()
    for k, v in leaves.items():
        assert torch.equal(got[k], v.grad), k


@pytest.mark.parametrize("fmt", ["bf16", "mxfp8_e4m3"])
def test_per_sample_gradients_with_vmap_equal_a_loop(fmt: str) -> None:
    from torch.func import functional_call, grad, vmap

    m, params, x = _func_model()

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(m, p, (xi,)).sum()

    with autocast(fmt, emulate=True):
        got = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        with autocast(fmt, emulate=True):
            loss(leaves, x[i]).backward()
        for k, v in leaves.items():
            assert torch.equal(got[k][i], v.grad), (k, i)


def test_in_place_ops_inside_torch_func_transforms() -> None:
    # an in-place op keeps its tensor's format: rounded through .data eagerly, which vmap
    # refuses; inside transforms an in-place straight-through copy, the same values
    from torch.func import grad, jvp, vmap

    torch.manual_seed(0)
    w, x = torch.randn(8, 8), torch.randn(4, 8)

    def f(r: torch.Tensor) -> torch.Tensor:
        h = F.linear(r, w)
        h.mul_(1.1)
        return h

    with autocast("bf16", emulate=True):
        batched = vmap(f)(x)
        loop = torch.stack([f(r) for r in x])
        g = grad(lambda r: f(r).sum())(x[0])
        leaf = x[0].clone().requires_grad_()
        f(leaf).sum().backward()
        tangent = jvp(f, (x[0],), (torch.ones(8),))[1]
    assert torch.equal(batched, loop) and torch.equal(batched, batched.bfloat16().float())
    assert torch.equal(g, leaf.grad)
    assert bool(tangent.abs().sum() > 0)


def test_vmapped_current_scaling_scales_each_sample() -> None:
    # vmap's semantics: each sample is a tensor of its own, with its own amax and scale
    from torch.func import vmap

    torch.manual_seed(0)
    x = torch.randn(4, 64) * torch.tensor([[1.0], [1e-3], [30.0], [1e2]])
    with autocast("e4m3", emulate=True):
        got = vmap(lambda r: F.linear(r, torch.eye(64)))(x)
    s = 448.0 / x.abs().amax(dim=1, keepdim=True)  # oracle: torch's saturating fp8 cast
    want = (x * s).to(torch.float8_e4m3fn).float() / s
    assert torch.equal(got, want)


def _penalty_grads(ctx: Any, w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> list:
    # a gradient penalty (WGAN-GP, R1): the input gradient is built with create_graph=True
    # and differentiated again
    a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    xi = x.clone().requires_grad_()
    with ctx:
        h = F.linear(xi, a)
        out = F.linear(h * h, b)
    (g,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
    (g * g).sum().backward()
    return [a.grad, b.grad]


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_second_order_gradients_pass_the_roundings(fmt: str) -> None:
    # Small integers: every value of every order is exact in the format, so the emulated
    # gradients must equal float32's. The gradient roundings used to be plain roundings of
    # a tensor in the second-order graph, whose derivative is zero: the penalty's gradient
    # lost its path through them (bf16: 100% off on a real discriminator).
    w1 = torch.tensor([[1.0, -1.0], [2.0, 1.0], [0.0, 1.0]])
    w2 = torch.tensor([[1.0, -2.0, 1.0]])
    x = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])
    want = _penalty_grads(contextlib.nullcontext(), w1, w2, x)
    got = _penalty_grads(autocast(fmt, emulate=True), w1, w2, x)
    for w in want:  # the premise: nonzero, and exact in the format
        assert bool(w.abs().sum() > 0) and torch.equal(w, w.to(DT[fmt]).float())
    for gw, ww in zip(got, want, strict=True):
        assert torch.equal(gw, ww)


def test_second_order_gradients_are_rounded_too() -> None:
    # what flows back through a gradient rounding in the next order is rounded alike: an
    # input gradient built under create_graph, differentiated again, reaches x rounded
    torch.manual_seed(0)
    w = torch.randn(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    with autocast("bf16", emulate=True):
        y = F.linear(x, w)
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad((g * 1.1).sum(), x)
    assert bool(gx.abs().sum() > 0)
    assert torch.equal(gx, gx.to(torch.bfloat16).float())


@pytest.mark.parametrize("api", ["torch.func.jvp", "forward_ad"])
def test_forward_mode_tangents_pass_the_roundings(api: str) -> None:
    # Tangents used to be dropped (forward_ad: None; jvp: zero) or refused (.data writes in a
    # transform). Small integers: every value is exact in bf16, so the emulated tangent must
    # equal float32's; with values that round, it stays close to float32's
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    w1 = torch.tensor([[1.0, -1.0], [2.0, 1.0], [0.0, 1.0]])
    w2 = torch.tensor([[1.0, -2.0, 1.0]])

    def f(t: torch.Tensor) -> torch.Tensor:
        h = F.linear(t, w1)
        return F.linear(h * h, w2)

    def tangent(ctx: Any, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if api == "torch.func.jvp":
            with ctx:
                return jvp(f, (x,), (v,))[1]
        with fwAD.dual_level(), ctx:
            out = fwAD.unpack_dual(f(fwAD.make_dual(x, v))).tangent
        assert out is not None
        return out

    x, v = torch.tensor([[1.0, 2.0], [-1.0, 1.0]]), torch.tensor([[1.0, 0.0], [2.0, -1.0]])
    want = tangent(contextlib.nullcontext(), x, v)
    assert bool(want.abs().sum() > 0)
    assert torch.equal(tangent(autocast("bf16", emulate=True), x, v), want)
    torch.manual_seed(0)
    x, v = torch.randn(4, 2), torch.randn(4, 2)
    want = tangent(contextlib.nullcontext(), x, v)
    got = tangent(autocast("bf16", emulate=True), x, v)
    assert not torch.equal(got, want)
    assert torch.allclose(got, want, rtol=0.05, atol=1e-2 * float(want.abs().max()))


def test_follow_in_place_keeps_format_and_casts_untag() -> None:
    lin, x = seeded_linear(7, 8, 8, batch=3)
    with autocast("fp16", emulate=True):
        h = lin(x)
        h.mul_(1.1)
        f = h.float()  # a cast to fp32: later ops see an fp32 tensor
        z = f * 1.1
        moved = h.to("cpu") * 1.1  # a device move is not a cast: still fp16
    assert rep(h, torch.float16)
    assert not rep(z, torch.float16)
    assert rep(moved, torch.float16)


def test_custom_op_lists() -> None:
    lin, x = seeded_linear(8, 16, 16, batch=4)
    ol = OpLists().with_fp32("linear").with_low("gelu")
    with autocast("bf16", emulate=True, op_lists=ol):
        h = lin(x)
        g = F.gelu(x * 1.0001)
    assert torch.equal(h, lin(x))  # linear now fp32
    assert rep(g, torch.bfloat16)
    # native executor honours the same lists
    with autocast("bf16", emulate=False, op_lists=ol, device_type="cpu"):
        hn = lin(x)
    assert hn.dtype == torch.float32 and torch.equal(hn, lin(x))


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


def test_gradients_follow_policy_and_match_torch_autocast() -> None:
    torch.manual_seed(9)
    lin = nn.Linear(64, 32)
    x = torch.randn(16, 64, requires_grad=True)
    with autocast("bf16", emulate=True):
        loss = lin(x).square().sum()
    loss.backward()  # outside the region: the graph carries the roundings
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    assert rep(gx, torch.bfloat16) and rep(gw, torch.bfloat16)
    x.grad = None
    lin.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):
        loss_n = lin(x).float().square().sum()
    loss_n.backward()
    # equal up to accumulation order (one bf16 ulp where they differ)
    for a, b in ((gx, x.grad), (gw, lin.weight.grad)):
        close = (a - b).abs() <= torch.maximum(a.abs(), b.abs()) * 2.0**-7
        assert bool(close.all())
        assert (a == b).double().mean() > 0.9


def test_hybrid_gradient_operands_are_e5m2() -> None:
    torch.manual_seed(10)
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    with autocast("p=f32,c=e4m3,o=f32,g=e5m2", emulate=True, fp8_recipe=None):  # raw rounding
        y = lin(x)
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    assert not rep(y, e4m3)  # fp8 GEMMs write fp32 results
    probe = Probe()
    with probe:
        (y * torch.linspace(0.3, 3, 16)).sum().backward()
    mms = probe.find("mm")
    assert len(mms) == 2  # dX = dY W, dW = dY^T X
    dy = torch.linspace(0.3, 3, 16).to(e5m2).float().expand(8, 16)  # torch's cast as oracle
    for _, ins, _ in mms:
        # one operand is the e5m2-rounded gradient, the other a saved e4m3 forward operand
        assert any(
            i.shape in ((8, 16), (16, 8))
            and torch.equal(i.reshape(-1), (dy if i.shape == (8, 16) else dy.t()).reshape(-1))
            for i in ins
        )
        assert any(rep(i, e4m3) and not rep(i, e5m2) for i in ins)


def test_no_grad_and_nested_regions_restore_state() -> None:
    lin, x = seeded_linear(11, 8, 8, batch=2)
    ref = lin(x)
    with torch.no_grad(), autocast("bf16", emulate=True):
        a = lin(x)
        with autocast("fp32"):
            b = lin(x)
            with autocast("bf16", emulate=False, device_type="cpu"):
                c = lin(x)
            d = lin(x)
        e = lin(x)
    assert not a.requires_grad and rep(a, torch.bfloat16)
    assert torch.equal(b, ref.detach()) and torch.equal(d, ref.detach())
    assert c.dtype == torch.bfloat16
    assert torch.equal(a, e)
    no_region_left()
    with (
        pytest.raises(KeyError),
        autocast("fp16", emulate=True),
        autocast("bf16", emulate=False, device_type="cpu"),
    ):
        raise KeyError("boom")
    no_region_left()
    assert torch.equal(lin(x), ref)


def test_policy_params_format_reads_parameters_rounded() -> None:
    torch.manual_seed(12)
    ln = nn.LayerNorm(16)
    with torch.no_grad():
        ln.weight.add_(torch.randn(16) * 0.1)
    stored = ln.weight.detach().clone()
    x = torch.randn(3, 16)
    with autocast(Policy(params="bf16"), emulate=True):
        y = ln(x)
    expected = F.layer_norm(x, (16,), ln.weight.detach().to(torch.bfloat16).float(),
                            ln.bias.detach().to(torch.bfloat16).float())  # fmt: skip
    assert torch.equal(y, expected)
    assert torch.equal(ln.weight.detach(), stored)  # storage untouched


def test_rounded_weights_cached_per_version(monkeypatch: pytest.MonkeyPatch) -> None:
    emu = sys.modules["mixprec.precision.emulated"]
    calls: list[tuple[int, ...]] = []
    real = emu.round_to  # the emulation's one rounding entry point

    def counting(t: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return real(t, *a, **k)

    monkeypatch.setattr(emu, "round_to", counting)
    torch.manual_seed(23)
    lin = nn.Linear(12, 6)
    x1, x2 = torch.randn(3, 12), torch.randn(5, 12)
    with torch.no_grad(), autocast("bf16", emulate=True):
        lin(x1)
        first = list(calls)
        calls.clear()
        lin(x2)
        second = list(calls)
        calls.clear()
        lin.weight.mul_(2)  # a new version: rounded again
        y = lin(x2)
        third = list(calls)
    assert (6, 12) in first and (6,) in first  # weight and bias rounded once...
    assert (6, 12) not in second and (6,) not in second  # ...and reused while unchanged
    assert (6, 12) in third and (6,) not in third
    wb = lin.weight.to(torch.bfloat16).double()
    exact = x2.to(torch.bfloat16).double() @ wb.T + lin.bias.to(torch.bfloat16).double()
    assert torch.allclose(y.double(), exact, rtol=2**-7, atol=1e-6)


def test_params_format_with_inference_tensors() -> None:
    # parameters made under inference_mode are inference tensors: no version counter to cache
    # their rounding by, so each use rounds them again
    torch.manual_seed(29)
    with torch.inference_mode():
        lin = nn.Linear(12, 6)
        x = torch.randn(4, 12)
    ref = nn.Linear(12, 6)
    with torch.no_grad():
        ref.weight.copy_(lin.weight)
        ref.bias.copy_(lin.bias)
        stored = ref.weight.clone()
    policy = "p=bf16,c=bf16,o=f32"
    with torch.no_grad(), autocast(policy, emulate=True):
        expected = ref(x.clone())
    with torch.inference_mode(), autocast(policy, emulate=True):
        y1 = lin(x)
        y2 = lin(x)
    assert torch.equal(y1, expected) and torch.equal(y2, expected)
    assert torch.equal(y1, y1.to(torch.bfloat16).float())  # a bf16 result
    assert torch.equal(lin.weight, stored)  # storage untouched


# ---------------------------------------------------------------------------------------------
# fp8 recipes, MX, accumulation
# ---------------------------------------------------------------------------------------------


def test_current_scaling_rounds_scaled_operands() -> None:
    torch.manual_seed(13)
    a = torch.randn(8, 32) * 1000  # far beyond e4m3's 448: unscaled rounding overflows
    b = torch.randn(32, 4) * 1e-4  # mostly below e4m3's subnormals
    probe = Probe()
    with autocast("e4m3", emulate=True, fp8_recipe=CurrentScaling()), probe:
        y = a @ b
    ((_, ins, _),) = probe.find("mm")
    for got, t in zip(ins, (a, b), strict=True):
        s = 448.0 / t.abs().amax()
        expected = (t * s).to(torch.float8_e4m3fn).float() / s  # torch's saturating cast
        assert torch.allclose(got, expected, rtol=1e-6, atol=0)
    assert torch.isfinite(y).all()
    with autocast("e4m3", emulate=True, fp8_recipe=None):
        assert torch.isnan(a @ b).any()  # unscaled e4m3fn overflow gives NaN


def test_delayed_scaling_history() -> None:
    torch.manual_seed(14)
    recipe = DelayedScaling()
    assert recipe.amax_history_len == 16 and recipe.fp8_format == "HYBRID"
    assert recipe.backward_format.name == "float8_e5m2"
    lin = nn.Linear(16, 4, bias=False)
    amaxes = []
    for step in range(3):
        x = torch.randn(4, 16) * (10.0**step)
        amaxes.append(float(x.abs().max()))
        with autocast("bf16", emulate=True, fp8_recipe=recipe):
            lin(x)
    hist = recipe.amax_history(("", 0, 0))
    assert hist is not None and hist.shape == (16,)
    assert hist[:3].tolist() == pytest.approx(amaxes[::-1], rel=1e-7)
    assert float(hist[3:].abs().sum()) == 0
    with pytest.raises(ValueError, match="keep it"):
        autocast("bf16", fp8_recipe="delayed")
    with pytest.raises(ValueError, match="amax_history_len"):
        DelayedScaling(amax_history_len=0)


def test_mx_operands_blocked_along_reduction_axis() -> None:
    from mixprec.quantization import mx_quantize

    torch.manual_seed(15)
    a, b = torch.randn(4, 64), torch.randn(64, 8)
    probe = Probe()
    with autocast("mxfp4_e2m1"), probe:
        a @ b
    ((_, ins, _),) = probe.find("mm")
    assert torch.equal(ins[0], mx_quantize(a, "float4_e2m1fn", axis=-1))
    assert torch.equal(ins[1], mx_quantize(b, "float4_e2m1fn", axis=0))


def test_fp16_accumulation_exact_on_integers() -> None:
    # integer inputs: every fp32 partial sum of a block is exact, so the only roundings are the
    # fp16 roundings of the running sum, which numpy float16 arithmetic reproduces exactly
    g = torch.Generator().manual_seed(16)
    a = torch.randint(0, 9, (3, 200), generator=g).float()
    b = torch.randint(0, 9, (200, 5), generator=g).float()
    block = 16
    with autocast("fp32", emulate=True, accumulate=("float16", block)):
        y = a @ b
    an, bn = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    expected = np.zeros((3, 5), dtype=np.float16)
    for i in range(3):
        for j in range(5):
            acc = None
            for k0 in range(0, 200, block):
                part = float(an[i, k0 : k0 + block] @ bn[k0 : k0 + block, j])
                acc = np.float16(part) if acc is None else np.float16(float(acc) + part)
            expected[i, j] = acc
    assert torch.equal(y, torch.from_numpy(expected.astype(np.float32)))
    assert not torch.equal(y, a @ b)  # the fp16 accumulator loses low bits here


def test_accumulation_error_bound() -> None:
    torch.manual_seed(17)
    a, b = torch.rand(16, 1024), torch.rand(1024, 8)
    k, block = 1024, 32
    with autocast("bf16", emulate=True, accumulate="float16"):
        y = a @ b
    ar, br = a.to(torch.bfloat16).double(), b.to(torch.bfloat16).double()
    exact, absprod = ar @ br, ar.abs() @ br.abs()
    u16, nb = 2.0**-11, math.ceil(k / block)
    gamma = lambda n, u: n * u / (1 - n * u)  # noqa: E731
    bound = (gamma(block, U32) + gamma(nb, u16) * (1 + gamma(block, U32))) * absprod
    bound += 2.0**-8 * exact.abs()  # the final bf16 rounding of the result
    err = (y.double() - exact).abs()
    assert bool((err <= bound).all())
    with autocast("bf16", emulate=True):
        err32 = ((a @ b).double() - exact).abs()
    assert float(err.max()) > float(err32.max())


# ---------------------------------------------------------------------------------------------
# apply_policy
# ---------------------------------------------------------------------------------------------


def test_apply_policy_per_module_overrides_and_remove() -> None:
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 16)
    ref = model(x)
    h_all = apply_policy(model, "p=f32,c=bf16,o=f32", emulate=True)
    h_fc = apply_policy(model, "fp32", filter_fn=lambda m, name: name == "2")
    assert h_all.modules == [""] and h_fc.modules == ["2"]
    probe = Probe()
    with probe:
        y = model(x)
    first, _ = probe.find("addmm")
    assert all(rep(i, torch.bfloat16) for i in first[1])  # module 0: bf16 operands
    # module 2: fp32 on its (bf16-valued, relu) input: exactly the fp32 linear of that input
    h0 = torch.relu(first[2][0].to(torch.bfloat16).float())
    assert torch.equal(y, model[2](h0).detach())
    assert not rep(y, torch.bfloat16)
    h_fc.remove()
    h_all.remove()
    assert torch.equal(model(x), ref)
    no_region_left()


def test_apply_policy_output_cast_native_and_emulated() -> None:
    torch.manual_seed(19)
    model = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with apply_policy(model, "p=f32,c=bf16,o=bf16", emulate=False, device_type="cpu"):
        assert model(x).dtype == torch.bfloat16
    with apply_policy(model, "p=f32,c=bf16,o=f32", emulate=False, device_type="cpu"):
        assert model(x).dtype == torch.float32
    with apply_policy(model, "p=f32,c=f32,o=e5m2", emulate=True):
        y = model(x)
    assert rep(y, torch.float8_e5m2) and not rep(model(x), torch.float8_e5m2)


def test_apply_policy_forward_error_leaves_no_region() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    m = Boom()
    handle = apply_policy(m, "bf16", emulate=True)
    with pytest.raises(RuntimeError, match="boom"):
        m(torch.ones(1))
    handle.remove()
    no_region_left()


# ---------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.emb(x)).mean(1))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5),
    )  # fmt: skip


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "p=f32,c=e4m3,o=f32,g=e5m2", "mxfp4_e2m1"])
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_models_forward_backward(fmt: str, kind: str) -> None:
    torch.manual_seed(20)
    model = _cnn() if kind == "cnn" else TinyTransformer()
    x = torch.randn(4, 3, 8, 8) if kind == "cnn" else torch.randn(4, 6, 8)
    target = torch.randint(0, 5 if kind == "cnn" else 3, (4,))
    ref_loss = F.cross_entropy(model(x), target)
    with autocast(fmt, emulate=True):
        loss = F.cross_entropy(model(x), target)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert abs(loss.item() - ref_loss.item()) < 0.1 * abs(ref_loss.item()) + 0.05
    assert loss.item() != ref_loss.item()  # the policy did change the computation
    with torch.no_grad(), autocast(fmt, emulate=True):
        again = F.cross_entropy(model(x), target)
    assert not again.requires_grad
    no_region_left()


def test_transformer_native_bf16_and_grad_equivalence() -> None:
    torch.manual_seed(21)
    model = TinyTransformer()
    x = torch.randn(2, 5, 8)
    with autocast("bf16", emulate=False, device_type="cpu"):
        y = model(x)
    y.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_torch_compiled_model_inside_region_same_result() -> None:
    torch.manual_seed(22)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(3, 16)
    compiled = torch.compile(model)
    with autocast("fp16", emulate=True):
        eager = model(x)
        y = compiled(x)
    assert torch.equal(y, eager) and rep(y, torch.float16)
    y.sum().backward()
    assert model[0].weight.grad is not None


# ---------------------------------------------------------------------------------------------
# choice of executor and bad input
# ---------------------------------------------------------------------------------------------


def test_emulate_none_choice() -> None:
    from mixprec.precision import cpu_has_fast_bf16

    flags = ""
    if sys.platform.startswith("linux"):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    has_bf16 = (
        "avx512_bf16" in flags
        or "amx_bf16" in flags
        or "AMX" in (torch.backends.cpu.get_cpu_capability())
    )
    assert cpu_has_fast_bf16() == has_bf16
    assert autocast("bf16", device_type="cpu").emulated is (not has_bf16)
    assert autocast("fp16", device_type="cpu").emulated  # no fast fp16 on CPUs here
    assert autocast("e4m3").emulated and autocast("mxfp8_e4m3").emulated
    assert autocast("bf16", accumulate="fp16", device_type="cpu").emulated
    assert not autocast("fp32").emulated
    assert autocast("fp16", emulate=False, device_type="cpu").emulated is False


@pytest.mark.parametrize(
    ("kwargs", "exc", "needle"),
    [
        ({"policy_or_format": "e4m3", "emulate": False}, ValueError, "compute format"),
        ({"policy_or_format": "bf16", "emulate": "yes"}, TypeError, "emulate must be"),
        ({"policy_or_format": "bf16", "op_lists": {"low"}}, TypeError, "OpLists"),
        ({"policy_or_format": "bf16", "accumulate": "mxfp8_e4m3"}, ValueError, "element"),
        ({"policy_or_format": "bf16", "accumulate": ("fp16", 0)}, ValueError, "block_k"),
        ({"policy_or_format": "bf16", "fp8_recipe": "sometimes"}, ValueError, "fp8_recipe"),
        ({"policy_or_format": "bf16", "device_type": "tpu"}, ValueError, "device_type"),
        ({"policy_or_format": "bfloat17"}, ValueError, "unknown format 'bfloat17'"),
        ({"policy_or_format": "c=bf16,z=1"}, ValueError, "unknown key 'z'"),
        ({"policy_or_format": 42}, TypeError, "Policy"),
        (
            {"policy_or_format": "bf16", "emulate": False, "fp8_recipe": "current"},
            ValueError,
            "emulated only",
        ),
    ],
)
def test_bad_arguments(kwargs: dict, exc: type, needle: str) -> None:
    with pytest.raises(exc, match=needle):
        autocast(**kwargs)


def test_decorating_a_non_callable_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"decorates a callable .*got int: 5"):
        autocast("bf16", emulate=True)(5)  # type: ignore[arg-type]


def test_accumulate_is_a_frozen_config() -> None:
    acc = Accumulate.coerce(("fp16", 256))
    assert acc == Accumulate("float16", 256) and acc.format is get_format("float16")
    assert Accumulate.coerce("bf16") == Accumulate(get_format("bfloat16"), 32)
    assert Accumulate.coerce(acc) is acc and Accumulate.coerce(None) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        acc.block_k = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="block_k must be a positive int, got True"):
        Accumulate("fp16", True)  # type: ignore[arg-type]
    region = autocast("fp32", emulate=True, accumulate=acc)
    assert region.accumulate is acc and repr(region).endswith("accumulate=float16/256)")


def test_any_fp8_recipe_object_is_accepted() -> None:
    class Halving:  # an Fp8Recipe by shape: formats and a quantize
        forward_format = backward_format = get_format("e4m3")

        def quantize(self, t: torch.Tensor, fmt: object, slot: object) -> torch.Tensor:
            return t * 0.5

    assert isinstance(Halving(), Fp8Recipe) and isinstance(DelayedScaling(), Fp8Recipe)
    x, w = torch.ones(2, 4), torch.ones(3, 4)
    with autocast("bf16", fp8_recipe=Halving()):
        y = x @ w.t()
    assert torch.equal(y, torch.ones(2, 3))  # (x / 2) @ (w / 2).t() = 4 / 4
    with pytest.raises(TypeError, match="fp8_recipe must be None, 'current'"):
        autocast("bf16", fp8_recipe=42)  # type: ignore[arg-type]


@pytest.mark.parametrize("emulate", [True, False])
def test_the_region_holds_an_executor(emulate: bool) -> None:
    with autocast("bf16", emulate=emulate, device_type="cpu"):
        (executor,) = AC._LOCAL.entries
        assert isinstance(executor, Executor) and executor.emulated is emulate


def test_native_is_fast_takes_formats_and_dtypes() -> None:
    for fmt in ("float32", torch.float64, get_format("fp32"), resolve_format("f64")):
        assert native_is_fast(fmt, "cpu") and native_is_fast(fmt, "cuda")
    for fmt in ("e4m3", "mxfp8", torch.float8_e5m2, None, "e6m9"):
        assert not native_is_fast(fmt, "cpu")
    assert not native_is_fast("fp16", "cpu")  # no fast fp16 on CPUs
    assert native_is_fast("bf16", "cpu") == native_is_fast(torch.bfloat16, "cpu")
    assert native_is_fast(get_format("bf16"), "cpu") == cpu_has_fast_bf16()


def test_apply_policy_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        apply_policy(lambda x: x, "bf16")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="filter_fn"):
        apply_policy(nn.Linear(2, 2), "bf16", filter_fn="Linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp8_format"):
        CurrentScaling(fp8_format="E5M2")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the default fp8 recipe, power-of-two scales, MX scale rounding
# ---------------------------------------------------------------------------------------------


def test_fp8_formats_default_to_current_scaling() -> None:
    from mixprec.precision import DEFAULT_RECIPE, default_recipe

    r = autocast("e4m3").fp8_recipe
    assert isinstance(r, CurrentScaling) and not r.power_of_two
    assert (r.forward_format.name, r.backward_format.name) == ("float8_e4m3fn",) * 2
    hybrid = autocast("p=f32,c=e4m3,o=f32,g=e5m2").fp8_recipe
    assert hybrid is not None and hybrid.backward_format.name == "float8_e5m2"
    assert autocast("e5m2").fp8_recipe.forward_format.name == "float8_e5m2"  # type: ignore[union-attr]
    for fmt in ("bf16", "fp16", "mxfp8", "e6m9", "float32"):
        assert autocast(fmt).fp8_recipe is None, fmt
    assert autocast("e4m3", fp8_recipe=None).fp8_recipe is None  # raw rounding, on request
    assert autocast("e4m3", fp8_recipe=DEFAULT_RECIPE).fp8_recipe is not None
    assert default_recipe(Policy(compute="float8_e8m0fnu")) is None  # a scale format, no mantissa
    assert autocast("p=f32,c=e4m3,o=f32,g=mxfp8_e5m2").fp8_recipe is None  # per-block gradients
    assert repr(DEFAULT_RECIPE) == "DEFAULT_RECIPE"


def test_default_recipe_equals_explicit_current_scaling() -> None:
    torch.manual_seed(30)
    a = torch.randn(8, 32) * 1000  # unscaled e4m3 rounding would overflow to NaN
    b = torch.randn(32, 4) * 1e-4
    with autocast("e4m3", emulate=True):
        y = a @ b
    with autocast("e4m3", emulate=True, fp8_recipe=CurrentScaling(fp8_format="E4M3")):
        ref = a @ b
    assert torch.isfinite(y).all() and torch.equal(y, ref)
    lin = nn.Linear(32, 4)
    handle = apply_policy(lin, "e4m3", emulate=True)
    with torch.no_grad():
        out = lin(a)
    handle.remove()
    explicit = CurrentScaling(fp8_format="E4M3")
    with torch.no_grad(), autocast("e4m3", emulate=True, fp8_recipe=explicit):
        assert torch.equal(out, lin(a))


def test_default_recipe_leaves_wide_gradients_unscaled() -> None:
    torch.manual_seed(31)
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    with autocast("p=f32,c=e4m3,o=f32,g=bf16", emulate=True):
        y = lin(x)
    probe = Probe()
    dy = torch.linspace(0.3, 3, 16) * 1.001
    with probe:
        (y * dy).sum().backward()
    want = dy.to(torch.bfloat16).float().expand(8, 16)  # plain bf16 rounding, no scale
    mms = probe.find("mm")
    assert len(mms) == 2
    for _, ins, _ in mms:
        assert any(torch.equal(i, want) or torch.equal(i, want.t()) for i in ins)


def test_power_of_two_scales() -> None:
    torch.manual_seed(32)
    a = torch.randn(8, 32) * 1000
    b = torch.randn(32, 4) * 1e-4
    probe = Probe()
    recipe = CurrentScaling(fp8_format="E4M3", power_of_two=True)
    with autocast("bf16", emulate=True, fp8_recipe=recipe), probe:
        a @ b
    ((_, ins, _),) = probe.find("mm")
    for got, t in zip(ins, (a, b), strict=True):
        s = 2.0 ** math.floor(math.log2(448.0 / t.abs().amax().item()))
        expected = (t * s).to(torch.float8_e4m3fn).float() / s  # exact: s is a power of two
        assert torch.equal(got, expected)


def test_scale_overflow_falls_back_to_one() -> None:
    """An amax so small that 448 / amax overflows float32 must not turn zeros into NaN."""
    x = torch.zeros(4, 4)
    x[0, 0] = 1e-44
    for recipe in (CurrentScaling(), CurrentScaling(power_of_two=True), DelayedScaling()):
        for _ in range(2):
            q = recipe.quantize(x, get_format("e4m3"), slot="s")
            assert torch.isfinite(q).all()


def test_recipe_argument_checks() -> None:
    with pytest.raises(TypeError, match="power_of_two must be a bool"):
        CurrentScaling(power_of_two="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="forward: unknown format 'e4m9x'"):
        CurrentScaling(forward="e4m9x")
    with pytest.raises(ValueError, match="backward"):
        DelayedScaling(backward="nope")
    assert DelayedScaling(forward="e5m2").forward_format.name == "float8_e5m2"


@pytest.mark.parametrize("rule", ["rceil", "ceil", "even"])
def test_mx_scale_rounding_in_autocast(rule: str) -> None:
    from mixprec.quantization import mx_quantize

    torch.manual_seed(33)
    a, b = torch.randn(8, 64) * 3, torch.randn(64, 4)
    a[:, ::32] = 470.0  # the block maxima where floor and rceil/ceil differ
    for region in (
        autocast("mxfp8", scale_rounding=rule),
        autocast(Policy(compute="mxfp8", scale_rounding=rule)),
        autocast(f"c=mxfp8,scale_rounding={rule}"),
    ):
        probe = Probe()
        with region, probe:
            a @ b
        ((_, ins, _),) = probe.find("mm")
        assert torch.equal(ins[0], mx_quantize(a, "e4m3", axis=-1, scale_rounding=rule))
        assert torch.equal(ins[1], mx_quantize(b, "e4m3", axis=0, scale_rounding=rule))
        assert not torch.equal(ins[0], mx_quantize(a, "e4m3", axis=-1)) or rule == "even"
    with pytest.raises(ValueError, match="applies to MX formats only"):
        autocast("bf16", scale_rounding="rceil")
    with pytest.raises(ValueError, match="scale_rounding must be one of"):
        apply_policy(nn.Linear(2, 2), "mxfp8", scale_rounding="round")


def test_user_out_calls_are_emulated_into_the_buffer() -> None:
    """``torch.mm(a, b, out=buf)`` in a region gives what ``torch.mm(a, b)`` gives there, in
    ``buf`` (resized like torch resizes it); tuple ``out=`` too. (A compiled graph's own
    ``out=`` calls pass through: tests/precision/test_compiled_regions.py.)"""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    buf, v, i = torch.empty(3), torch.empty(8), torch.empty(8, dtype=torch.long)
    with autocast("bfloat16", emulate=True):
        ref = torch.mm(a, b)
        got = torch.mm(a, b, out=buf)
        mx = torch.max(a * 1.0001, 1)
        torch.max(a * 1.0001, 1, out=(v, i))
    assert got is buf and torch.equal(buf, ref)
    assert not torch.equal(ref, torch.mm(a, b))  # the region did round
    assert torch.equal(v, mx.values) and torch.equal(i, mx.indices)
