"""Command-line argument handling of every ``mixprec`` subcommand.

Bad options are usage errors (argparse's ``usage: mixprec CMD`` and ``mixprec CMD: error: ...``,
exit status 2) found before anything runs; ``mixprec sanitize`` ends like ``python script.py``
would with the script's own exit status and message. In-process through ``cli.main`` except for
one subprocess run that checks the real process exit status and streams.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mixprec import cli

MARKER_SCRIPT = """
from pathlib import Path
Path("ran.marker").write_text("the script ran")
print("script ran")
"""


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def usage_error(err: str, command: str, option: str | None = None) -> str:
    """Check argparse's usage error layout for ``mixprec COMMAND``; return the message."""
    assert "Traceback" not in err
    assert err.startswith(f"usage: mixprec {command} "), err
    last = err.rstrip("\n").splitlines()[-1]
    prefix = f"mixprec {command}: error: " + (f"argument {option}: " if option else "")
    assert last.startswith(prefix), last
    return last[len(prefix) :]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # scripts write relative files; the report goes to --out
    return tmp_path


def script(workdir: Path, text: str, name: str = "user_script.py") -> str:
    path = workdir / name
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------------------------
# mixprec sanitize: options


def test_sanitize_error_prefix_is_the_subcommand(workdir: Path, capsys) -> None:
    # it was "mixprec ['x.py', '--fail-on', 'bogus']: error: ..." (the script's argv as prog)
    s = script(workdir, MARKER_SCRIPT)
    rc, _, err = run_cli(capsys, "sanitize", s, "--fail-on", "bogus")
    assert rc == 2
    msg = usage_error(err, "sanitize", "--fail-on")
    assert "'bogus'" in msg and "precision_loss" in msg and "any" in msg
    assert "[" not in err.splitlines()[-1].split(":")[0]
    assert not (workdir / "ran.marker").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_sanitize_bad_hist_format_fails_before_the_script_runs(
    where: str, workdir: Path, capsys
) -> None:
    s = script(workdir, MARKER_SCRIPT)
    opts = ["--hist-format", "nope"]
    argv = [*opts, s] if where == "before" else [s, *opts]
    rc, out, err = run_cli(capsys, "sanitize", "--out", str(workdir / "rep"), *argv)
    assert rc == 2
    assert "'nope'" in usage_error(err, "sanitize", "--hist-format")
    assert "script ran" not in out
    assert not (workdir / "ran.marker").exists()
    assert not (workdir / "rep").exists()


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--max-rows", "-1", "invalid value '-1': expected an integer >= 0"),
        ("--max-rows", "many", "invalid value 'many': expected an integer >= 0"),
        ("--threshold-bits", "0", "invalid value '0': expected a number in (0, 53]"),
        ("--threshold-bits", "nan", "invalid value 'nan'"),
        ("--threshold-bits", "54", "invalid value '54'"),
        ("--dtype-hint", "float7", "'float7'"),
        ("--shadow", "float16", "invalid choice: 'float16'"),
        ("--shadow-memory", "-5", "invalid value '-5': expected an integer >= 0"),
        ("--out", "user_script.py", "exists and is not a directory"),
    ],
)
@pytest.mark.parametrize("where", ["before", "after"])
def test_sanitize_rejects_bad_option_values(
    option: str, value: str, needle: str, where: str, workdir: Path, capsys
) -> None:
    s = script(workdir, MARKER_SCRIPT)
    argv = [option, value, s] if where == "before" else [s, option, value]
    rc, _, err = run_cli(capsys, "sanitize", *argv)
    assert rc == 2
    assert needle in usage_error(err, "sanitize", option)
    assert not (workdir / "ran.marker").exists()


def test_sanitize_max_rows_zero_is_allowed(workdir: Path, capsys) -> None:
    s = script(workdir, "import torch\nx = torch.zeros(2)\ny = x / x\n")
    rc, out, _ = run_cli(capsys, "sanitize", "--out", "rep", "--max-rows", "0", s)
    assert rc == 0
    assert "... " in out and "1 more" in out  # the one finding is counted, not listed
    assert json.loads((workdir / "rep" / "report.json").read_text())["findings"]


def test_sanitize_missing_script(workdir: Path, capsys) -> None:
    rc, _, err = run_cli(capsys, "sanitize", "no_such_script.py")
    assert rc == 2
    msg = usage_error(err, "sanitize")
    assert msg == "cannot run script 'no_such_script.py': no such file or directory"
    rc, _, err = run_cli(capsys, "sanitize", str(workdir))
    assert rc == 2 and "not a regular file" in usage_error(err, "sanitize")
    rc, _, err = run_cli(capsys, "sanitize", "--out", "rep")
    assert rc == 2 and "missing the script" in usage_error(err, "sanitize")


def test_sanitize_script_options_still_reach_the_script(workdir: Path, capsys) -> None:
    s = script(workdir, "import sys\nprint('argv', sys.argv[1:])\n")
    rc, out, _ = run_cli(
        capsys, "sanitize", s, "--lr", "3", "--max-rows", "5", "--", "--max-rows", "-1"
    )
    assert rc == 0
    assert "argv ['--lr', '3', '--max-rows', '-1']" in out


# ----------------------------------------------------------------------------------------------
# mixprec sanitize: how the script ends


def test_sanitize_keeps_sys_exit_message_and_status(workdir: Path, capsys) -> None:
    s = script(workdir, "import sys\nprint('before')\nsys.exit('bad learning rate')\n")
    rc, out, err = run_cli(capsys, "sanitize", "--out", "rep", s)
    assert rc == 1  # as python: a non-integer exit code prints itself and gives status 1
    assert err == "bad learning rate\n"
    assert "before" in out and "the script exited with status 1" in out
    assert (workdir / "rep" / "report.json").is_file()  # the report is still written


@pytest.mark.parametrize(
    ("code", "status"), [("3", 3), ("0", 0), ("None", 0), ("", 0), ("True", 1)]
)
def test_sanitize_keeps_integer_exit_status(code: str, status: int, workdir: Path, capsys) -> None:
    s = script(workdir, f"import sys\nsys.exit({code})\n")
    rc, out, err = run_cli(capsys, "sanitize", "--out", "rep", s)
    assert rc == status
    assert err == ""
    assert ("exited with status" in out) == (status != 0)


def test_sanitize_script_status_wins_over_fail_on(workdir: Path, capsys) -> None:
    s = script(workdir, "import sys, torch\nx = torch.zeros(2)\ny = x / x\nsys.exit(4)\n")
    assert run_cli(capsys, "sanitize", "--out", "rep", "--fail-on", "nan", s)[0] == 4
    s = script(workdir, "import torch\nx = torch.zeros(2)\ny = x / x\n", "clean_exit.py")
    assert run_cli(capsys, "sanitize", "--out", "rep", "--fail-on", "nan", s)[0] == 1


def test_sanitize_uncaught_exception_traceback(workdir: Path, capsys) -> None:
    s = script(workdir, "def f():\n    raise RuntimeError('kaput')\n\nf()\n")
    rc, out, err = run_cli(capsys, "sanitize", "--out", "rep", s)
    assert rc == 1
    lines = err.splitlines()
    # python's traceback, from the script's own frames on (no runpy or mixprec frames)
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1] == f'  File "{s}", line 4, in <module>'
    assert lines[-1] == "RuntimeError: kaput"
    assert "runpy" not in err and "_cli_sanitize" not in err
    assert "the script exited with status 1" in out
    assert (workdir / "rep" / "report.json").is_file()


def test_sanitize_script_syntax_error(workdir: Path, capsys) -> None:
    s = script(workdir, "def f(:\n")
    rc, _, err = run_cli(capsys, "sanitize", "--out", "rep", s)
    assert rc == 1
    assert err.startswith(f'  File "{s}", line 1\n') and "SyntaxError" in err
    assert "Traceback" not in err


def test_sanitize_real_process_exit(workdir: Path) -> None:
    """The process exit status and streams, as a shell sees them."""
    s = script(workdir, "import sys\nsys.exit('stopped: no data')\n")
    cmd = [sys.executable, "-m", "mixprec", "sanitize", "--out", "rep"]
    done = subprocess.run([*cmd, s], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == "stopped: no data\n"
    done = subprocess.run(
        [*cmd, s, "--max-rows", "-1"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert usage_error(done.stderr, "sanitize", "--max-rows") == (
        "invalid value '-1': expected an integer >= 0"
    )


# ----------------------------------------------------------------------------------------------
# mixprec explain


def test_explain_huge_value_is_a_clear_error(capsys) -> None:
    rc, out, err = run_cli(capsys, "explain", "1e999999", "--format", "fp16")
    assert rc == 2 and out == ""
    msg = usage_error(err, "explain", "VALUE")
    assert msg.startswith("VALUE '1e999999' is out of range: ")
    assert "1e1000" in msg and "inf" in msg
    assert "integer string conversion" not in err and "set_int_max_str_digits" not in err
    # exponents far too long to evaluate fail as fast; zero is zero whatever the exponent
    rc, _, err = run_cli(capsys, "explain", "-f", "fp16", "--", "-1e99999999999999999999")
    assert rc == 2 and "out of range" in err
    rc, _, err = run_cli(capsys, "explain", "-f", "fp16", "0x1p-99999")
    assert rc == 2 and "out of range" in err
    rc, _, err = run_cli(capsys, "explain", "-f", "fp16", "1" * 1300)
    assert rc == 2 and "too many digits" in err
    rc, out, _ = run_cli(capsys, "explain", "--json", "-f", "fp16", "0e999999")
    assert rc == 0 and json.loads(out)["input"]["exact"] == "0"


def test_explain_inf_and_huge_finite_values(capsys) -> None:
    # inf is infinity; a finite value past every format's range is used exactly: toward zero it
    # gives max, not inf (so 1e999999 is not read as inf)
    rc, out, _ = run_cli(capsys, "explain", "--json", "-f", "fp16", "inf")
    assert rc == 0 and json.loads(out)["modes"]["toward_zero"]["value"] == "inf"
    rc, out, _ = run_cli(capsys, "explain", "--json", "-f", "fp16", "9.99e999")
    d = json.loads(out)
    assert rc == 0 and d["modes"]["toward_zero"]["value"] == 65504.0
    assert d["modes"]["nearest"]["value"] == "inf"


@pytest.mark.parametrize(
    ("value", "mode"), [("1e400", "toward_zero"), ("1e-1000", "up"), ("1e-1000", "nearest")]
)
def test_explain_text_with_errors_past_float64(value: str, mode: str, capsys) -> None:
    # the absolute or relative error of these is beyond float64 ("inf" in JSON); the tables
    # print it instead of failing on a format code
    rc, out, err = run_cli(capsys, "explain", value, "-f", "fp64", "-r", mode)
    assert rc == 0, err
    assert "rounding modes" in out
    assert "inf" in out


# ----------------------------------------------------------------------------------------------
# every subcommand: bad values are usage errors


@pytest.mark.parametrize(
    ("argv", "option", "needle"),
    [
        (["formats", "--format", "float7"], "--format/-f", "'float7'"),
        (["explain", "1", "--format", "bf17"], "--format/-f", "'bf17'"),
        (["explain", "1", "-f", "bf16", "-r", "sideways"], "--rounding/-r", "'sideways'"),
        (["explain", "-f", "bf16", "--", "1e-x"], "VALUE", "cannot parse VALUE '1e-x'"),
        (["explain", "-f", "bf16", "1/0"], "VALUE", "cannot parse VALUE '1/0'"),
        (["bench", "--n", "0"], "--n", "invalid value '0': expected an integer >= 1"),
        (["bench", "--repeat", "-2"], "--repeat", "invalid value '-2'"),
        (["bench", "--formats", "bf16,fp7"], "--formats", "'fp7'"),
        (["bench", "--formats", ","], "--formats", "one or more"),
        (["demo", "--task", "images"], "--task", "'images'; valid tasks are digits, text, all"),
        (["demo", "--formats", "fp17"], "--formats", "'fp17'"),
        (["demo", "--seed", "-1"], "--seed", "invalid value '-1'"),
        (["demo", "--threads", "-1"], "--threads", "invalid value '-1'"),
        (["stabilize", "missing.py"], "file", "'missing.py' is not a file"),
        (["stabilize", "."], "file", "it is a directory"),
    ],
)
def test_bad_values_are_usage_errors(
    argv: list[str], option: str, needle: str, workdir: Path, capsys
) -> None:
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert needle in usage_error(err, argv[0], option)


def test_demo_bad_out_fails_before_training(workdir: Path, capsys) -> None:
    (workdir / "taken").write_text("a file")
    rc, out, err = run_cli(capsys, "demo", "--preset", "tiny", "--out", "taken/report")
    assert rc == 2 and out == ""
    assert "'taken' is not a directory" in usage_error(err, "demo", "--out")
    rc, _, err = run_cli(capsys, "demo", "--preset", "tiny", "--out", "taken")
    assert rc == 2 and "exists and is not a directory" in err


def test_stabilize_not_python(workdir: Path, capsys) -> None:
    (workdir / "notes.txt").write_text("x")
    rc, _, err = run_cli(capsys, "stabilize", "notes.txt")
    assert rc == 2 and "'notes.txt' is not a .py file" in usage_error(err, "stabilize", "file")


def test_library_errors_at_run_time(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A ValueError/TypeError the library raises while running: one line, status 2; an OSError:
    one line, status 1; never a traceback."""
    import mixprec.cli.bench_command as bench

    def fail(exc: Exception):
        def table(*args: object, **kw: object) -> str:
            raise exc

        return table

    for exc, status in (
        (ValueError("bad size"), 2),
        (TypeError("bad type"), 2),
        (PermissionError(13, "Permission denied", "out.md"), 1),
    ):
        monkeypatch.setattr(bench, "quantize_table", fail(exc))
        rc, out, err = run_cli(capsys, "bench", "--n", "8")
        assert rc == status and out == ""
        assert err == f"mixprec bench: error: {exc}\n"


def test_help_and_no_command(capsys) -> None:
    rc, out, _ = run_cli(capsys, "sanitize", "--help")
    assert rc == 0 and out.startswith("usage: mixprec sanitize ")
    rc, out, _ = run_cli(capsys)
    assert rc == 2 and "COMMAND" in out
