"""``mixprec run --autocast FORMAT [--emulate] script.py [args]``: an unmodified script under a
precision policy, ending like ``python script.py``; bad command lines are usage errors (status
2) found before the script runs. In-process through ``cli.main``, plus one real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mixprec import cli

# a training script that knows nothing of mixprec but reports what its ops produced
TRAIN = """
import sys
import torch

torch.manual_seed(0)
model = torch.nn.Linear(8, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(16, 8)
y = model(x)
as_bf16 = y.to(torch.bfloat16).to(torch.float32)
print("linear output bf16-representable:", torch.equal(as_bf16, y))
print("weights float32:", model.weight.dtype == torch.float32)
loss = y.square().mean()
loss.backward()
opt.step()
print("argv", sys.argv[1:])
"""

MARKER = """
from pathlib import Path
Path("ran.marker").write_text("the script ran")
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def script(workdir: Path, text: str, name: str = "train.py") -> str:
    path = workdir / name
    path.write_text(text)
    return str(path)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["run", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def usage_error(err: str) -> str:
    assert "Traceback" not in err
    assert err.startswith("usage: mixprec run "), err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("mixprec run: error: "), last
    return last[len("mixprec run: error: ") :]


def test_the_policy_applies_to_the_unmodified_script(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = script(workdir, TRAIN)
    old_argv, old_path = sys.argv, list(sys.path)
    rc, out, err = run_cli(capsys, "--autocast", "bf16", "--emulate", s, "--lr", "3")
    assert (rc, err) == (0, "")
    assert "linear output bf16-representable: True" in out
    assert "weights float32: True" in out
    assert "argv ['--lr', '3']" in out
    assert (sys.argv, sys.path) == (old_argv, old_path)
    # without mixprec the same script's float32 output is not bf16-representable
    rc, out, _ = run_cli(capsys, "--autocast", "float32", s)
    assert rc == 0 and "linear output bf16-representable: False" in out


def test_the_region_is_the_one_asked_for(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = script(workdir, "import mixprec\nprint(mixprec.current_policy())\n")
    rc, out, _ = run_cli(capsys, "--autocast", "p=bf16,c=e4m3", s)
    assert rc == 0 and out == "params=bfloat16,compute=float8_e4m3fn,output=float32\n"
    code = "import mixprec\nprint(mixprec.precision.is_emulating())\n"
    s = script(workdir, code, "emulating.py")
    assert run_cli(capsys, "--autocast", "fp16", "--emulate", s)[1] == "True\n"


def test_options_after_the_script_are_mixprec_s_until_a_bare_dashdash(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = script(workdir, TRAIN)
    rc, out, _ = run_cli(capsys, s, "--autocast", "bf16", "--emulate", "--", "--autocast", "x")
    assert rc == 0
    assert "linear output bf16-representable: True" in out
    assert "argv ['--autocast', 'x']" in out


@pytest.mark.parametrize(
    ("code", "status"), [("3", 3), ("0", 0), ("None", 0), ("", 0), ("True", 1)]
)
def test_integer_exit_status_is_the_script_s(
    code: str, status: int, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = script(workdir, f"import sys\nsys.exit({code})\n")
    rc, out, err = run_cli(capsys, "--autocast", "bf16", s)
    assert (rc, out, err) == (status, "", "")


def test_exit_message_and_uncaught_exception(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = script(workdir, "import sys\nsys.exit('bad learning rate')\n")
    rc, _, err = run_cli(capsys, "--autocast", "bf16", s)
    assert (rc, err) == (1, "bad learning rate\n")
    s = script(workdir, "def f():\n    raise RuntimeError('kaput')\n\nf()\n", "crash.py")
    rc, _, err = run_cli(capsys, "--autocast", "bf16", s)
    assert rc == 1
    assert err.startswith("Traceback (most recent call last):\n")
    assert 'crash.py", line 4, in <module>' in err and "RuntimeError: kaput" in err
    assert "runpy" not in err and "mixprec" not in err  # the script's own frames only


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["{s}"], "the --autocast FORMAT option is required"),
        (["--autocast", "bf61", "{s}"], "did you mean 'bf16'"),
        (["{s}", "--autocast", "bogus"], "argument --autocast: unknown format 'bogus'"),
        (["--autocast", "p=bf16,q=bf16", "{s}"], "unknown key 'q'"),
        (["--autocast", "bf16"], "missing the script to run: mixprec run script.py [args]"),
        (["--autocast", "bf16", "no_such.py"], "no such file or directory"),
        (["--autocast", "bf16", "."], "it is not a regular file"),
    ],
)
def test_bad_command_lines_are_usage_errors_before_the_script_runs(
    argv: list[str], needle: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = script(workdir, MARKER)
    rc, out, err = run_cli(capsys, *(a.format(s=s) for a in argv))
    assert rc == 2 and out == ""
    assert needle in usage_error(err)
    assert not (workdir / "ran.marker").exists()


def test_a_real_process_exits_with_the_script_s_status(workdir: Path) -> None:
    s = script(workdir, TRAIN + "raise SystemExit(5)\n")
    cmd = [sys.executable, "-m", "mixprec", "run", "--autocast", "bf16", "--emulate", s]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 5, done.stderr
    assert "linear output bf16-representable: True" in done.stdout
