"""torch.compile of emulated regions: one graph, no graph breaks, no recompiles, eager's losses.

Oracle: the same model run eagerly in the same region. Compiles are slow (~10-40 s each on a
small CPU), so the tests are few and each covers several op kinds: low ops (linear), follow
ops that round (gelu, add), exact ops on multi-output results (split), fp32 ops (softmax).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

import mixprec
from mixprec import autocast
from mixprec.precision import current_policy

dynamo = pytest.importorskip("torch._dynamo")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 48)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.fc1(x).split(16, dim=-1)  # multi-output op: tags on views
        h = F.gelu(a) * torch.softmax(b, dim=-1) + c
        return self.fc2(h)


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), x)


def _dynamo_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "dynamo" in str(w.message).lower()]


def _eager(fmt: str) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(8, 16)
    with autocast(fmt, emulate=True):
        loss = _loss(model, x)
    loss.backward()
    return float(loss.detach()), model.fc1.weight.grad


@pytest.mark.parametrize("where", ["outside", "inside", "decorator"])
def test_compiled_region_is_one_graph_with_eager_losses(where: str) -> None:
    def inside(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast("bf16", emulate=True):
            return _loss(model, x)

    dynamo.reset()
    dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(8, 16)
    fn = {"outside": _loss, "inside": inside, "decorator": autocast("bf16", emulate=True)(_loss)}
    step = torch.compile(fn[where], fullgraph=True)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # fresh region entries: the graph is reused, not recompiled
            model.zero_grad()
            if where == "outside":
                with autocast("bf16", emulate=True):
                    loss = step(model, x)
            else:
                loss = step(model, x)
            loss.backward()
            losses.append(float(loss.detach()))
    want_loss, want_grad = _eager("bf16")
    assert losses == [losses[0]] * 3
    # the fp32 ops (mse_loss, softmax) are fused and reordered by inductor: last bits differ
    assert losses[0] == pytest.approx(want_loss, rel=1e-5)
    torch.testing.assert_close(model.fc1.weight.grad, want_grad, rtol=1e-3, atol=1e-6)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not dynamo.utils.counters["graph_break"]
    assert _dynamo_warnings(caught) == []
    assert _get_current_function_mode_stack() == [] and current_policy() is None


def test_native_region_around_a_compiled_function_runs_it_eagerly() -> None:
    """Native regions stay opaque to torch.compile (docs/autocast.md, Limits): a compiled
    function called inside one breaks its graph at every op the region handles and gives
    eager's result under the same region, call after call."""
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(8, 16)
    with autocast("bf16", emulate=False):
        want = float(_loss(model, x).detach())
    assert want != float(_loss(model, x).detach())  # bf16 shows: fp32 would be told apart
    dynamo.reset()
    dynamo.utils.counters.clear()
    step = torch.compile(_loss)
    with autocast("bf16", emulate=False):
        got = [float(step(model, x).detach()) for _ in range(2)]
    assert got == [want, want]
    assert dynamo.utils.counters["graph_break"]  # opaque: not traced into a graph
    assert _get_current_function_mode_stack() == [] and current_policy() is None


def test_decorated_functions_compile_each_with_its_own_cache() -> None:
    """Dynamo keeps compiled entries per code object. Each decorated function gets a wrapper
    code of its own: with one shared wrapper the ninth function compiled with fullgraph=True
    failed hard on dynamo's recompile limit (8)."""
    dynamo.reset()
    torch.manual_seed(0)
    lin, x = nn.Linear(8, 8), torch.randn(4, 8)

    def make(i: int):  # type: ignore[no-untyped-def]
        def f(x: torch.Tensor) -> torch.Tensor:
            return (lin(x) * (i + 1)).sum()

        return autocast("bf16", emulate=True)(f)

    n = dynamo.config.recompile_limit + 2
    eager = [float(make(i)(x).detach()) for i in range(n)]
    step = [torch.compile(make(i), fullgraph=True, backend="eager") for i in range(n)]
    compiled = [float(s(x).detach()) for s in step]
    assert compiled == eager
    assert make(0).__code__ is not make(1).__code__
    assert make(0).__name__ == "f"  # functools.wraps still names it after the function


def test_compiled_fp8_and_mx_regions_stay_close_to_eager() -> None:
    for fmt in ("e4m3", "mxfp8_e4m3"):
        dynamo.reset()
        torch.manual_seed(0)
        model, x = Tiny(), torch.randn(8, 16)
        step = torch.compile(_loss, fullgraph=True)
        with autocast(fmt, emulate=True):
            loss = step(model, x)
        want, _ = _eager(fmt)
        # inductor may fuse the scale arithmetic of fp8 recipes (x / s as x * (1 / s)): an
        # element can then round to its neighbour, so compiled fp8 losses are close, not equal
        assert abs(float(loss.detach()) - want) <= 1e-3 * abs(want)


def _compiled_step(fmt: str) -> tuple[torch.Tensor, nn.Module, list[str]]:
    """One training step of Tiny in a ``fmt`` region entered around a compiled loss function:
    the loss, the model (its gradients set) and inductor's code (forward, backward)."""
    from torch._inductor.utils import run_and_get_code

    def step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast(fmt, emulate=True):
            loss = compiled(model, x)
        loss.backward()
        return loss

    dynamo.reset()
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(8, 16)
    compiled = torch.compile(_loss, fullgraph=True)
    loss, code = run_and_get_code(step, model, x)
    return loss, model, code


def _assert_eager(fmt: str, loss: torch.Tensor, model: nn.Module) -> None:
    """Eager's loss and first-layer gradient, to float32 summation-order noise."""
    want, grad = _eager(fmt)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(model.fc1.weight.grad, grad, rtol=1e-5, atol=1e-7)


def test_compiled_fp8_region_scales_large_operands_by_the_kernel(monkeypatch) -> None:
    """With every operand counted as large, each fp8 operand of the compiled step is one
    ``mixprec::current_scaled_round`` call (the eager C kernel), forward and backward, and the
    loss and gradients are eager's to float32 summation-order noise."""
    from mixprec.quantization import elementwise, has_c_kernel

    if not has_c_kernel():
        pytest.skip("no C kernel: the traced ops round every operand")
    monkeypatch.setattr(elementwise, "EXTERN_MIN", 1)
    loss, model, (forward, backward) = _compiled_step("e4m3")
    _assert_eager("e4m3", loss, model)
    assert forward.count("torch.ops.mixprec.current_scaled_round.default(") == 4  # x, h, W1, W2
    # the gradient of each linear's output, once for both of its gradient GEMMs
    assert backward.count("torch.ops.mixprec.current_scaled_round.default(") == 2


def test_compiled_mx_region_over_ragged_reduction_axes_is_eager() -> None:
    """Reduction lengths 48 and 40 (a whole block and a short one): the traced MX rounding
    once gave a NaN loss under inductor (it read past the data of a zero-padded block)."""
    dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 8))
    x = torch.randn(16, 48)

    def loss(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return m(t).square().mean()

    with autocast("mxfp8_e4m3", emulate=True):
        want = float(loss(model, x))
    step = torch.compile(autocast("mxfp8_e4m3", emulate=True)(loss), fullgraph=True)
    got = float(step(model, x))
    assert abs(got - want) <= 1e-6 * abs(want)


@pytest.mark.parametrize("keep_casts", [False, True], ids=["default", "emulate_precision_casts"])
def test_bf16_region_compiles_to_fused_roundings(keep_casts: bool) -> None:
    """Under inductor, a bf16 region's roundings fuse into the generated kernels (no
    mixprec::round call is left), whatever ``emulate_precision_casts`` says, and the
    compiled step gives eager's loss and gradients."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(emulate_precision_casts=keep_casts, force_disable_caches=True):
        loss, model, code = _compiled_step("bf16")
    _assert_eager("bf16", loss, model)
    assert len(code) == 2  # forward and backward kernels
    assert "torch.ops.mixprec.round.default(" not in "\n".join(code)


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.gelu(self.conv(x)).mean(1))


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stacked", [False, True], ids=["alone", "under-another-mode"])
def test_generated_code_calls_pass_through_user_calls_are_emulated(
    monkeypatch: pytest.MonkeyPatch, stacked: bool
) -> None:
    """The region's mode is still active while the compiled graph runs. Inductor's extern
    kernels, called by its generated code, pass through: GEMMs writing into buffers with
    ``out=`` (``extern_kernels.addmm(..., out=buf)``) and the convolution, which returns its
    result (``extern_kernels.convolution(...)``; it used to be emulated a second time), also
    when another function mode above the region's calls them again. The user's own calls,
    ``out=`` ones included, are emulated."""
    from mixprec.precision.emulated import EmulatedExecutor

    handled: list[str] = []
    original = EmulatedExecutor.handle

    def spy(self, func, name, args, kwargs):  # type: ignore[no-untyped-def]
        if not torch.compiler.is_compiling():  # dynamo would replay a traced append
            handled.append(name)
        return original(self, func, name, args, kwargs)

    def loss_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).square().mean()

    monkeypatch.setattr(EmulatedExecutor, "handle", spy)
    dynamo.reset()
    torch.manual_seed(0)
    model, x = TinyConv(), torch.randn(2, 3, 4, 16)
    compiled = torch.compile(loss_fn, fullgraph=True)
    with autocast("bf16", emulate=True), _PassThrough() if stacked else contextlib.nullcontext():
        compiled(model, x)  # compiles
        handled.clear()
        compiled(model, x)  # the generated code: extern convolution, addmm with out=
        assert handled == []  # nor do the state setters of torch's runtime wrapper
        handled.clear()
        w = model.fc.weight.detach()
        buf = torch.empty(8, 16)
        torch.mm(x.reshape(24, 16)[:8], w.t(), out=buf)  # the user's own out= call
        y = F.conv2d(x, model.conv.weight.detach())  # and a call without out=
    assert {"mm", "conv2d"} <= set(handled)
    assert torch.equal(buf, mixprec.quantize(buf, "bf16"))  # emulated: bf16 results
    assert torch.equal(y, mixprec.quantize(y, "bf16"))


def test_calls_from_generated_code_through_torch_wrappers_pass_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inductor calls some extern kernels through Python wrappers of its own (``bias_addmm``
    calls ``torch.addmm``): a torch function whose callers are torch's code and then a file in
    inductor's cache directory passes through; the same wrapper called from user code is
    emulated. The generated module is simulated: code compiled under a file name in the cache
    directory (which is all the check reads)."""
    import os

    from torch._inductor.kernel.mm import bias_addmm
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from mixprec.precision.emulated import EmulatedExecutor

    handled: list[str] = []
    original = EmulatedExecutor.handle

    def spy(self, func, name, args, kwargs):  # type: ignore[no-untyped-def]
        handled.append(name)
        return original(self, func, name, args, kwargs)

    monkeypatch.setattr(EmulatedExecutor, "handle", spy)
    generated: dict = {"bias_addmm": bias_addmm}
    source = "def call(bias, a, b, out):\n    return bias_addmm(bias, a, b, out=out)\n"
    filename = os.path.join(cache_dir(), "zz", "czzgeneratedbyatest.py")
    exec(compile(source, filename, "exec"), generated)
    torch.manual_seed(0)
    bias, a, b = torch.randn(1, 8), torch.randn(4, 8), torch.randn(8, 8)
    out = torch.empty(4, 8)
    with autocast("bf16", emulate=True):
        generated["call"](bias, a, b, out)
        from_graph = list(handled)
        bias_addmm(bias, a, b, out=out)  # the user's call of the same wrapper
    assert "addmm" not in from_graph, from_graph
    assert "addmm" in handled
    torch.testing.assert_close(out, mixprec.quantize(out, "bf16"), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["apply_policy", "initialize"])
def test_compiled_module_with_hook_regions_leaves_no_mode_behind(how: str) -> None:
    """A custom module (not a torch.nn container) is compiled frame by frame: its pre-hook,
    forward and post-hook. The region the pre-hook enters must be left by the post-hook:
    before the fix one stale mode stayed on the stack per call and every call recompiled."""
    import mixprec

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = Tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if how == "apply_policy":
            mixprec.apply_policy(model, "bf16", emulate=True)
            return model, opt
        return mixprec.initialize(model, opt, opt_level="O1", compute="bfloat16", emulate=True)

    x = torch.randn(8, 16)
    model, _ = build()
    want = [float(_loss(model, x * (i + 1)).detach()) for i in range(3)]
    dynamo.reset()
    dynamo.utils.counters.clear()
    model, _ = build()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    got, graphs = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            got.append(float(F.mse_loss(compiled(x * (i + 1)), x * (i + 1)).detach()))
            assert _get_current_function_mode_stack() == [] and current_policy() is None
            graphs.append(dynamo.utils.counters["stats"]["unique_graphs"])
    assert got == want
    assert graphs == [graphs[0]] * 3  # compiled once, reused
    assert _dynamo_warnings(caught) == []


def test_compiling_the_loss_function_runs_hook_regions_inside_the_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``torch.compile(loss_fn)`` over a model whose policy hooks enter a region: the region is
    entered and left while dynamo traces, so the compiled graph runs with no function mode (the
    mode sees none of its calls), and the loss is eager's. ``torch.compile(model)`` leaves the
    region active while the forward graph runs (the mode sees its calls), as documented."""
    from mixprec.precision.region import _PolicyMode

    seen: list[str] = []
    original = _PolicyMode.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not torch.compiler.is_compiling():
            seen.append(getattr(func, "__name__", "?"))
        return original(self, func, types, args, kwargs)

    x = torch.randn(8, 16)
    torch.manual_seed(0)
    model = Tiny()
    mixprec.apply_policy(model, "bf16", emulate=True)
    want = float(_loss(model, x).detach())
    monkeypatch.setattr(_PolicyMode, "__torch_function__", spy)
    counts = {}
    for how in ("loss_fn", "model"):
        dynamo.reset()
        if how == "loss_fn":
            step = torch.compile(_loss, fullgraph=True)
            got = [float(step(model, x).detach()) for _ in range(2)]
            seen.clear()
            got.append(float(step(model, x).detach()))
        else:
            compiled = torch.compile(model, fullgraph=True)
            got = [float(_loss(compiled, x).detach()) for _ in range(2)]
            seen.clear()
            got.append(float(_loss(compiled, x).detach()))
        assert got == pytest.approx([want] * 3, rel=1e-5)
        counts[how] = len(seen)
    assert counts["loss_fn"] == 0
    assert counts["model"] > 0


@pytest.mark.parametrize("what", ["model", "loss_fn"])
def test_compiled_corpus_model_trains_under_initialize_like_eager(what: str) -> None:
    """``torch.compile(model)``, or of the loss function that calls it (the faster placement,
    docs/amp.md), after ``initialize`` (O2, emulated bf16, fp32 masters) on the corpus
    nanoGPT: training steps with scale_loss and optimizer steps compile once, leave no mode
    behind and give eager's losses (dynamo's own backend: no inductor reordering)."""
    import mixprec
    from mixprec.testing import corpus

    entry = corpus.get("nanogpt")

    def train(compiled: bool) -> list[float]:
        model, args, kwargs = entry.example(0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, opt = mixprec.initialize(
            model, opt, opt_level="O2", compute="bfloat16", emulate=True
        )
        fwd, loss_fn = model, entry.loss
        if compiled and what == "model":
            fwd = torch.compile(model, backend="eager")
        elif compiled:
            loss_fn = torch.compile(entry.loss, backend="eager")
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = loss_fn(fwd, args, kwargs)
            with mixprec.scale_loss(loss, opt) as scaled:
                scaled.backward()
            opt.step()
            losses.append(float(loss.detach()))
            assert _get_current_function_mode_stack() == []
        return losses

    dynamo.reset()
    dynamo.utils.counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train(compiled=True)
        graphs = dynamo.utils.counters["stats"]["unique_graphs"]
        if what == "model":
            assert train(compiled=True) == got  # a second model: the compiled frames are reused
            assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        else:  # one graph for the three steps (a second model would recompile once: dynamo
            assert graphs == 1  # guards on the ids of the model's hooks)
    assert got == train(compiled=False)
    assert not dynamo.utils.counters["graph_break"]
    assert _dynamo_warnings(caught) == []


def test_inductor_resnet18_gives_eager_bits_without_batch_statistics() -> None:
    """Under inductor, a compiled emulated bf16 step of the corpus ResNet-18 (convolutions as
    extern kernels, their roundings fused into inductor's kernels) gives eager's loss to the
    float32 rounding of its reductions (bit for bit on the machine this was written on) once
    BatchNorm uses its running statistics, and gradients within one bf16 ulp of each tensor's
    largest element (inductor sums the normalization gradients in its own order, so their last
    float32 bits differ, and a bf16 rounding downstream can flip). With batch statistics the
    loss drifts by ~1e-3 (one bf16 step where a last-bit difference meets a rounding boundary);
    benchmarks/results/autocast_drift.md measures that for torch.autocast as for mixprec."""
    from mixprec.testing import corpus

    entry = corpus.get("resnet18")

    def step(compiled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model, args, kwargs = entry.example(0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        fn = autocast("bf16", emulate=True)(entry.loss)
        loss = (torch.compile(fn, fullgraph=True) if compiled else fn)(model, args, kwargs)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    dynamo.reset()
    loss, grads = step(compiled=True)
    want, want_grads = step(compiled=False)
    assert float(loss) == pytest.approx(float(want), rel=1e-6, abs=0)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        bound = 2.0**-8 * float(want_grads[name].abs().max())
        assert float((g - want_grads[name]).abs().max()) <= bound, name
