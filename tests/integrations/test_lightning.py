"""``mixprec.integrations.lightning.MixprecPrecision`` in short CPU ``Trainer`` runs.

Each run is a few steps of a tiny regression model: fp32 masters with compute-representable
model weights (emulated), the op policy around ``training_step`` (also for submodules called
directly), skipped steps logged after an overflow, the loss scale and skip record saved in a
Lightning checkpoint and restored on resume, evaluation runs that give the weights back, and
manual optimization.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mixprec
from mixprec.amp import get_config, get_scaler, skipped_steps
from mixprec.integrations.lightning import MixprecPrecision

# a huge loss: its gradients (times the loss scale) overflow fp16, so the step is skipped
HUGE = 1e10


def fp16_plugin() -> MixprecPrecision:
    """O2 fp16, emulated, with a loss scale low enough that only HUGE losses overflow."""
    scaler = mixprec.DynamicLossScaler(init_scale=2.0**8)
    return MixprecPrecision(opt_level="O2", compute="float16", loss_scale=scaler, emulate=True)


@pytest.fixture(autouse=True)
def _quiet(one_thread: None) -> Iterator[None]:
    # Lightning's advice (num_workers, litlogger tips) is noise for 4-step CPU runs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="lightning_fabric")
        yield


class Regression(pl.LightningModule):
    """Linear-LayerNorm-GELU-Linear; ``huge_at``: batches whose loss is multiplied by HUGE."""

    def __init__(self, huge_at: tuple[int, ...] = (), fmt: str = "float16") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 1)
        )
        self.huge_at = huge_at
        self.fmt = fmt
        self.hidden: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.net[0](x)  # a submodule called directly: the step's region covers it
        self.hidden.append(h.detach())
        loss = F.mse_loss(self.net(x), y)
        return loss * HUGE if batch_idx in self.huge_at else loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))
        self.policy_in_validation = mixprec.current_policy()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def data(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g)),
                      batch_size=8)  # fmt: skip


def trainer(tmp_path: Path, plugin: MixprecPrecision, steps: int = 4, **kw: Any) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, plugins=[plugin],
        num_sanity_val_steps=0, **kw,
    )  # fmt: skip


class Watch(pl.Callback):
    """Records, after every training batch, what the optimizer and the model hold."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        opt = trainer.optimizers[0]
        lowered = [module.net[0].weight, module.net[3].weight, module.net[3].bias]
        fmt = self.fmt
        self.rows.append(
            {
                "masters": [m.dtype for m in mixprec.master_params(opt)],
                "model_is_optimized": any(p is lowered[0] for p in mixprec.master_params(opt)),
                "representable": all(torch.equal(mixprec.quantize(p, fmt), p) for p in lowered),
                "layernorm_exact_fp32": module.net[1].weight.dtype == torch.float32,
                "scale": get_scaler(opt).get_scale(),
                "skipped": skipped_steps(opt),
            }
        )  # fmt: skip


@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "float8_e4m3fn"])
def test_o2_trains_on_fp32_masters_with_representable_model_weights(
    tmp_path: Path, fmt: str
) -> None:
    module, watch = Regression(fmt=fmt), Watch(fmt)
    # loss scale 1: gradients scaled by 2^16 would overflow e4m3 (max 448) at every step
    plugin = MixprecPrecision(opt_level="O2", compute=fmt, loss_scale=1.0, emulate=True)
    before = module.net[0].weight.detach().clone()
    trainer(tmp_path, plugin, callbacks=[watch]).fit(module, data())
    assert len(watch.rows) == 4
    for row in watch.rows:
        assert row["masters"] and set(row["masters"]) == {torch.float32}
        assert not row["model_is_optimized"]  # the optimizer updates float32 masters
        assert row["representable"]
        assert row["layernorm_exact_fp32"]
    if mixprec.get_format(fmt).bits == 16:  # fp8 GEMMs write float32 (operand-only format)
        assert all(torch.equal(mixprec.quantize(h, fmt), h) for h in module.hidden)
    assert not torch.equal(module.net[0].weight, before)  # it trained


def test_overflow_skips_the_step_and_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module, watch = Regression(huge_at=(1,)), Watch("float16")
    plugin = fp16_plugin()
    t = trainer(tmp_path, plugin, callbacks=[watch])
    with caplog.at_level(logging.INFO, logger="mixprec.integrations.lightning"):
        t.fit(module, data())
    assert [r["skipped"] for r in watch.rows] == [0, 1, 1, 1]
    assert [r["scale"] for r in watch.rows] == [2.0**8, 2.0**7, 2.0**7, 2.0**7]
    assert t.callback_metrics["mixprec/skipped_steps"].item() == 1
    assert t.callback_metrics["mixprec/loss_scale"].item() == 2.0**7
    skips = [r for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skips) == 1 and "loss scale now 128" in skips[0].getMessage()


def test_checkpoint_saves_and_resume_restores_scale_skips_and_masters(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    every3 = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1)
    plugin = fp16_plugin()
    watch = Watch("float16")
    trainer(tmp_path, plugin, steps=3, enable_checkpointing=True, callbacks=[every3, watch]).fit(
        Regression(huge_at=(0, 1)), data()
    )
    (path,) = ckpt_dir.glob("*.ckpt")
    ckpt = torch.load(path, weights_only=False)
    saved = ckpt["MixprecPrecision"]
    assert (saved["opt_level"], saved["compute"], saved["emulate"]) == ("O2", "float16", True)
    assert saved["scaler"]["scale"] == watch.rows[-1]["scale"] == 2.0**6
    amp_state = ckpt["optimizer_states"][0]["mixprec_amp"]
    assert amp_state["skipped_steps"] == watch.rows[-1]["skipped"] == 2

    class AtStart(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
            opt = trainer.optimizers[0]
            self.scale, self.skipped = get_scaler(opt).get_scale(), skipped_steps(opt)
            self.masters = [m.detach().clone() for m in mixprec.master_params(opt)]

    at_start = AtStart()
    resumed = fp16_plugin()
    trainer(tmp_path, resumed, steps=5, callbacks=[at_start]).fit(
        Regression(), data(), ckpt_path=str(path)
    )
    assert (at_start.scale, at_start.skipped) == (2.0**6, 2)
    masters = amp_state["masters"]
    assert len(masters) == 4 and all(
        any(torch.equal(m, r) for r in at_start.masters) for m in masters
    )


def test_fit_ends_with_the_masters_in_a_plain_float32_model(tmp_path: Path) -> None:
    class AtEnd(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, module: Any) -> None:
            opt = trainer.optimizers[0]
            self.master = (
                next(m for m in mixprec.master_params(opt) if m.shape == module.net[0].weight.shape)
                .detach()
                .clone()
            )

    module, at_end = Regression(), AtEnd()
    plugin = MixprecPrecision(opt_level="O2", compute="bfloat16", emulate=True)
    trainer(tmp_path, plugin, callbacks=[at_end]).fit(module, data())
    with pytest.raises(RuntimeError, match=r"not set up by mixprec\.initialize"):
        get_config(module)
    assert torch.equal(module.net[0].weight, at_end.master)  # deinitialize put it back


def validate(tmp_path: Path, inference_mode: bool) -> None:
    module = Regression()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    plugin = MixprecPrecision(opt_level="O2", compute="e4m3", emulate=True)
    trainer(tmp_path, plugin, inference_mode=inference_mode).validate(module, data())
    policy = module.policy_in_validation
    assert policy is not None and policy.compute == "float8_e4m3fn"
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]), n


def test_validation_runs_in_compute_and_gives_the_weights_back(tmp_path: Path) -> None:
    validate(tmp_path, inference_mode=False)  # as the validation inside fit() runs


def test_validation_under_inference_mode(tmp_path: Path) -> None:
    validate(tmp_path, inference_mode=True)


class Manual(Regression):
    """Manual optimization: ``manual_backward`` and ``opt.step()`` in ``training_step``."""

    def __init__(self, huge_at: tuple[int, ...] = ()) -> None:
        super().__init__(huge_at)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        loss = F.mse_loss(self(x), y) * (HUGE if batch_idx in self.huge_at else 1.0)
        self.manual_backward(loss)
        opt.step()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_manual_optimization_scales_and_skips(tmp_path: Path) -> None:
    module, watch = Manual(huge_at=(2,)), Watch("float16")
    plugin = fp16_plugin()
    trainer(tmp_path, plugin, callbacks=[watch]).fit(module, data())
    assert [r["skipped"] for r in watch.rows] == [0, 0, 1, 1]
    assert all(r["representable"] for r in watch.rows)


def test_gradient_clipping_sees_unscaled_master_gradients(tmp_path: Path) -> None:
    class Norms(pl.Callback):
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer: pl.Trainer, module: Any, opt: Any) -> None:
            grads = [m.grad for m in mixprec.master_params(opt) if m.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))

    norms = Norms()
    plugin = fp16_plugin()
    trainer(tmp_path, plugin, callbacks=[norms], gradient_clip_val=1e-3).fit(Regression(), data())
    # the hook runs before clipping; the unscaled norms are O(1), far below the 256 scale
    assert len(norms.norms) == 4 and all(0 < n < 100 for n in norms.norms)


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="opt_level must be one of O0, O1, O2, O3, got 'o2'"):
        MixprecPrecision(opt_level="o2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown format 'bf61'"):
        MixprecPrecision(compute="bf61")
    with pytest.raises(TypeError, match="emulate must be None, True or False"):
        MixprecPrecision(emulate="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="log_metrics must be True or False"):
        MixprecPrecision(log_metrics=1)  # type: ignore[arg-type]
    # every other argument is checked by initialize's own validation, also at construction
    with pytest.raises(ValueError, match="loss_scale must be"):
        MixprecPrecision(opt_level="O2", loss_scale="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_divergence"):
        MixprecPrecision(on_divergence="explode")  # type: ignore[arg-type]


def test_importing_mixprec_does_not_import_lightning() -> None:
    code = (
        "import sys, mixprec, mixprec.integrations; "
        "assert 'pytorch_lightning' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    from mixprec import integrations  # the lazy export resolves to the plugin

    assert integrations.MixprecPrecision is MixprecPrecision


@pytest.mark.parametrize("level", ["O0", "O1", "O3"])
def test_other_opt_levels(tmp_path: Path, level: str) -> None:
    module, watch = Regression(), Watch("bfloat16")
    plugin = MixprecPrecision(opt_level=level, compute="bfloat16", emulate=True)
    trainer(tmp_path, plugin, steps=2, callbacks=[watch]).fit(module, data())
    assert len(watch.rows) == 2
    # no masters: the optimizer updates the model's own weights
    assert all(r["model_is_optimized"] for r in watch.rows)
    if level == "O3":  # weights (norms too) stored in bfloat16
        assert all(r["representable"] for r in watch.rows)
        assert all(torch.equal(mixprec.quantize(h, "bf16"), h) for h in module.hidden)
    elif level == "O1":  # float32 weights, operands rounded: bf16 linear outputs
        assert all(torch.equal(mixprec.quantize(h, "bf16"), h) for h in module.hidden)
    else:
        assert not all(torch.equal(mixprec.quantize(h, "bf16"), h) for h in module.hidden)


class SavesWeights(Regression):
    """Writes its parameters to ``out/w{rank}.pt`` when training ends (spawned ranks)."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out

    def on_train_end(self) -> None:
        w = torch.cat([p.detach().float().flatten() for p in self.parameters()])
        torch.save(w, Path(self.out) / f"w{self.global_rank}.pt")


def test_ddp_gradient_accumulation_keeps_the_ranks_equal(tmp_path: Path) -> None:
    # Lightning runs every micro-batch of accumulate_grad_batches but the last inside DDP's
    # no_sync(): the plugin passes delay_unscale there, so the last backward's all-reduce
    # covers the window (before, each micro-batch was unscaled on its own and the ranks
    # diverged)
    plugin = MixprecPrecision(opt_level="O2", compute="bfloat16", emulate=True)
    run = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3,
        accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, plugins=[plugin],
        num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    run.fit(SavesWeights(str(tmp_path)), data(64))
    w0, w1 = (torch.load(tmp_path / f"w{r}.pt") for r in (0, 1))
    assert torch.equal(w0, w1)
