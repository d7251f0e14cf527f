"""Tests for the numerical sanitizer (mixprec.sanitize).

Planted problems must be found with the right kind, op, phase, module and source line; clean
programs must give zero findings. Expected values come from independent oracles: Python's math
module, exact rational arithmetic (fractions), torch run natively outside the sanitizer, and
float64 reference computations.
"""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sanitizer_helpers import marker_line, only

import mixprec
from mixprec import cli
from mixprec.sanitizer import KINDS, SCHEMA_VERSION, Report, record_rounding, sanitize


def line_of(marker: str) -> str:
    """'test_sanitize.py:LINE' of the source line carrying ``# <marker>``."""
    return marker_line(__file__, marker)


# ---------------------------------------------------------------------------------------------
# planted problems


def test_naive_softplus_overflows_at_large_x() -> None:
    x = torch.tensor([-3.0, 0.5, 20.0, 90.0, 100.0, 300.0])
    with sanitize() as report:
        y = torch.log(1 + torch.exp(x))  # <softplus>
    fmax = torch.finfo(torch.float32).max
    expected = sum(1 for v in x.tolist() if v > math.log(fmax))  # exp(v) > fp32 max: math oracle
    assert expected == 3
    over = only(report.findings, kind="overflow")
    assert len(over) == 1
    f = over[0]
    assert (f.op, f.phase, f.module, f.location) == (
        "aten.exp.default",
        "forward",
        None,
        line_of("softplus"),
    )
    assert f.count == expected
    assert f.real_value == math.inf and math.isfinite(f.shadow_value)
    # downstream inf (1 + inf, log(inf)) is inherited, not reported again
    assert not only(report.findings, op="aten.log.default")
    assert not only(report.findings, op="aten.add.Tensor")
    assert torch.isinf(y).sum() == expected  # the program itself ran unchanged


class OnePassVariance(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * x).mean() - x.mean() ** 2  # <variance>


def test_one_pass_variance_cancellation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) + 3000.0
    model = nn.Sequential(nn.Identity(), OnePassVariance())
    with sanitize() as report:
        var = model(x)
    canc = only(report.findings, kind="cancellation")
    assert len(canc) == 1, report.findings
    f = canc[0]
    assert (f.op, f.phase, f.module, f.location) == (
        "aten.sub.Tensor",
        "forward",
        "1",
        line_of("variance"),
    )
    assert f.module_type == "OnePassVariance"
    assert f.code == "return (x * x).mean() - x.mean() ** 2  # <variance>"
    # exact oracle on the float32 inputs: E[x^2] / var = 2^bits_cancelled
    xs = [Fraction(v) for v in x.tolist()]
    n = len(xs)
    mean = sum(xs) / n
    ex2 = sum(v * v for v in xs) / n
    exact_var = ex2 - mean * mean
    assert abs(f.bits_cancelled - math.log2(ex2 / exact_var)) < 1.0
    # the real result is far off; the finding reports it and the exact (shadow) value
    rel = abs(Fraction(float(var)) - exact_var) / exact_var
    assert rel > 2.0**-12
    assert f.real_value == float(var)
    # the float64 shadow cancels too: it keeps about 53 - bits_cancelled bits
    shadow_tol = 2.0 ** (f.bits_cancelled + 2 - 53)
    assert abs(Fraction(f.shadow_value) - exact_var) <= shadow_tol * exact_var
    assert f.bits_lost > 11.5
    # mean and mul are well conditioned: no other findings
    assert len(report.findings) == 1


def test_log_of_softmax_with_large_logits() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 16, generator=g) * 40.0
    with sanitize() as report:
        lp = torch.log(torch.softmax(logits, dim=-1))  # <logsoftmax>
    # oracle: torch natively, outside the sanitizer
    p32 = torch.softmax(logits, dim=-1)
    p64 = torch.softmax(logits.double(), dim=-1)
    flushed = int(((p32 == 0) & (p64 != 0)).sum())
    assert flushed > 0
    at_log = only(report.findings, op="aten.log.default")
    assert {f.location for f in at_log} == {line_of("logsoftmax")}
    (over,) = only(at_log, kind="overflow")  # log(0) = -inf where the shadow is finite
    assert over.phase == "forward"
    assert over.count == flushed == int(torch.isinf(lp).sum())
    # softmax outputs that survived only as float32 subnormals (a few bits) make log inexact
    subnormal = int(((p32 > 0) & (p32 < torch.finfo(torch.float32).tiny)).sum())
    assert {f.kind for f in at_log} <= {"overflow", "precision_loss"}
    assert sum(f.count for f in only(at_log, kind="precision_loss")) <= subnormal
    # the stable form is clean
    with sanitize() as report2:
        torch.log_softmax(logits, dim=-1)
    assert report2.findings == []


def test_argmax_flip_in_bfloat16() -> None:
    src = torch.tensor([[1.0, 1.001, 0.5], [1.999, 0.25, 2.0], [0.1, 0.2, 0.3]])
    with sanitize() as report:
        a = src.to(torch.bfloat16)
        idx = torch.argmax(a, dim=1)  # <argmax>
    # oracle: argmax of the float32 source vs of the bf16 values (torch natively)
    truth = torch.argmax(src, dim=1)
    assert idx.tolist() == torch.argmax(src.bfloat16(), dim=1).tolist()
    flips = int((truth != idx).sum())
    assert flips == 2
    f = only(report.findings, kind="decision_flip")
    assert len(f) == 1
    assert (f[0].op, f[0].phase, f[0].location, f[0].count) == (
        "aten.argmax.default",
        "forward",
        line_of("argmax"),
        flips,
    )
    assert f[0].bits_lost is None
    # rounding to bf16 is correctly rounded: not a finding by itself
    assert not only(report.findings, op="aten._to_copy.default")


def test_comparison_and_where_flip() -> None:
    a32 = torch.tensor([1.0, 3.0, 1.0 + 2.0**-10])
    b32 = torch.tensor([1.0 + 2.0**-11, 2.0, 1.0])
    with sanitize() as report:
        a, b = a32.bfloat16(), b32.bfloat16()
        mask = a > b  # <compare>
        torch.where(mask, a, b)  # <where>
    # oracle: comparisons on the float32 values vs on the bf16 values
    flips = int(((a32 > b32) != (a32.bfloat16() > b32.bfloat16())).sum())
    assert flips == 1
    f = {x.op: x for x in only(report.findings, kind="decision_flip")}
    assert f["aten.gt.Tensor"].count == flips
    assert f["aten.gt.Tensor"].location == line_of("compare")
    assert f["aten.where.self"].count == flips
    assert f["aten.where.self"].location == line_of("where")


def test_fp16_gradients_flush_to_zero_in_backward() -> None:
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 16, generator=g) * 0.01).half()
    w0 = (torch.randn(16, 4, generator=g) * 0.1).half()
    w = w0.clone().requires_grad_()
    with sanitize() as report:
        loss = (x @ w).sum() * 1e-6  # <fp16loss>
        loss.backward()
    # oracle: the exact gradient (float64, torch natively) is non-zero everywhere and below
    # the float16 normal range; the float16 run flushed some of it to zero
    w64 = w0.double().requires_grad_()
    ((x.double() @ w64).sum() * 1e-6).backward()
    assert bool((w64.grad != 0).all())
    assert float(w64.grad.abs().max()) < torch.finfo(torch.float16).tiny
    zeros = int((w.grad == 0).sum())
    assert zeros > 0
    f = only(report.findings, kind="underflow", phase="backward", op="aten.mm.default")
    assert len(f) == 1
    assert f[0].location == line_of("fp16loss")  # backward ops point at their forward line
    assert f[0].count >= zeros
    assert f[0].dtype == "float16"
    assert report.stats["backward_passes"] == 1


class ZeroOverZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x - x
        return z / z  # <zerodiv>


def test_nan_in_sequential_submodule() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), ZeroOverZero(), nn.Linear(4, 1))
    with sanitize() as report:
        out = model(torch.randn(2, 4))
        out.sum().backward()
    nans = only(report.findings, kind="nan", phase="forward")
    assert len(nans) == 1
    f = nans[0]
    assert (f.op, f.module, f.module_type, f.location) == (
        "aten.div.Tensor",
        "1",
        "ZeroOverZero",
        line_of("zerodiv"),
    )
    assert f.count == 8  # every element of the 2x4 activation
    # NaN is reported where it is produced, not in the Linear after it
    assert not only(report.findings, module="2")
    # backward: the gradient of z / z at z = 0 is produced there too, attributed to module "1"
    back = [x for x in report.findings if x.phase == "backward"]
    assert back and all(x.module == "1" and x.op == "aten.div.Tensor" for x in back)


def test_in_place_cancellation_and_step_counting() -> None:
    x = torch.full((64,), 1000.0) + torch.arange(64) * 1e-3
    with sanitize() as report:
        for _ in range(2):
            w = torch.ones(1, requires_grad=True)
            (w * 2).sum().backward()  # a backward pass ends a step
        y = (x * 1.1).mul(1.1)
        y.sub_(x * 1.21)  # <inplace>
    f = only(report.findings, kind="cancellation")
    assert len(f) == 1
    assert (f[0].op, f[0].location, f[0].first_step) == ("aten.sub_.Tensor", line_of("inplace"), 2)
    assert report.stats["backward_passes"] == 2


# ---------------------------------------------------------------------------------------------
# clean programs


def _mlp_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x = torch.randn(128, 32, generator=g).to(dtype)
        y = torch.randint(0, 10, (128,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()


def test_clean_mlp_has_no_findings() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with sanitize() as report:
        _mlp_steps(model, opt, 2)
    assert report.findings == [], str(report)
    st = report.stats
    assert st["backward_passes"] == 2 and st["ops_shadowed"] > 30 and st["ops_unshadowed"] == {}


def test_clean_transformer_has_no_findings() -> None:
    torch.manual_seed(6)
    d, vocab = 32, 50
    emb = nn.Embedding(vocab, d)
    layer = nn.TransformerEncoderLayer(
        d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True
    )
    head = nn.Linear(d, vocab)
    model = nn.ModuleDict({"emb": emb, "layer": layer, "head": head})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, vocab, (4, 16), generator=g)
    mask = nn.Transformer.generate_square_subsequent_mask(16)
    with sanitize() as report:
        for _ in range(2):
            opt.zero_grad()
            h = layer(emb(idx), src_mask=mask, is_causal=True)
            h = F.gelu(h) + F.scaled_dot_product_attention(h, h, h, is_causal=True)
            loss = F.cross_entropy(head(h).reshape(-1, vocab), idx.reshape(-1))
            loss.backward()
            opt.step()
    assert report.findings == [], str(report)
    assert report.stats["ops_unshadowed"] == {}


def test_clean_cnn_with_batchnorm_dropout_and_eval() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.2), nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    torch.manual_seed(12)
    with sanitize() as report:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            a = model(x)
        with torch.inference_mode():
            b = model(x)
    # BatchNorm makes the conv bias gradient exactly zero: the float32 value is rounding noise,
    # but within what a backward-stable sum can err by, so it is no finding
    assert report.findings == [], str(report)
    st = report.stats
    assert st["ops_unshadowed"] == {} and st["internal_errors"] == {} and st["steps"] == 2
    # the sanitizer changed nothing: same eval outputs as a plain run (dropout off in eval)
    assert torch.equal(a, b) and torch.equal(a, model(x).detach())


def test_results_are_unchanged_by_the_sanitizer() -> None:
    def train(sanitized: bool) -> list[torch.Tensor]:
        torch.manual_seed(13)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.GELU(), nn.Linear(16, 2))
        opt = torch.optim.AdamW(model.parameters(), 1e-2)
        ctx = sanitize() if sanitized else torch.autograd.set_grad_enabled(True)
        with ctx:
            for _ in range(3):
                opt.zero_grad()
                F.mse_loss(model(torch.randn(32, 8)), torch.randn(32, 2)).backward()
                opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for p, q in zip(train(False), train(True), strict=True):
        assert torch.equal(p, q)  # bit for bit: same RNG stream, same kernels


def test_clean_bfloat16_and_float16_mlp() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(8)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with sanitize() as report:
            _mlp_steps(model, opt, 1, dtype)
        assert report.findings == [], (dtype, str(report))


# ---------------------------------------------------------------------------------------------
# gradient histogram


def test_gradient_histogram_against_float16() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(64, 16)
    with sanitize() as report:
        (model(x).square().mean() * 1e-5).backward()
    h = report.grad_histogram("fp16")
    assert h.fmt == "float16" and set(h.kinds) == {"activation", "weight"}
    # oracle: the real float32 parameter gradients (torch natively)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    nz = grads[grads != 0]
    assert h.total("weight") == nz.numel()
    assert h.max_abs["weight"] == pytest.approx(float(nz.abs().max()), rel=1e-5)
    flush = float((nz.abs() < 2.0**-25).double().mean())
    assert 0.0 < flush < 1.0
    assert h.flush_to_zero["weight"] == pytest.approx(flush, abs=0.01)
    overall = max(h.max_abs.values())
    k = math.floor(math.log2(65504.0 / overall))
    assert h.recommended_loss_scale == 2.0**k
    assert overall * 2.0**k <= 65504.0 < overall * 2.0 ** (k + 1)
    after = float((nz.abs() * 2.0**k < 2.0**-25).double().mean())
    assert h.flush_to_zero_scaled["weight"] == pytest.approx(after, abs=0.01)
    assert h.flush_to_zero_scaled["weight"] < h.flush_to_zero["weight"]
    # activations: gradients of the three module outputs (Sequential's is its last child's)
    assert h.total("activation") + h.zeros["activation"] == 64 * (32 + 32 + 4)


@pytest.mark.parametrize("transform", ["grad", "vmap(grad)"])
def test_torch_func_transforms_are_checked(transform: str) -> None:
    from torch.func import functional_call, grad, vmap

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x * 100.0).sum()

    run = grad(f) if transform == "grad" else vmap(grad(f))
    x = torch.tensor([[0.1, 1.0], [0.2, 0.3]])
    with sanitize() as report:
        run(x)
    assert [(f.kind, f.op, f.phase) for f in report.findings][:1] == [
        ("overflow", "aten.exp.default", "forward")
    ]
    # per-sample gradients of a clean model: nothing found, and the gradient statistics (taken
    # from the values under vmap's wrapper, every sample at once) are there
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi,)).sum()

    per = grad(loss) if transform == "grad" else vmap(grad(loss), in_dims=(None, 0))
    with sanitize() as report:
        per(params, torch.randn(4, 8))
    assert report.findings == [] and report.stats["internal_errors"] == {}
    assert report.stats["ops_shadowed"] > 0 and report.grad_histogram().total("activation") > 0


def test_emulated_roundings_under_vmap_are_checked() -> None:
    # the quantize observer checks a rounding's overflow and underflow with reads of counts,
    # which vmap refuses: it checks the values under the wrapper, every sample at once
    from torch.func import vmap

    rows = torch.tensor([[1e5, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    with sanitize() as report, mixprec.autocast("fp16", emulate=True):
        vmap(lambda r: F.linear(r, torch.eye(4)) * 1.0)(rows)
    assert ("overflow", "mixprec.quantize") in [(f.kind, f.op) for f in report.findings]
    assert report.stats["internal_errors"] == {}


def test_forward_mode_ad_is_checked_without_internal_errors() -> None:
    # forward-mode AD runs torch's reference decompositions on meta tensors (shape checks):
    # nothing to shadow there, and no internal error (there were two per linear)
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(4, 8)
    with sanitize() as report:
        with fwAD.dual_level():
            out = model(fwAD.make_dual(x, torch.ones_like(x)))
            assert fwAD.unpack_dual(out).tangent is not None
        jvp(model, (x,), (torch.ones_like(x),))
    assert report.findings == [] and report.stats["internal_errors"] == {}
    with sanitize() as report, fwAD.dual_level():
        torch.exp(fwAD.make_dual(torch.tensor([100.0, 1.0]), torch.ones(2)) * 2)
    assert [(f.kind, f.op) for f in report.findings][:1] == [("overflow", "aten.exp.default")]


def test_grad_histogram_needs_a_backward_pass() -> None:
    with sanitize() as report:
        torch.ones(3) * 2
    with pytest.raises(RuntimeError, match="no gradients"):
        report.grad_histogram()
    with pytest.raises(ValueError, match="float16"):
        report.grad_histogram("float17")


# ---------------------------------------------------------------------------------------------
# reports


def _report_with_findings() -> Report:
    model = nn.Sequential(nn.Linear(4, 4), ZeroOverZero())
    with sanitize() as report:
        model(torch.randn(3, 4)).sum().backward()
        torch.exp(torch.tensor([200.0]))
    return report


def test_json_round_trip_and_text() -> None:
    report = _report_with_findings()
    text = report.to_json()

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads(text, parse_constant=no_constants)  # strict JSON: no NaN / Infinity
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    assert doc["tool"] == "mixprec.sanitize"
    assert {f["kind"] for f in doc["findings"]} <= set(KINDS)
    again = Report.from_json(text)
    assert [f.to_dict() for f in again.findings] == [f.to_dict() for f in report.findings]
    assert math.isnan(again.findings[0].real_value)  # NaN survives as "nan"
    assert again.stats == report.stats
    s = str(report)
    assert "aten.div.Tensor" in s and "aten.exp.default" in s and line_of("zerodiv") in s
    with pytest.raises(ValueError, match="schema_version"):
        Report.from_json(json.dumps({"schema_version": 99}))
    # worst first
    sev = [f.severity for f in report.findings]
    assert sev == sorted(sev, reverse=True)


def test_plot_writes_png(tmp_path) -> None:
    report = _report_with_findings()
    path = report.plot(tmp_path / "report.png")
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    h = report.grad_histogram("bfloat16")
    hp = h.plot(tmp_path / "hist.png")
    assert os.path.getsize(hp) > 1000
    paths = report.save(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["report.json", "report.png", "report.txt"]
    with open(paths["json"]) as fh:
        assert json.load(fh)["schema_version"] == SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------
# options, state restoration


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), ZeroOverZero())
        self.other = ZeroOverZero()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(x), self.other(x)


def test_modules_restricts_checking() -> None:
    model = TwoBranches()
    x = torch.randn(2, 4)
    with sanitize() as report:
        model(x)
    assert sorted(f.module for f in report.findings) == ["inner.1", "other"]
    with sanitize(modules=[model.other]) as report:
        model(x)
    assert [f.module for f in report.findings] == ["other"]  # names still fully qualified
    with sanitize(modules=lambda m, fqn: fqn == "inner") as report:  # and its submodules
        model(x)
    assert [f.module for f in report.findings] == ["inner.1"]
    with sanitize(modules=model.inner) as report:  # a single root: names relative to it
        model(x)
    assert [f.module for f in report.findings] == ["1"]


def test_state_restored_on_exception() -> None:
    from torch.nn.modules import module as nnm

    model = nn.Linear(3, 3)
    n_pre, n_post = len(nnm._global_forward_pre_hooks), len(nnm._global_forward_hooks)
    with pytest.raises(RuntimeError, match="boom"), sanitize():
        model(torch.randn(2, 3)).sum().backward()
        raise RuntimeError("boom")
    assert torch._C._len_torch_dispatch_stack() == 0
    assert len(nnm._global_forward_pre_hooks) == n_pre
    assert len(nnm._global_forward_hooks) == n_post
    assert not model.weight._backward_hooks
    # usable again, and nesting is refused
    with sanitize() as report:
        with pytest.raises(RuntimeError, match="nested"), sanitize():
            pass
        torch.ones(2) + 1
    assert report.findings == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="float64"), sanitize(shadow="float16"):
        pass
    with pytest.raises(ValueError, match="threshold_bits"), sanitize(threshold_bits=0):
        pass
    with pytest.raises(TypeError, match="modules"), sanitize(modules=3):
        pass
    with pytest.raises(ValueError, match="float16"), sanitize(dtype_hint="float17"):
        pass
    with pytest.raises(ValueError, match="shadow_memory_mib=-1"), sanitize(shadow_memory_mib=-1):
        pass
    with pytest.raises(TypeError, match="shadow_memory_mib"), sanitize(shadow_memory_mib="1G"):
        pass
    with pytest.raises(ValueError, match="precision_loss"):
        Report({}).by_kind("nans")


def test_threshold_bits_is_configurable() -> None:
    x = torch.full((256,), 100.0) + torch.linspace(0, 1, 256)
    # x * 1.1 - x: 3.5 bits cancelled, so the product's rounding error loses up to ~3 bits
    with sanitize(threshold_bits=2) as strict:
        x * 1.1 - x
    with sanitize() as default:
        x * 1.1 - x
    assert only(strict.findings, kind="cancellation", op="aten.sub.Tensor")
    assert not default.findings


def test_dtype_hint_and_record_rounding() -> None:
    from mixprec.quantization import quantize

    x = torch.full((64,), 300.0) + torch.arange(64) * 0.01
    y = torch.full((64,), 300.0)

    def emulated_bf16_sub():
        xq, yq = quantize(x, "bfloat16"), quantize(y, "bfloat16")
        record_rounding(x, xq, "bfloat16")  # what an emulating autocast would report
        record_rounding(y, yq, "bfloat16")
        return xq - yq  # <emulated>

    with sanitize(dtype_hint="bfloat16") as report:
        emulated_bf16_sub()
    f = only(report.findings, kind="cancellation")
    assert len(f) == 1 and f[0].location == line_of("emulated") and f[0].dtype == "bfloat16"
    with sanitize() as plain:  # without the hint the fp32 subtraction itself is exact
        emulated_bf16_sub()
    assert not only(plain.findings, kind="cancellation")
    assert record_rounding(x, x, "bf16") is None  # no-op outside a sanitizer


def test_public_names() -> None:
    # `mixprec.sanitize` is the context manager (the subpackage is `mixprec.sanitizer`)
    with mixprec.sanitize(threshold_bits=8) as report:
        torch.ones(2) * 3
    assert report.config["threshold_bits"] == 8
    assert mixprec.Report is Report


# ---------------------------------------------------------------------------------------------
# command line


SCRIPT = """
import sys
import torch
print("script args:", sys.argv[1:])
x = torch.zeros(3)
y = x / x
if "--exit3" in sys.argv:
    sys.exit(3)
"""


def test_cli_sanitize_script(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the caller's directory
    # the piped layout (200 columns): pytest-xdist workers set COLUMNS=80, which the CLI obeys
    monkeypatch.delenv("COLUMNS", raising=False)
    script = tmp_path / "tiny.py"
    script.write_text(SCRIPT)
    out = tmp_path / "rep"
    rc = cli.main(
        ["sanitize", str(script), "--fail-on", "nan,overflow", "--out", str(out), "--lr", "3"]
    )
    assert rc == 1
    printed = capsys.readouterr().out
    assert "script args: ['--lr', '3']" in printed
    assert "aten.div.Tensor" in printed and "tiny.py:6" in printed
    doc = json.loads((out / "report.json").read_text())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert [(f["kind"], f["location"]) for f in doc["findings"]] == [("nan", "tiny.py:6")]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    # not failing on kinds that are absent; options before the script; -- passes verbatim
    rc = cli.main(
        ["sanitize", "--fail-on", "overflow", "--out", str(out), str(script), "--", "--out", "x"]
    )
    assert rc == 0
    assert "script args: ['--out', 'x']" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["config"]["shadow_memory_mib"] == 64
    assert cli.main(["sanitize", "--shadow-memory", "0", "--out", str(out), str(script)]) == 0
    assert json.loads((out / "report.json").read_text())["config"]["shadow_memory_mib"] == 0
    # the script's own exit status wins
    assert cli.main(["sanitize", "--out", str(out), str(script), "--exit3"]) == 3
    # bad kind: usage error, before running anything
    assert cli.main(["sanitize", "--fail-on", "nans", str(script)]) == 2
    assert "precision_loss" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the shadow table


def test_shadow_store_views_and_compression() -> None:
    from mixprec.sanitizer.store import ShadowStore

    store = ShadowStore(torch.float64, compress_after=2, sweep_every=1)
    real = torch.randn(6, 4)
    shadow = real.double() + torch.randn(6, 4, dtype=torch.float64) * 1e-9
    store.put(real, shadow.clone(), 0.5, float(shadow.abs().max()))  # the store owns it
    # any view of the storage finds its part of the shadow, also a fresh Python object
    view = real.t()[1:3]
    got, err = store.get(view)
    assert err == 0.5 and torch.equal(got, shadow.t()[1:3])
    alias = torch.empty(0).set_(real.untyped_storage(), 0, (24,), (1,))
    assert torch.equal(store.get(alias)[0], shadow.reshape(-1))
    assert store.get(real.double()) is None and store.get(torch.randn(3)) is None
    del got  # a shadow view in use pins the float64 copy
    # after compress_after insertions the float64 copy becomes a float32 residual
    keep = [torch.randn(2) for _ in range(3)]
    for k in keep:
        store.put(k, k.double(), 0.0, 1.0)
    assert store.compressed >= 1
    rebuilt = store.get(real)[0]
    assert store.rebuilt == 1
    # residual = shadow - real held in float32: relative error 2^-24 of the residual
    resid = (shadow - real.double()).abs()
    assert bool(((rebuilt - shadow).abs() <= resid * 2.0**-24).all())
    # an in-place update of a view writes into the flat shadow
    store.put(real[0], torch.full((4,), 7.0, dtype=torch.float64), 0.0)
    assert torch.equal(store.get(real)[0][0], torch.full((4,), 7.0, dtype=torch.float64))
    store.invalidate(view)
    assert store.get(real) is None


@pytest.mark.parametrize("budget", [0, None])
def test_long_lived_shadows_still_catch_cancellation(budget: float | None) -> None:
    """Compressed (budget 0 MiB) or kept in float64 (no budget), an old shadow still holds the
    error a late cancellation exposes."""
    x = torch.full((256,), 3.0) + torch.linspace(0, 1e-3, 256)
    with sanitize(shadow_memory_mib=budget) as report:
        a = x * 1.1  # its shadow lives through the next few dozen ops
        noise = torch.ones(8)
        for _ in range(60):
            noise = noise * 1.0 + 0.0
        a - x * 1.1000001  # <late>
        store = mixprec.sanitizer.mode.active_engine().shadows.store
        assert (store.compressed > 0) == (budget == 0)
    assert report.config["shadow_memory_mib"] == budget
    eng_stats = report.stats
    assert eng_stats["internal_errors"] == {}
    f = only(report.findings, kind="cancellation")
    assert len(f) == 1 and f[0].location == line_of("late")


def test_emulated_autocast_roundings_are_seen_and_observer_removed() -> None:
    """Emulated formats round with mixprec.quantize's C kernel, invisible to aten dispatch:
    quantize reports each rounding to the active sanitizer, which flags the fp8 underflow."""
    from mixprec.quantization import observers

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(8, 16) * 1e-4  # below e4m3's smallest subnormal (2^-9): flushes to zero
    with mixprec.sanitize() as report:
        with mixprec.autocast("e4m3", emulate=True, fp8_recipe=None):  # raw rounding
            m(x).sum().backward()  # <emulated-autocast>
        assert list(observers._OBSERVERS.values())  # registered while active
    assert list(observers._OBSERVERS.values()) == []
    hits = [f for f in report.findings if f.op == "mixprec.quantize"]
    assert hits and hits[0].kind == "underflow" and hits[0].module == "0"
    # the user's line, not a frame inside mixprec (quantize's notification)
    assert hits[0].location == line_of("emulated-autocast")
