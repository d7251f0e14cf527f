"""mixprec.amp: opt levels train, master-weight invariants, equality with torch's GradScaler
loop, gradient accumulation / clipping / several losses, checkpoints, errors, undo."""

from __future__ import annotations

import ast
import functools
import inspect
import io
import math
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import mixprec
from mixprec import amp
from mixprec.amp import DivergenceError, DynamicLossScaler, SkippedStep, StaticLossScaler
from mixprec.quantization import quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.LayerNorm(32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 1),
    )


def _data(n: int = 256, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, torch.sin(2 * x[:, :1] - x[:, 1:2])


def _setup(optim, lr, *, seed=0, **amp_kwargs):
    """A fresh _model(seed) and its optimizer ``optim(params, lr=lr)``, set up by
    mixprec.initialize(**amp_kwargs); returns (model, optimizer)."""
    model = _model(seed)
    return mixprec.initialize(model, optim(model.parameters(), lr=lr), **amp_kwargs)


def _train(model, opt, steps, x, y, *, inject=None, start=0):
    """Train with scale_loss; inject maps iteration -> value put into one gradient."""
    losses = []
    for it in range(start, start + steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x).float(), y)
        with mixprec.scale_loss(loss, opt) as scaled:
            scaled.backward()
            if inject and it in inject:
                model[0].weight.grad[0, 0] = inject[it]
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------- opt levels

LEVELS = [
    ("O0", "float16", None),
    ("O1", "float16", True),
    ("O1", "bfloat16", True),
    ("O2", "float16", True),
    ("O2", "bfloat16", True),
    ("O2", "bfloat16", False),  # native bf16 storage
    ("O2", "float16", False),  # native fp16 storage (torch.autocast fp16 on CPU: slow, works)
    ("O3", "bfloat16", True),
    ("O3", "bfloat16", False),
]


@pytest.mark.parametrize("level, fmt, emulate", LEVELS)
def test_each_opt_level_trains(level, fmt, emulate):
    x, y = _data()
    model, opt = _setup(torch.optim.Adam, 1e-2, opt_level=level, compute=fmt, emulate=emulate)
    losses = _train(model, opt, 40, x, y)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    cfg = amp.get_config(opt)
    assert cfg.opt_level == level
    w = model[0].weight.detach()
    if level in ("O2", "O3"):
        # model weights exactly representable in the compute format
        assert torch.equal(quantize(w.float(), fmt).to(w.dtype), w)
        assert w.dtype == (torch.float32 if emulate else getattr(torch, fmt))
    else:
        assert w.dtype == torch.float32
        assert not torch.equal(quantize(w, fmt), w)  # O0/O1 weights are not rounded


@pytest.mark.parametrize("emulate", [True, False])
def test_o2_master_weights(emulate):
    x, y = _data()
    sgd = functools.partial(torch.optim.SGD, momentum=0.9)
    model, opt = _setup(sgd, 0.05, opt_level="O2", compute="bf16", emulate=emulate)
    _train(model, opt, 10, x, y)
    masters = list(mixprec.master_params(opt))
    model_params = list(model.parameters())
    assert len(masters) == len(model_params)
    for name, p, m in zip(
        [n for n, _ in model.named_parameters()], model_params, masters, strict=True
    ):
        assert m.dtype == torch.float32
        if name.startswith("1."):  # LayerNorm: kept float32, updated in place, no master
            assert m is p and p.dtype == torch.float32
            continue
        assert m is not p
        # the model holds round(master) exactly
        expected = quantize(m.detach(), "bf16").to(p.dtype)
        assert torch.equal(p.detach(), expected)
        # the master carries more precision than the model
    assert any(
        not torch.equal(quantize(m.detach(), "bf16"), m.detach()) for m in masters if m.dim() == 2
    )
    assert model[0].weight.grad is None and masters[0].grad is not None  # grads live on masters


def test_o1_runs_the_op_policy():
    x, _ = _data(16)
    ref = _model()(x)
    model = _model()
    mixprec.initialize(model, None, opt_level="O1", compute="float16", emulate=True)
    out = model(x)
    assert out.dtype == torch.float32
    assert not torch.equal(out, ref)  # low-precision matmuls changed the result
    # ... by about fp16 precision, not more
    assert torch.allclose(out, ref, rtol=0, atol=2e-2)
    assert model[0].weight.dtype == torch.float32


def test_lists_of_models_and_optimizers():
    x, y = _data()
    gen, critic = _model(1), _model(2)
    og = torch.optim.Adam(gen.parameters(), lr=1e-2)
    oc = torch.optim.SGD(critic.parameters(), lr=0.05, momentum=0.9)
    models, opts = mixprec.initialize(
        [gen, critic], [og, oc], opt_level="O2", compute="fp16", emulate=True, num_losses=2
    )
    assert models == [gen, critic] and opts == [og, oc]
    first = None
    for _ in range(30):
        og.zero_grad()
        oc.zero_grad()
        loss_g = F.mse_loss(gen(x), y)
        loss_c = F.mse_loss(critic(x), y)
        with mixprec.scale_loss(loss_g, og, loss_id=0) as s:
            s.backward()
        with mixprec.scale_loss(loss_c, oc, loss_id=1) as s:
            s.backward()
        og.step()
        oc.step()
        first = first or (loss_g.item(), loss_c.item())
    assert loss_g.item() < 0.5 * first[0] and loss_c.item() < 0.5 * first[1]
    assert amp.get_scaler(og, 0) is amp.get_scaler(oc, 0)  # one scaler per loss, shared
    for m, o in ((gen, og), (critic, oc)):
        masters = list(mixprec.master_params(o))
        assert torch.equal(m[0].weight, quantize(masters[0].detach(), "fp16"))
    with pytest.raises(ValueError, match="one optimizer only"):
        shared = _model()
        mixprec.initialize(
            shared,
            [torch.optim.SGD(shared.parameters(), lr=0.1), torch.optim.SGD(shared[0].parameters())],
        )


def test_keep_fp32_modules_stay_float32():
    x, y = _data()
    model, opt = _setup(
        torch.optim.SGD,
        0.05,
        opt_level="O2",
        compute="e4m3",
        keep_fp32=lambda m, fqn: fqn in ("1", "3"),  # the LayerNorm and the last Linear
    )
    _train(model, opt, 5, x, y)
    masters = list(mixprec.master_params(opt))
    assert masters[4] is model[3].weight and masters[0] is not model[0].weight
    assert not torch.equal(quantize(model[3].weight.detach(), "e4m3"), model[3].weight.detach())
    assert torch.equal(quantize(model[0].weight.detach(), "e4m3"), model[0].weight.detach())
    # the kept Linear runs under a float32 policy: its output is the plain fp32 linear
    seen = {}
    hook = model[3].register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    model(x)
    hook.remove()
    assert torch.equal(seen["o"], F.linear(seen["i"], model[3].weight, model[3].bias))


def test_o3_has_no_masters_and_rounds_everything():
    x, y = _data()
    model, opt = _setup(torch.optim.Adam, 1e-2, opt_level="O3", compute="bf16", emulate=True)
    _train(model, opt, 5, x, y)
    assert all(m is p for m, p in zip(mixprec.master_params(opt), model.parameters(), strict=True))
    for p in model.parameters():  # norms too
        assert torch.equal(quantize(p.detach(), "bf16"), p.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            s = opt.state[p][key]
            assert torch.equal(quantize(s, "bf16"), s)


# ---------------------------------------------------------------------------- equality, torch


def test_o0_equals_torch_gradscaler_loop():
    """amp's unscale-on-exit path gives torch.amp.GradScaler's exact trajectory."""
    x, y = _data()
    inject = {2: math.inf, 3: math.nan, 9: math.inf}
    m_ref = _model()
    o_ref = torch.optim.Adam(m_ref.parameters(), lr=1e-2)
    gs = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    ref_losses, ref_scales = [], []
    for it in range(15):
        o_ref.zero_grad()
        loss = F.mse_loss(m_ref(x), y)
        gs.scale(loss).backward()
        if it in inject:
            m_ref[0].weight.grad[0, 0] = inject[it]
        gs.step(o_ref)
        gs.update()
        ref_losses.append(loss.item())
        ref_scales.append(gs.get_scale())

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = DynamicLossScaler(init_scale=2.0**12, growth_interval=3, max_scale=None)
    model, opt = mixprec.initialize(model, opt, opt_level="O0", loss_scale=scaler)
    losses, scales = [], []
    for it in range(15):
        losses += _train(model, opt, 1, x, y, inject=inject, start=it)
        scales.append(scaler.get_scale())
    assert losses == ref_losses
    assert scales == ref_scales
    for a, b in zip(m_ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert amp.skipped_steps(opt) == 3


def _plain_grads(model, batches, loss_weights=None):
    model.zero_grad()
    for i, (x, y) in enumerate(batches):
        w = 1.0 if loss_weights is None else loss_weights[i]
        (F.mse_loss(model(x), y) * w).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_equals_plain_fp32():
    x, y = _data(64)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    expected = _plain_grads(_model(), batches)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = mixprec.initialize(model, opt, opt_level="O0")
    opt.zero_grad()
    for xb, yb in batches:
        with mixprec.scale_loss(F.mse_loss(model(xb), yb), opt) as scaled:
            scaled.backward()
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.grad, e)


@pytest.mark.parametrize("level", ["O0", "O2"])
def test_delay_unscale_accumulation_equals_plain_fp32(level):
    # the window's gradients accumulate scaled in .grad (a power of two: exact) and are
    # unscaled once by the last block, for DDP's no_sync (tested in test_distributed.py)
    x, y = _data(96)
    batches = [(x[:32], y[:32]), (x[32:64], y[32:64]), (x[64:], y[64:])]
    expected = _plain_grads(_model(), batches)
    model, opt = _setup(torch.optim.SGD, 0.0, opt_level=level, compute="float32")
    opt.zero_grad()
    for i, (xb, yb) in enumerate(batches):
        delay = i < len(batches) - 1
        with mixprec.scale_loss(F.mse_loss(model(xb), yb), opt, delay_unscale=delay) as scaled:
            scaled.backward()
        if delay:
            scale = amp.get_scaler(opt).get_scale()
            first = model[0].weight.grad
            assert first is not None and scale > 1  # still scaled, still on the model
    grads = mixprec.master_params(opt) if level == "O2" else model.parameters()
    for g, e in zip((p.grad for p in grads), expected, strict=True):
        assert torch.equal(g, e)


def test_delay_unscale_overflow_is_found_by_the_last_block():
    x, y = _data(64)
    model, opt = _setup(torch.optim.SGD, 0.1, opt_level="O2", compute="fp16", emulate=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with mixprec.scale_loss(F.mse_loss(model(x), y), opt, delay_unscale=True) as scaled:
        scaled.backward()
        model[0].weight.grad[0, 0] = math.inf
    with pytest.raises(RuntimeError, match="without a"):
        opt.step()  # a delayed block alone is not a finished window
    with mixprec.scale_loss(F.mse_loss(model(x), y), opt) as scaled:
        scaled.backward()
    opt.step()
    assert amp.last_step_skipped(opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    loss = F.mse_loss(model(x), y)
    with (
        pytest.raises(TypeError, match="delay_unscale"),
        mixprec.scale_loss(loss, opt, delay_unscale="yes"),
    ):
        pass


def test_o2_accumulation_and_clipping_on_masters():
    """Masters accumulate unscaled float32 gradients; clipping them works like fp32 clipping."""
    x, y = _data(64)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    model, opt = _setup(torch.optim.SGD, 0.1, opt_level="O2", compute="float32", loss_scale=2.0**10)
    opt.zero_grad()
    for xb, yb in batches:
        with mixprec.scale_loss(F.mse_loss(model(xb), yb), opt) as scaled:
            scaled.backward()
    ref = _model()
    expected = _plain_grads(ref, batches)
    masters = list(mixprec.master_params(opt))
    for m, e in zip(masters, expected, strict=True):
        assert torch.equal(m.grad, e)
    norm = torch.nn.utils.clip_grad_norm_(masters, 0.01)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
    assert norm.item() == ref_norm.item()
    opt.step()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, r)


def test_two_losses_have_their_own_scalers():
    x, y = _data(32)
    expected = _plain_grads(_model(), [(x, y), (x, y)], loss_weights=[1.0, 0.5])
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scalers = [DynamicLossScaler(init_scale=2.0**8), DynamicLossScaler(init_scale=2.0**4)]
    model, opt = mixprec.initialize(model, opt, opt_level="O0", num_losses=2, loss_scale=scalers)
    opt.zero_grad()
    with mixprec.scale_loss(F.mse_loss(model(x), y), opt, loss_id=0) as s0:
        assert s0.item() == pytest.approx(F.mse_loss(model(x), y).item() * 256)
        s0.backward()
    with mixprec.scale_loss(F.mse_loss(model(x), y) * 0.5, opt, loss_id=1) as s1:
        s1.backward()
        model[3].bias.grad[0] = math.inf  # only loss 1 overflows
    assert scalers[0].get_scale() == 256.0 and scalers[1].get_scale() == 8.0
    assert amp.get_scaler(opt, 1) is scalers[1]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert amp.last_step_skipped(opt)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    # without the overflow the accumulated gradients equal the plain ones
    opt.zero_grad()
    with mixprec.scale_loss(F.mse_loss(model(x), y), opt, loss_id=0) as s0:
        s0.backward()
    with mixprec.scale_loss(F.mse_loss(model(x), y) * 0.5, opt, loss_id=1) as s1:
        s1.backward()
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.grad, e)


# ---------------------------------------------------------------------------- skip record


def test_skip_callback_and_lr_scheduler():
    x, y = _data()
    events: list[SkippedStep] = []
    model, opt = _setup(
        torch.optim.SGD,
        1.0,
        opt_level="O2",
        compute="float16",
        emulate=True,
        loss_scale=DynamicLossScaler(init_scale=2.0**8, on_skip=events.append),
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    inject = {1: math.inf, 4: math.nan}
    for it in range(6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # scheduler: first step skipped?
            _train(model, opt, 1, x, y, inject=inject, start=it)
            if not amp.last_step_skipped(opt):
                sched.step()
    assert [e.iteration for e in events] == [1, 4]
    assert [e.scale for e in events] == [256.0, 128.0]
    assert amp.skipped_steps(opt) == 2
    assert sched.last_epoch == 4  # 6 steps, 2 skipped
    assert opt.param_groups[0]["lr"] == 0.5**4


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("emulate, model_first", [(True, True), (True, False), (False, True)])
def test_checkpoint_resume_same_trajectory(emulate, model_first):
    x, y = _data()
    inject = {3: math.inf, 7: math.inf, 8: math.nan}

    def setup(seed=0):
        scaler = DynamicLossScaler(init_scale=2.0**10, growth_interval=2, hysteresis=2)
        return _setup(
            torch.optim.Adam,
            1e-2,
            seed=seed,
            opt_level="O2",
            compute="bf16",
            emulate=emulate,
            loss_scale=scaler,
        )

    model, opt = setup()
    full = _train(model, opt, 14, x, y, inject=inject)
    final = [p.detach().clone() for p in model.parameters()]
    final_masters = [p.detach().clone() for p in mixprec.master_params(opt)]

    model, opt = setup()
    first = _train(model, opt, 6, x, y, inject=inject)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    model2, opt2 = setup(seed=7)  # different init: everything must come from the checkpoint
    if model_first:
        model2.load_state_dict(ck["model"])
        opt2.load_state_dict(ck["opt"])
    else:
        opt2.load_state_dict(ck["opt"])
        model2.load_state_dict(ck["model"])
    assert amp.get_scaler(opt2).state_dict() == amp.get_scaler(opt).state_dict()
    second = _train(model2, opt2, 8, x, y, inject=inject, start=6)
    assert first + second == full
    for a, b in zip(final, model2.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(final_masters, mixprec.master_params(opt2), strict=True):
        assert torch.equal(a, b)


def test_loading_fp32_weights_into_o2_model_updates_masters():
    src = _model(seed=3)
    model, opt = _setup(torch.optim.SGD, 0.1, opt_level="O2", compute="fp16", emulate=True)
    model.load_state_dict(src.state_dict())
    masters = list(mixprec.master_params(opt))
    assert torch.equal(masters[0], src[0].weight)  # full precision kept in the master
    assert torch.equal(model[0].weight, quantize(src[0].weight.detach(), "fp16"))


# ---------------------------------------------------------------------------- divergence


def test_nan_loss_at_scale_one_is_a_divergence():
    x, y = _data(32)
    model, opt = _setup(torch.optim.SGD, 0.1, opt_level="O2", compute="fp16", loss_scale=1.0)
    assert isinstance(amp.get_scaler(opt), StaticLossScaler)
    x = x.clone()
    x[0, 0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    with (
        pytest.raises(DivergenceError, match=r"0\.weight \(master\)"),
        mixprec.scale_loss(F.mse_loss(model(x), y), opt) as scaled,
    ):
        scaled.backward()
    opt.step()  # skipped: the parameters stay intact
    assert amp.last_step_skipped(opt)
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p)


# ---------------------------------------------------------------------------- sparse gradients


class _Bag(torch.nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 8, sparse=sparse)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx).mean(1))


def _bag_run(sparse: bool, level: str, compute: str, emulate: bool, steps: int = 4):
    model = _Bag(sparse)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model, opt = mixprec.initialize(model, opt, opt_level=level, compute=compute, emulate=emulate)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        idx = torch.randperm(50, generator=g)[:12].view(4, 3)  # no repeated row in a batch
        y = torch.randn(4, 1, generator=g)
        opt.zero_grad()
        loss = F.mse_loss(model(idx).float(), y)
        with mixprec.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.emb.weight.detach().float(), opt


@pytest.mark.parametrize(
    ("level", "compute", "emulate"),
    [("O1", "fp16", True), ("O2", "fp16", True), ("O2", "bf16", False), ("O3", "bf16", True),
     ("O3", "bf16", False)],
)  # fmt: skip
def test_sparse_embedding_gradients_train_like_dense_ones(level, compute, emulate):
    # nn.Embedding(sparse=True): O2 used to fail on the sparse gradient (quantize refuses
    # sparse tensors; natively the overflow check had no sparse kernel). With no row repeated in
    # a batch, sparse and dense gradients hold the same values, so SGD takes the same steps
    losses, weight, opt = _bag_run(True, level, compute, emulate)
    want_losses, want_weight, _ = _bag_run(False, level, compute, emulate)
    assert losses == want_losses
    assert torch.equal(weight, want_weight)
    if level == "O2":
        master = next(p for p in mixprec.master_params(opt) if p.shape == (50, 8))
        assert master.dtype == torch.float32 and master.grad.is_sparse


def test_sparse_gradients_overflow_skips_the_step():
    model = _Bag(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model, opt = mixprec.initialize(model, opt, opt_level="O2", compute="fp16", emulate=True)
    before = model.emb.weight.detach().clone()
    loss = model(torch.tensor([[1, 2, 3]])).sum() * 1e3  # x 2^16: past fp16's range
    with mixprec.scale_loss(loss, opt) as scaled:
        scaled.backward()
    opt.step()
    assert amp.last_step_skipped(opt) and torch.equal(model.emb.weight, before)


def test_sparse_adam_trains_at_o2():
    model = _Bag(True)
    opts = [
        torch.optim.SparseAdam(list(model.emb.parameters()), lr=1e-2),
        torch.optim.Adam(model.head.parameters(), lr=1e-2),
    ]
    model, opts = mixprec.initialize(model, opts, opt_level="O2", compute="bf16", emulate=True)
    idx, y = torch.randint(0, 50, (4, 3)), torch.randn(4, 1)
    losses = []
    for _ in range(5):
        for o in opts:
            o.zero_grad()
        loss = F.mse_loss(model(idx), y)
        with mixprec.scale_loss(loss, opts) as scaled:
            scaled.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    w = model.emb.weight.detach()
    assert torch.equal(quantize(w, "bf16"), w)  # the model holds the rounded masters


# ---------------------------------------------------------------------------- errors, undo


def test_errors():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the letter O"):
        mixprec.initialize(model, opt, opt_level="01")
    with pytest.raises(ValueError, match="loss_scale"):
        mixprec.initialize(model, opt, loss_scale="huge")
    with pytest.raises(ValueError, match="unknown format 'fp17'; did you mean 'fp16'"):
        mixprec.initialize(model, opt, compute="fp17")
    with pytest.raises(TypeError, match="LBFGS"):
        mixprec.initialize(model, torch.optim.LBFGS(model.parameters()))
    with pytest.raises(TypeError, match="GradScaler"):
        mixprec.initialize(model, opt, loss_scale=torch.amp.GradScaler("cpu"))
    bad = _model()
    bad.register_parameter("count", torch.nn.Parameter(torch.zeros(2, dtype=torch.long), False))
    with pytest.raises(TypeError, match=r"'count' has dtype torch\.int64"):
        mixprec.initialize(bad, torch.optim.SGD(bad[0].parameters(), lr=0.1))
    with pytest.raises(TypeError, match="float32 model"):
        mixprec.initialize(_model().double(), None, opt_level="O2")
    with (
        pytest.raises(RuntimeError, match=r"not set up by mixprec\.initialize"),
        mixprec.scale_loss(torch.tensor(1.0, requires_grad=True), opt),
    ):
        pass
    # nothing was left behind by the failed calls
    assert "step" not in vars(opt) and not hasattr(model, "_mixprec_amp")

    model, opt = mixprec.initialize(model, opt, opt_level="O2", compute="fp16")
    with pytest.raises(RuntimeError, match="already set up"):
        mixprec.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="already set up"):
        mixprec.initialize(_model(), opt)
    x, y = _data(8)
    with (
        pytest.raises(ValueError, match="loss_id"),
        mixprec.scale_loss(F.mse_loss(model(x), y), opt, loss_id=1),
    ):
        pass
    with mixprec.scale_loss(F.mse_loss(model(x), y), opt) as scaled:
        scaled.backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: 0.0)
    opt.step()
    with pytest.raises(RuntimeError, match="step called twice"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(loss_scale=-1.0), ValueError, r"loss_scale must be 'dynamic', 'none'/None, a fini"),
        (dict(loss_scale=math.inf), ValueError, r"a finite number > 0.*got the number inf"),
        (dict(loss_scale=object()), ValueError, r"a list of num_losses of them; got <object"),
        (dict(loss_scale=[DynamicLossScaler()], num_losses=2), ValueError, "num_losses=2"),
        (dict(loss_scale=DynamicLossScaler(), on_skip=print), ValueError, "on the instances"),
        (dict(on_divergence="explode"), ValueError, r"'raise', 'warn', 'ignore', got 'explode'"),
        (dict(num_losses=0), ValueError, "num_losses must be an int >= 1"),
        (dict(emulate="yes"), TypeError, "emulate must be None, True or False"),
        (dict(keep_fp32=3), TypeError, "keep_fp32 must be callable"),
        (dict(opt_level="O4"), ValueError, "opt_level must be one of O0, O1, O2, O3"),
    ],
)
def test_bad_options_name_the_valid_choices(kwargs, exc, match):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(exc, match=match):
        mixprec.initialize(model, opt, **kwargs)
    assert "step" not in vars(opt) and not hasattr(model, "_mixprec_amp")


def test_amp_uses_only_the_scalers_public_names():
    """The seam between amp and the scalers: no private scaler name outside scaling.py."""
    amp_dir = pathlib.Path(amp.__file__).parent
    for path in sorted(amp_dir.glob("*.py")):
        if path.name == "scaling.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mixprec.amp.scaling":
                assert all(not a.name.startswith("_") for a in node.names), path.name
            scaler_attr = (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("scaler", "s")
            )
            assert not (scaler_attr and node.attr.startswith("_")), f"{path.name}:{node.lineno}"


def test_scale_loss_warnings_point_at_the_with():
    model, opt = _setup(
        torch.optim.SGD,
        0.0,
        opt_level="O0",
        loss_scale=DynamicLossScaler(init_scale=4.0, min_scale=2.0),
    )
    x, y = _data(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            line = inspect.currentframe().f_lineno + 1
            with mixprec.scale_loss(F.mse_loss(model(x), y), opt) as scaled:
                scaled.backward()
                model[0].weight.grad[0, 0] = math.inf
            opt.step()
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


def test_optimizer_listed_twice_is_unscaled_once():
    x, y = _data(32)
    expected = _plain_grads(_model(), [(x, y)])
    model, opt = _setup(torch.optim.SGD, 0.0, opt_level="O0", loss_scale=2.0**8)
    with mixprec.scale_loss(F.mse_loss(model(x), y), [opt, opt]) as scaled:
        scaled.backward()
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.grad, e)


def test_existing_optimizer_state_moves_to_masters():
    x, y = _data()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    F.mse_loss(model(x), y).backward()
    opt.step()  # plain fp32 step: Adam state exists now
    exp_avg = opt.state[model[0].weight]["exp_avg"].clone()
    model, opt = mixprec.initialize(model, opt, opt_level="O2", compute="fp16", emulate=True)
    master = next(mixprec.master_params(opt))
    assert master is not model[0].weight
    assert torch.equal(opt.state[master]["exp_avg"], exp_avg)
    assert model[0].weight not in opt.state
    losses = _train(model, opt, 3, x, y)
    assert int(opt.state[master]["step"]) == 4 and all(math.isfinite(v) for v in losses)


def test_deinitialize_restores_and_allows_initialize_again():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = list(model.parameters())
    model, opt = mixprec.initialize(model, opt, opt_level="O2", compute="bf16", emulate=False)
    _train(model, opt, 3, x, y)
    masters = [m.detach().clone() for m in mixprec.master_params(opt)]
    amp.deinitialize(model)
    assert "step" not in vars(opt) and not hasattr(opt, "_mixprec_amp")
    assert list(mixprec.master_params(opt)) == params  # the model's own parameters again
    for p, m in zip(model.parameters(), masters, strict=True):
        assert p.dtype == torch.float32 and torch.equal(p.detach(), m)
        assert "momentum_buffer" in opt.state[p]  # optimizer state carried over
    model, opt = mixprec.initialize(model, opt, opt_level="O1", compute="fp16", emulate=True)
    losses = _train(model, opt, 3, x, y)
    assert all(math.isfinite(v) for v in losses)


def test_mx_compute_at_o1_runs_mx_operands() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(8, 64)
    ref = model(x).detach()
    model, opt = mixprec.initialize(model, opt, opt_level="O1", compute="mxfp8")
    cfg = mixprec.amp.get_config(model)
    assert cfg.policy_compute == "mxfp8_e4m3" and cfg.compute.name == "float8_e4m3fn"
    assert "compute='mxfp8_e4m3'" in repr(cfg)
    with mixprec.autocast("mxfp8", emulate=True, fp8_recipe=None):
        expected = model[2](model[1](model[0](x)))  # the same MX policy applied by hand
    out = model(x)
    assert torch.equal(out, expected) and not torch.equal(out, ref)
    loss = out.square().mean()
    with mixprec.scale_loss(loss, opt) as scaled:
        scaled.backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("level", ["O2", "O3"])
def test_mx_compute_needs_o1(level: str) -> None:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"block-scaled MX format.*opt_level='O1'.*float8_e4m3fn"):
        mixprec.initialize(model, opt, opt_level=level, compute="mxfp8")


@pytest.mark.parametrize(
    ("compute", "scale"),
    [
        ("float16", 2.0**16),  # torch's and apex's default: a unit gradient at fp16's max
        ("bfloat16", 2.0**16),
        ("float8_e5m2", 2.0**16),
        ("float8_e4m3fn", 2.0**9),  # largest 448
        ("float6_e3m2fn", 2.0**5),  # largest 28
        ("float4_e2m1fn", 2.0**3),  # largest 6
    ],
)
def test_the_dynamic_scale_starts_where_a_unit_gradient_fits_the_format(
    compute: str, scale: float
) -> None:
    _, opt = _setup(torch.optim.SGD, 0.1, opt_level="O2", compute=compute, emulate=True)
    assert amp.get_scaler(opt, 0).get_scale() == scale


def test_o2_in_e4m3_takes_its_first_steps() -> None:
    """From 2^16, O2 in e4m3 (gradients stored in e4m3, largest 448) skipped its first steps,
    halving the scale each time; from 2^9 the first step is taken."""
    skipped: list[SkippedStep] = []
    model, opt = _setup(
        torch.optim.SGD, 0.1, opt_level="O2", compute="float8_e4m3fn", emulate=True,
        on_skip=skipped.append,
    )  # fmt: skip
    x, y = _data()
    for _ in range(3):
        loss = F.mse_loss(model(x), y)
        with mixprec.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
    assert skipped == []


def test_loss_scale_bounds_given_explicitly_hold_the_default_start() -> None:
    _, opt = _setup(torch.optim.SGD, 0.1, opt_level="O2", compute="float16", max_loss_scale=2.0**10)
    assert amp.get_scaler(opt, 0).get_scale() == 2.0**10
    _, opt = _setup(
        torch.optim.SGD, 0.1, opt_level="O2", compute="float8_e4m3fn", emulate=True,
        min_loss_scale=2.0**12,
    )  # fmt: skip
    assert amp.get_scaler(opt, 0).get_scale() == 2.0**12
