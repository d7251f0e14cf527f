"""Tests of ``mixprec demo``: the tiny end-to-end run (files, schema, finite numbers), the
recipes' mechanics (through mixprec's public API) and the gradient probe against hand-computed
oracles, determinism and input validation."""

from __future__ import annotations

import copy
import io
import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import mixprec
from mixprec import cli
from mixprec.demo import (
    RECIPES,
    DemoConfig,
    RecipeTrainer,
    Task,
    resolve_recipes,
    resolve_tasks,
    run_demo,
    train_run,
    validate_report,
)
from mixprec.demo import data as demo_data
from mixprec.demo.data import VOCAB, encode_text, load_digits, load_text, read_digits
from mixprec.demo.models import MatMul
from mixprec.demo.probes import GradientProbe, probe_gradients
from mixprec.demo.progress import PlainLines

EXPECTED_RECIPES = ["fp32", "fp16-O2", "fp16-O3", "fp16-noscale", "bf16-O2", "fp8-hybrid"]
FILES = ("report.md", "report.json", "curves.png", "grad_hist.png")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR chunk
    return width, height


def _numbers(obj: object, path: str = "$"):
    """Every number in a JSON document, with its path."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, int | float):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """One tiny demo through the CLI (both tasks, all default recipes)."""
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    console = Console(file=buf, width=160, force_terminal=False)
    doc = run_demo(DemoConfig.tiny(), out, console=console)
    return out, doc, buf.getvalue()


def test_tiny_demo_writes_every_file(tiny_report: tuple[Path, dict, str]) -> None:
    out, _, _ = tiny_report
    for name in FILES:
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    for png in ("curves.png", "grad_hist.png"):
        w, h = _png_size(out / png)
        assert w >= 400 and h >= 300, (png, w, h)


def test_tiny_demo_json_validates_and_is_complete(tiny_report: tuple[Path, dict, str]) -> None:
    out, doc, _ = tiny_report

    def no_nan(token: str) -> float:
        raise AssertionError(f"report.json contains {token}")

    on_disk = json.loads((out / "report.json").read_text(), parse_constant=no_nan)
    assert on_disk == json.loads(json.dumps(doc))
    validate_report(on_disk)
    assert on_disk["schema_version"] == 1
    env = on_disk["environment"]
    assert env["torch"] == torch.__version__
    assert env["torch_threads"] == 1
    assert [t["name"] for t in on_disk["tasks"]] == ["digits", "text"]
    for task in on_disk["tasks"]:
        runs = {r["recipe"]["id"]: r for r in task["runs"]}
        assert list(runs) == EXPECTED_RECIPES
        base = runs["fp32"]["val_metric"]
        for rid, run in runs.items():
            for key in ("final_train_loss", "val_metric", "delta_vs_fp32", "wall_time_s",
                        "act_grads_flushed", "weight_grads_flushed", "updates_lost",
                        "final_loss_scale", "steps_skipped"):  # fmt: skip
                value = run[key]
                assert isinstance(value, int | float) and math.isfinite(value), (rid, key, value)
            assert run["delta_vs_fp32"] == pytest.approx(run["val_metric"] - base, abs=1e-12)
            assert not run["diverged"]
            assert len(run["curves"]["train_loss"]["value"]) == run["steps"]
        assert len(task["findings"]) == 5
        assert task["summary"]
        # the master-weight-free run stores weights in fp16: it loses far more updates than fp32
        # (which loses only those below fp32's spacing, 2^-23 of the weight)
        assert runs["fp16-O3"]["updates_lost"] > max(0.01, 10 * runs["fp32"]["updates_lost"])
        assert runs["fp32"]["act_grads_flushed"] == 0
        assert "grad_histogram" in runs["fp32"]
        # each run names the public call it went through, arguments included
        scaler = "DynamicLossScaler(growth_interval=2000)"
        for rid, level in (("fp16-O2", "O2"), ("fp16-O3", "O3")):
            assert runs[rid]["backend"] == (
                f"mixprec.initialize(opt_level='{level}', compute='float16', "
                f"loss_scale={scaler}, emulate=True) + mixprec.scale_loss"
            )
        assert runs["fp16-noscale"]["backend"].startswith(
            "mixprec.initialize(opt_level='O2', compute='float16', loss_scale='none'"
        )
        assert runs["fp8-hybrid"]["backend"].startswith("mixprec.autocast")
        assert runs["fp32"]["backend"] == "torch (float32)"
    for path, value in _numbers(on_disk):
        assert math.isfinite(value), path


def test_tiny_demo_markdown_and_terminal(tiny_report: tuple[Path, dict, str]) -> None:
    out, doc, printed = tiny_report
    md = (out / "report.md").read_text()
    for rid in EXPECTED_RECIPES:
        assert f"| {rid} |" in md
    assert "![training curves](curves.png)" in md
    assert "**Reading the table.**" in md
    for task in doc["tasks"]:
        assert task["summary"] in md
    assert "fp16-noscale" in printed and "report written to" in printed
    assert "digits · fp8-hybrid" in printed  # one progress bar per run
    assert md.count("parameters), sgd (momentum 0.9) lr ") == 2  # the tiny preset's SGD


def test_presets_train_text_with_plain_sgd_at_small_steps() -> None:
    """The text task's quick and default presets: SGD without momentum at lr 0.025 decaying to
    1% (the steps at which updates below half an fp16 spacing show), the report says so."""
    from mixprec.demo.report import _optimizer

    for preset in ("quick", "default"):
        (text,) = DemoConfig.preset_config(preset, tasks="text").tasks
        assert (text.optimizer, text.momentum, text.lr) == ("sgd", 0.0, 0.025)
        assert text.final_lr_fraction == 0.01
    assert _optimizer({"optimizer": "sgd", "momentum": 0.0}) == "sgd (no momentum)"
    assert _optimizer({"optimizer": "adamw", "momentum": None}) == "adamw"


def test_validator_rejects_broken_reports(tiny_report: tuple[Path, dict, str]) -> None:
    _, doc, _ = tiny_report
    good = json.loads(json.dumps(doc))
    cases = []
    bad = copy.deepcopy(good)
    del bad["environment"]
    cases.append((bad, "environment"))
    bad = copy.deepcopy(good)
    bad["schema_version"] = 0
    cases.append((bad, "schema_version"))
    bad = copy.deepcopy(good)
    bad["tasks"][0]["runs"][1]["val_metric"] = float("nan")
    cases.append((bad, "val_metric"))
    bad = copy.deepcopy(good)
    bad["tasks"][1]["runs"][2]["updates_lost"] = 1.5
    cases.append((bad, "updates_lost"))
    bad = copy.deepcopy(good)
    bad["tasks"][0]["runs"].reverse()
    cases.append((bad, "baseline"))
    bad = copy.deepcopy(good)
    bad["tasks"][0]["runs"][0]["curves"]["train_loss"]["step"].pop()
    cases.append((bad, "lengths"))
    bad = copy.deepcopy(good)
    bad["tasks"][0]["runs"][0]["surprise"] = 1
    cases.append((bad, "surprise"))
    for broken, needle in cases:
        with pytest.raises(ValueError, match=needle):
            validate_report(broken)


def test_cli_demo_subset_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a subset of tasks and formats, every recipe through the public API
    rc = cli.main(["demo", "--preset", "tiny", "--task", "digits", "--formats", "bf16,e3m4",
                   "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    validate_report(doc)
    runs = doc["tasks"][0]["runs"]
    assert [r["recipe"]["id"] for r in runs] == ["fp32", "bf16-O2", "float8_e3m4-O2"]
    assert runs[0]["backend"] == "torch (float32)"
    assert runs[1]["backend"].startswith("mixprec.initialize(opt_level='O2', compute='bfloat16'")
    assert runs[2]["backend"].startswith("mixprec.initialize(opt_level='O2', compute='float8_e3m4'")
    assert [t["name"] for t in doc["tasks"]] == ["digits"]
    capsys.readouterr()
    assert cli.main(["demo", "--task", "images", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "images" in err and "digits" in err and "text" in err
    assert cli.main(["demo", "--formats", "fp17", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "fp17" in err and "fp16-O2" in err
    # the demo's own engine is gone, and its switch with it
    assert cli.main(["demo", "--backend", "internal", "--out", str(tmp_path)]) == 2
    assert "--backend" in capsys.readouterr().err


def test_resolve_recipes() -> None:
    assert [r.id for r in resolve_recipes(None)] == EXPECTED_RECIPES
    assert [r.id for r in resolve_recipes("fp16")] == ["fp32", "fp16-O2", "fp16-O3",
                                                       "fp16-noscale"]  # fmt: skip
    assert [r.id for r in resolve_recipes("e4m3fn,e5m2")] == ["fp32", "fp8-hybrid"]
    custom = resolve_recipes(["e6m9"])[1]
    assert (custom.compute, custom.master_weights, custom.loss_scale) == ("e6m9", True, "dynamic")
    assert resolve_recipes("fp16-O3")[1] is RECIPES["fp16-O3"]
    with pytest.raises(ValueError, match="bogus"):
        resolve_recipes("bogus")


def test_resolve_tasks() -> None:
    assert resolve_tasks(None) == resolve_tasks("all") == ("digits", "text")
    assert resolve_tasks("text, digits") == ("text", "digits")
    assert resolve_tasks("digits,all") == ("digits", "text")
    with pytest.raises(ValueError, match=r"'images'.*digits, text, all"):
        resolve_tasks("digits,images")
    with pytest.raises(ValueError, match="no task"):
        resolve_tasks(" , ")
    assert [t.name for t in DemoConfig.tiny(tasks="text").tasks] == ["text"]


def test_fp16_recipe_rounds_gemm_forward_and_backward() -> None:
    """Oracle: torch's own float16 cast (round to nearest even)."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(8, 16, generator=gen))
    w = model.weight.detach().clone()
    x = (torch.randn(4, 16, generator=gen) * 1e-3).requires_grad_(True)
    trainer = RecipeTrainer(RECIPES["fp16-O2"], model, torch.optim.SGD(model.parameters(), lr=0.1))
    with trainer.autocast():
        y = trainer.model(x)
    assert torch.equal(y, y.half().float())
    assert not torch.equal(y, F.linear(x.detach(), w))  # fp16 operands really changed the result
    g = torch.randn(4, 8, generator=gen) * 1e-6  # many values under fp16's subnormal range
    y.backward(g)
    assert torch.equal(x.grad, x.grad.half().float())
    assert torch.equal(trainer.model.weight.grad, trainer.model.weight.grad.half().float())
    # outside the model nothing is rounded
    z = F.linear(x.detach(), w)
    assert torch.equal(z, x.detach() @ w.T)


def test_master_weights_keep_updates_below_fp16_spacing() -> None:
    """A weight of 1.0 has fp16 spacing 2^-10; an update of 2^-13 is lost without master
    weights and applied with them (oracle: exact binary arithmetic)."""
    results = {}
    for rid in ("fp16-O2", "fp16-O3"):
        model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(1.0)
        opt = torch.optim.SGD(model.parameters(), lr=2.0**-9)
        trainer = RecipeTrainer(RECIPES[rid], model, opt)
        x = torch.ones(1, 1)
        with trainer.autocast():
            # d loss / d w = 2^-4 (scaled by 2^16: 4096, well inside fp16), update 2^-13
            loss = trainer.model(x).sum() * 2.0**-4
        trainer.backward(loss)
        assert trainer.step()
        (stored,) = mixprec.master_params(trainer.optimizer)  # O2: the fp32 master
        results[rid] = (stored.item(), trainer.updates_lost, trainer.updates)
    assert results["fp16-O2"] == (1.0 - 2.0**-13, 0, 1)
    assert results["fp16-O3"] == (1.0, 1, 1)


def test_dynamic_loss_scale_skips_overflow_and_backs_off() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    trainer = RecipeTrainer(RECIPES["fp16-O2"], model, torch.optim.SGD(model.parameters(), lr=1.0))
    assert trainer.loss_scale == 2.0**16
    x = torch.full((1, 2), 1000.0)  # grad 1000 * 2^16 overflows fp16 (max 65504)
    with trainer.autocast():
        loss = trainer.model(x).sum()
    trainer.backward(loss)
    assert trainer.step() is False
    assert (trainer.skipped, trainer.loss_scale) == (1, 2.0**15)
    assert torch.equal(model.weight, torch.full((1, 2), 0.5))
    (master,) = mixprec.master_params(trainer.optimizer)
    assert torch.equal(master, torch.full((1, 2), 0.5))
    # the no-scaling recipe never skips: it has no scaler to notice
    other = torch.nn.Linear(2, 1, bias=False)
    assert RecipeTrainer(RECIPES["fp16-noscale"], other, torch.optim.SGD(other.parameters(),
                         lr=1.0)).loss_scale == 1.0  # fmt: skip


def test_probe_flush_fractions_by_hand() -> None:
    # fp16 smallest subnormal 2^-24; 2^-26 rounds to 0, 2^-20 survives
    act = (torch.tensor([2.0**-26, 2.0**-20, 1.0, 0.0, -(2.0**-30)]),)
    wt = (torch.tensor([2.0**-42, 2.0**-10]),)
    probe = GradientProbe(act, wt)
    assert probe.flushed("fp16") == (2 / 4, 1 / 2)
    # scaled by 2^16: 2^-26 -> 2^-10 survives, 2^-42 -> 2^-26 still flushes
    assert probe.flushed("fp16", scale=2.0**16) == (0.0, 1 / 2)
    assert probe.flushed("bf16") == (0.0, 0.0)
    # per-tensor scaling puts the max (1.0) at e5m2's top binade 2^15: 2^-30 -> 2^-15 survives
    # (e5m2 subnormals reach 2^-16); weights' max 2^-10 -> 2^15 (x 2^25): 2^-42 -> 2^-17, half
    # the smallest subnormal, a tie that rounds to even (zero)
    assert probe.flushed("e5m2", per_tensor=True) == (0.0, 1 / 2)


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)
        self.scores = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.scores(h, h.transpose(-2, -1))


def test_probe_records_every_gemm_gradient() -> None:
    """Oracle: torch.autograd.grad of the same loss with respect to each GEMM operand."""
    gen = torch.Generator().manual_seed(0)
    model = _Attention()
    x = torch.randn(2, 4, 3, generator=gen)
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel, strict=True):
        p.grad = s
    probe = probe_gradients(model, lambda m: (m(x) ** 2).sum())
    h = model.proj(x)
    ht = h.transpose(-2, -1)
    out = torch.matmul(h, ht)
    loss = (out**2).sum()
    g_out, g_h, g_ht, g_w, g_b = torch.autograd.grad(
        loss, [out, h, ht, model.proj.weight, model.proj.bias], retain_graph=True
    )
    # proj: output grad (h's total), weight, bias (its input x needs none); scores: output and
    # both operands, h and h^T, each with its own gradient (not h's total)
    g_first = torch.matmul(g_out, ht.transpose(-2, -1))  # d loss / d h through operand 1 only
    assert not torch.allclose(g_first, g_h)
    want = [g_out, g_h, g_first, g_ht, g_w, g_b]
    assert len(probe.act) == len(want)
    for w in want:
        flat = w.reshape(-1)
        assert any(a.shape == flat.shape and torch.allclose(a, flat, rtol=1e-6, atol=0)
                   for a in probe.act), w.shape  # fmt: skip
    assert [t.numel() for t in probe.weight] == [9, 3]
    # the model is left as it was: .grad restored, no hook left behind
    for p, s in zip(model.parameters(), sentinel, strict=True):
        assert p.grad is s
    again = probe_gradients(model, lambda m: (m(x) ** 2).sum())
    assert len(again.act) == len(want)


def test_train_run_is_deterministic() -> None:
    spec = DemoConfig.tiny(tasks="digits").tasks[0]
    task = Task(spec, seed=0)
    a = train_run(task, RECIPES["fp16-O2"])
    b = train_run(task, RECIPES["fp16-O2"])
    assert a["curves"]["train_loss"] == b["curves"]["train_loss"]
    assert a["val_metric"] == b["val_metric"]
    c = train_run(Task(spec, seed=1), RECIPES["fp16-O2"])
    assert c["curves"]["train_loss"] != a["curves"]["train_loss"]


def test_shipped_data() -> None:
    x, y = read_digits()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert x.dtype == y.dtype == torch.int64
    assert int(x.min()) == 0 and int(x.max()) == 16  # set pixels per 4x4 block of a 32x32 bitmap
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    d = load_digits()
    assert d.source == "uci-optdigits"
    assert (len(d.y_train), len(d.y_val)) == (1348, 449)
    assert set(d.y_train.tolist()) == set(range(10))
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    # the digest the reports carry (the same images and split as every earlier report)
    assert d.sha256 == "65e5b4619795efb40c1082f4c350c049e4ad552200d369b6ae99e21eef5e72c5"
    assert load_digits(seed=1).sha256 == d.sha256  # the digest names the data, not the split
    assert not torch.equal(load_digits(seed=1).y_val, d.y_val)
    t = load_text(max_chars=5000)
    assert t.n_chars == 5000 and len(t.train) + len(t.val) == 5000
    assert t.modules[0] == "difflib"
    assert encode_text("a\tb").tolist() == [VOCAB.index("a"), *[VOCAB.index(" ")] * 4,
                                            VOCAB.index("b")]  # fmt: skip
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits(val_fraction=1.0)


def test_shipped_digits_equal_scikit_learns_copy() -> None:
    datasets = pytest.importorskip("sklearn.datasets")  # a dev extra; the demo never needs it
    ref = datasets.load_digits()
    x, y = read_digits()
    assert ref.data.shape == (1797, 64)
    assert torch.equal(torch.from_numpy(ref.data), x.double())  # float64 there, exact
    assert torch.equal(torch.from_numpy(ref.target).to(torch.int64), y)


def test_shipped_digits_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_data, "DIGITS_CSV_SHA256", "0" * 64)
    with pytest.raises(ValueError, match=r"sha256.*modified; reinstall"):
        read_digits()
    monkeypatch.setattr(demo_data, "DIGITS_FILE", "data_files/missing.csv.gz")
    with pytest.raises(FileNotFoundError, match=r"missing\.csv\.gz.*reinstall"):
        read_digits()


def test_plain_progress_lines_at_their_cadence() -> None:
    """Oracle: a fake clock (seconds) read once per call, and the lines it implies."""
    ticks = iter([0.0, 1.0, 4.0, 12.0, 15.0, 30.0, 31.0, 31.5])
    buf = io.StringIO()
    lines = PlainLines(Console(file=buf, width=40), runs=2, interval_s=10.0,
                       clock=lambda: next(ticks))  # fmt: skip
    on_step = lines.run("text · fp16-O2", 100)  # starts at t=0
    for done, loss in ((10, 4.0), (20, 3.5), (30, 3.25), (40, 3.0), (100, 2.5)):
        on_step(done, loss)  # t = 1, 4, 12, 15, 30
    on_step2 = lines.run("text · bf16-O2", 5)  # t=31
    on_step2(5, 2.0)  # t=31.5
    assert buf.getvalue().splitlines() == [
        # t=12: 12 s since the last line (the start), 30 of 100 steps: 28 s to go
        "[text · fp16-O2 1/2] step 30/100 loss 3.2500 eta 28s",
        "[text · fp16-O2 1/2] done 100/100 loss 2.5000 in 30.0s",
        "[text · bf16-O2 2/2] done 5/5 loss 2.0000 in 0.5s",
    ]  # lines are never wrapped to the console's width
    with pytest.raises(ValueError, match="interval_s"):
        PlainLines(Console(file=buf), runs=1, interval_s=-1)


def test_progress_is_plain_when_piped_and_bars_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # the CLI's own console on a captured (non-terminal) stdout: plain lines, flushed as it goes
    rc = cli.main(["demo", "--preset", "tiny", "--task", "digits", "--formats", "fp32",
                   "--out", str(tmp_path / "piped")])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    progress = out.split("digits (uci-optdigits)")[0].splitlines()  # what comes before the table
    tag = re.escape("[digits · fp32 1/1]")
    assert progress and all(re.fullmatch(tag + r" (step|done) .*s", x) for x in progress)
    assert re.fullmatch(tag + r" done 24/24 loss \d+\.\d{4} in \d+\.\ds", progress[-1])
    buf = io.StringIO()
    run_demo(DemoConfig.tiny(tasks="digits", formats="fp32"), tmp_path / "tty",
             console=Console(file=buf, force_terminal=True, width=120))  # fmt: skip
    shown = buf.getvalue()
    assert "digits · fp32" in shown and "24/24" in shown
    assert "] done " not in shown
