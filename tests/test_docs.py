"""Every code example in README.md and docs/*.md runs, and prints what the page shows.

One test per runnable fenced block, named ``FILE:LINE`` (the line of the opening fence):

* ``python`` block with ``>>>`` prompts: a doctest (``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``).
* ``python`` block without prompts: a script, executed with its stdout captured. When the next
  fenced block follows it with only blank lines between and is untyped or ``text``, that block is
  the script's output and must equal what it printed (trailing whitespace aside; ``...`` in it
  matches anything, as in a doctest). A script whose first line is a comment naming a file
  (``# train_tiny.py``) is also saved under that name in the working directory, and runs under
  that file name (tracebacks, sanitizer locations) with ``sys.argv == ["train_tiny.py"]``.
* ``console`` block: ``$ mixprec ...`` lines run through ``mixprec.cli.main`` in process (stdout
  and stderr together, as a terminal shows them); the lines up to the next ``$`` are the output.
  ``$ echo $?`` prints the previous command's exit status.
* ``bash`` block: commands without output; ``mixprec ...`` lines run like console commands.
* an untyped block preceded by ``<!-- doctest: copy-of PATH -->`` repeats an output block of
  PATH (the README quotes the docs' numbers): it must equal one of them.

``<!-- doctest: cpu AVX512 GenuineIntel -->`` before a python or console block says that the
digits of its output depend on the CPU's float32 kernels and were made where
``torch.backends.cpu.get_cpu_capability()`` is ``"AVX512"`` on an Intel CPU (the page says so in
words too; MKL runs other GEMM kernels on AMD CPUs of the same capability, and torch's fused
attention differs there too). On such a machine the output is compared as usual; on any other
only the text around the numbers is (every number matches any number), and the update leaves
the block alone.

Every other block (``text``, untyped blocks that are not output) is prose, never run. Pseudo-code
and fragments are therefore written as ``text``, or given the few lines that make them run.

Commands that take minutes (``SLOW_COMMANDS``: the demo's runs, the dev script) are not run: the
test checks that their command line parses (``mixprec``'s own argparse parser; dev.py's command
names) and then reports itself skipped, with the reason. Nothing else is skipped.

Blocks of one page share one namespace and one temporary working directory, in page order, like
a reader's REPL session; each page starts fresh. A block that uses names of earlier blocks gets
them even when pytest-xdist hands it to another worker: the earlier blocks are replayed first
(a block that defines everything it uses replays only the earlier blocks that save files).

Environment of every block: one torch thread (the outputs depend on the order of float32 sums,
and the docs name the machine where they do), ``COLUMNS=200`` (the width docs/cli.md's tables
were rendered at), no colour. The global random generators (torch, numpy, random) are seeded
with a random seed before every block: a block whose output depends on random numbers must seed
them itself, visibly, or it fails.

``MIXPREC_UPDATE_DOCS=1`` rewrites, in place, every output that differs (script output blocks,
doctest expectations, console output) with what the code printed; paths inside the working
directory are written as ``.../NAME``. Review the result with ``git diff``: the prose around the
numbers must stay true. (Run it without ``-n``, or with it: edits are located by content under a
file lock.)
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import difflib
import doctest
import fcntl
import importlib.util
import io
import itertools
import os
import random
import re
import shlex
import sys
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from mixprec import machine

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
UPDATE = os.environ.get("MIXPREC_UPDATE_DOCS", "") not in ("", "0")

# the width console blocks render at: `mixprec formats`/`explain` and rich read COLUMNS, so the
# docs' wide tables (up to 200 columns) are reproducible; pages show narrow layouts with --width
COLUMNS = 200

# command-line prefix -> why it is not run (its arguments are still parsed)
SLOW_COMMANDS = {
    "mixprec demo": "trains for minutes, about 70 s of CPU with --quick; times vary by machine",
    "mixprec bench": "timings take minutes and vary by machine",
    "python3 scripts/dev.py": "sets up .venv, then runs the demo or the whole test suite",
}

PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell"}
OUTPUT = {"", "text"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*doctest:\s*(?P<text>.*?)\s*-->\s*$")
_FILE_LINE = re.compile(r"^#\s*(?P<name>[\w.-]+\.py)\s*$")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")

# outputs whose digits depend on the CPU's float32 kernels carry `<!-- doctest: cpu NAME -->`,
# NAME being "capability vendor" (torch.backends.cpu.get_cpu_capability(), mixprec.machine's
# cpu_vendor()) where they were made; on other machines only their text is compared, every
# number standing for any number
MACHINE = f"{machine.cpu_capability()} {machine.cpu_vendor()}"


# --------------------------------------------------------------------------------------------
# reading the pages
# --------------------------------------------------------------------------------------------


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    indent: str
    info: str
    body: list[str]  # de-indented
    directive: str = ""
    kind: str = "prose"  # doctest | script | console | commands | output | copy | prose
    output: Block | None = None  # a script's output block
    index: int = -1  # position among the page's runnable blocks

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def text(self) -> str:
        return "".join(line + "\n" for line in self.body)

    @property
    def cpu(self) -> str | None:
        """The machine the output's digits came from (``<!-- doctest: cpu AVX512 GenuineIntel
        -->``: capability and vendor)."""
        return self.directive.split(None, 1)[1] if self.directive.startswith("cpu ") else None

    @property
    def exact_numbers(self) -> bool:
        return self.cpu in (None, MACHINE)

    @property
    def filename(self) -> str | None:
        """NAME.py when the script's first line is ``# NAME.py``."""
        m = _FILE_LINE.match(self.body[0]) if self.kind == "script" and self.body else None
        return m["name"] if m else None


def parse_page(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, info = m["indent"], m["ticks"], m["info"].strip()
        j = i + 1
        while j < len(lines) and not re.fullmatch(rf"[ \t]*{ticks}`*\s*", lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: unclosed code fence")
        body = [
            ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]
        ]
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        d = _DIRECTIVE.match(lines[k]) if k >= 0 else None
        if d and not re.fullmatch(r"copy-of \S+|cpu \S+ \S+", d["text"]):
            raise ValueError(f"{path}:{k + 1}: unknown directive {d['text']!r}")
        blocks.append(Block(path, i + 1, j + 1, indent, info.split()[0] if info else "", body,
                            directive=d["text"] if d else ""))  # fmt: skip
        i = j + 1
    _classify(blocks, lines)
    return blocks


def _classify(blocks: list[Block], lines: list[str]) -> None:
    prev: Block | None = None
    n = 0
    for b in blocks:
        if b.directive.startswith("copy-of "):
            b.kind = "copy"
        elif b.info in PYTHON:
            b.kind = "doctest" if any(ln.lstrip().startswith(">>>") for ln in b.body) else "script"
        elif b.info == "console":
            b.kind = "console"
        elif b.info in SHELL:
            b.kind = "commands"
        elif (
            b.info in OUTPUT
            and prev is not None
            and prev.kind == "script"
            and prev.output is None
            and all(not ln.strip() for ln in lines[prev.end : b.line - 1])
        ):
            b.kind = "output"
            prev.output = b
        if b.kind not in ("prose", "output"):
            b.index = n
            n += 1
        prev = b


BLOCKS = {path: parse_page(path) for path in PAGES}
RUNNABLE = {p: [b for b in bs if b.index >= 0] for p, bs in BLOCKS.items()}
ALL_RUNNABLE = [b for bs in RUNNABLE.values() for b in bs]


# --------------------------------------------------------------------------------------------
# what a block needs from earlier blocks
# --------------------------------------------------------------------------------------------


def _sources(block: Block) -> list[str]:
    if block.kind == "doctest":
        return [ex.source for ex in doctest.DocTestParser().get_examples(block.text)]
    return [block.text]


def free_names(block: Block) -> set[str]:
    """Names the block reads but never binds (builtins aside): what it needs from earlier blocks."""
    loaded: set[str] = set()
    bound: set[str] = set()
    try:
        trees = [ast.parse(src) for src in _sources(block)]
    except SyntaxError:
        return {"<syntax error>"}  # reported when the block runs
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.add(node.name)
    return loaded - bound - set(dir(builtins))


def needs(block: Block) -> list[Block]:
    """Earlier python blocks of the page that must run before ``block``."""
    earlier = [b for b in RUNNABLE[block.path][: block.index] if b.kind in ("doctest", "script")]
    if block.kind in ("doctest", "script") and free_names(block):
        return earlier
    return [b for b in earlier if b.filename]  # files the block may read


# --------------------------------------------------------------------------------------------
# running blocks
# --------------------------------------------------------------------------------------------


def _page_namespace() -> dict:
    """A page's global namespace: that of a fresh module registered in ``sys.modules``, so code
    that finds a global through its module's name does find it (torch.compile's guards do:
    with ``__name__ == "__main__"`` they looked the page's names up in pytest's own
    ``__main__``)."""
    module = types.ModuleType(f"_doc_page_{next(_PAGE_IDS)}")
    sys.modules[module.__name__] = module
    return module.__dict__


_PAGE_IDS = itertools.count()


@dataclass
class PageState:
    cwd: Path
    globs: dict = field(default_factory=_page_namespace)
    done: list[int] = field(default_factory=list)


_STATES: dict[Path, PageState] = {}


def _normalise(text: str) -> str:
    lines = [ln.rstrip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "".join(ln + "\n" for ln in lines)


def _shown(text: str, cwd: Path) -> str:
    """What the page shows for printed ``text``: paths in the working directory as .../NAME."""
    return _normalise(text.replace(str(cwd) + os.sep, "..." + os.sep))


def _numbers_masked(text: str) -> str:
    return _NUMBER.sub("<number>", text)


class _Checker(doctest.OutputChecker):
    """doctest's checker; with ``exact_numbers=False`` a mismatch in numbers alone passes."""

    def __init__(self, exact_numbers: bool = True) -> None:
        self.exact_numbers = exact_numbers

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return super().check_output(want, got, optionflags) or (
            not self.exact_numbers
            and super().check_output(_numbers_masked(want), _numbers_masked(got), optionflags)
        )


def _matches(want: str, got: str, exact_numbers: bool = True) -> bool:
    want, got = _normalise(want), _normalise(got)
    flags = doctest.ELLIPSIS if "..." in want else 0
    return want == got or _Checker(exact_numbers).check_output(want, got, flags)


def _diff(want: str, got: str, where: str) -> str:
    d = difflib.unified_diff(_normalise(want).splitlines(), _normalise(got).splitlines(),
                             f"{where} (the page)", "printed", lineterm="")  # fmt: skip
    return "\n".join(d)


@contextlib.contextmanager
def _environment(cwd: Path, seed: int) -> Iterator[None]:
    """One torch thread, fixed width, no colour, scrambled global RNGs, cwd on sys.path."""
    saved_env = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR", "FORCE_COLOR",
                                                "TTY_COMPATIBLE", "TTY_INTERACTIVE")}  # fmt: skip
    os.environ.update(COLUMNS=str(COLUMNS), NO_COLOR="1")
    for k in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        os.environ.pop(k, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    old_cwd, old_path, old_argv = os.getcwd(), list(sys.path), sys.argv
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))
    try:
        yield
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
        sys.argv = old_argv
        torch.set_num_threads(threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, mod in list(sys.modules.items()):  # modules imported from the page's files
            if str(getattr(mod, "__file__", None) or "").startswith(str(cwd)):
                del sys.modules[name]


class _DocRunner(doctest.DocTestRunner):
    def __init__(self, exact_numbers: bool) -> None:
        super().__init__(checker=_Checker(exact_numbers), optionflags=FLAGS)
        self.mismatches: list[tuple[doctest.Example, str]] = []

    def report_failure(self, out, test, example, got):
        self.mismatches.append((example, got))
        super().report_failure(out, test, example, got)


def run_doctest(block: Block, state: PageState) -> tuple[str, list[tuple[doctest.Example, str]]]:
    test = doctest.DocTestParser().get_doctest(
        block.text, {}, block.id, str(block.path), block.line
    )
    test.globs = state.globs
    runner = _DocRunner(block.exact_numbers)
    report = io.StringIO()
    result = runner.run(test, out=report.write, clear_globs=False)
    return (report.getvalue() if result.failed else ""), runner.mismatches


def run_script(block: Block, state: PageState) -> str:
    name = block.filename
    if name:
        path = state.cwd / name
        path.write_text(block.text, encoding="utf-8")
        code = compile(block.text, str(path), "exec")
        sys.argv = [name]
    else:  # line numbers of tracebacks are the page's own
        code = compile("\n" * block.line + block.text, str(block.path), "exec")
        sys.argv = [block.id]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, state.globs)
    return out.getvalue()


def _traceback(exc: BaseException) -> str:
    """The traceback from the block's own lines on (the runner's frames dropped)."""
    tb = traceback.TracebackException.from_exception(exc)
    stack = tb.stack
    while stack and stack[0].filename == __file__:
        stack.pop(0)
    return "".join(tb.format())


def _load_dev_script():
    spec = importlib.util.spec_from_file_location("_mixprec_dev_script", ROOT / "scripts/dev.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_parses(command: str) -> None:
    """Argument check of a command that is not run: argparse (mixprec) or dev.py's command names."""
    argv = shlex.split(command)
    if argv[:2] == ["python3", "scripts/dev.py"]:
        usage = io.StringIO()
        with contextlib.redirect_stdout(usage):
            _load_dev_script().main([])
        names = re.findall(r"(?:dev\.py|\|) (\w+)", usage.getvalue())
        assert len(argv) > 2 and argv[2] in names, f"{command!r}: dev.py knows {names}"
        if argv[2] == "demo":
            check_parses(shlex.join(["mixprec", "demo", *argv[3:]]))
        return
    assert argv[0] == "mixprec", f"{command!r}: the doc runner only runs mixprec commands"
    from mixprec.cli.app import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"{command!r} does not parse:\n{err.getvalue()}") from exc


def run_command(command: str) -> tuple[int, str]:
    argv = shlex.split(command)
    assert argv[0] == "mixprec", f"{command!r}: the doc runner only runs mixprec commands"
    from mixprec.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            status = main(argv[1:])
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return status, out.getvalue()


def slow_reason(command: str) -> str | None:
    for prefix, reason in SLOW_COMMANDS.items():
        if command == prefix or command.startswith(prefix + " "):
            return reason
    return None


def _strip_comment(line: str) -> str:
    return shlex.join(shlex.split(line, comments=True))


def run_console(block: Block, cwd: Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(mismatch reports, the block with the printed outputs, (command, reason) not run)."""
    commands: list[tuple[str, list[str]]] = []
    for ln in block.body:
        if ln.startswith("$ "):
            commands.append((ln[2:], []))
        elif commands:
            commands[-1][1].append(ln)
        elif ln.strip():
            raise AssertionError(f"{block.id}: output before the first `$ ` command: {ln!r}")
    problems: list[str] = []
    new_body: list[str] = []
    skipped: list[tuple[str, str]] = []
    status = 0
    for command, want_lines in commands:
        new_body.append(f"$ {command}")
        want = "\n".join(want_lines)
        reason = slow_reason(_strip_comment(command))
        if reason:
            check_parses(_strip_comment(command))
            skipped.append((command, reason))
            new_body.extend(want_lines)
            continue
        if command.strip() == "echo $?":
            got = f"{status}\n"
        else:
            status, got = run_command(command)
        got = _shown(got, cwd)
        if _matches(want, got, block.exact_numbers):
            new_body.extend(want_lines)
        else:
            problems.append(f"$ {command}\n" + _diff(want, got, block.id))
            new_body.extend(got.splitlines())
    return problems, new_body, skipped


# --------------------------------------------------------------------------------------------
# rewriting the pages (MIXPREC_UPDATE_DOCS=1)
# --------------------------------------------------------------------------------------------


def rewrite(block: Block, new_body: list[str]) -> None:
    """Replace ``block``'s body in its page, found by its original text (nearest its line)."""
    with open(block.path, "r+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        text = fh.read()
        lines = text.splitlines()
        old = [block.indent + ln if ln else ln for ln in block.body]
        n = len(old)
        starts = [
            i
            for i in range(len(lines) - n - 1)
            if _FENCE.match(lines[i])
            and lines[i + 1 : i + 1 + n] == old
            and lines[i + 1 + n].strip().startswith("```")
        ]
        if not starts:
            raise AssertionError(
                f"{block.id}: cannot find the block to rewrite (edited meanwhile?)"
            )
        i = min(starts, key=lambda s: abs(s + 1 - block.line))
        lines[i + 1 : i + 1 + n] = [block.indent + ln if ln else ln for ln in new_body]
        fh.seek(0)
        fh.write("\n".join(lines) + ("\n" if text.endswith("\n") else ""))
        fh.truncate()


def _doctest_body(block: Block, mismatches: list[tuple[doctest.Example, str]]) -> list[str]:
    body = list(block.body)
    for ex, got in sorted(mismatches, key=lambda m: -m[0].lineno):
        start = ex.lineno + ex.source.count("\n")
        if ex.exc_msg is not None:  # a new message for the same exception type: take it
            tail = got.split("Traceback (most recent call last):\n", 1)[-1].splitlines()
            msg = [ln for ln in tail if ln and not ln.startswith(" ")]
            if not msg or msg[0].split(":")[0] != ex.exc_msg.split(":")[0]:
                continue  # another exception type: a failure to look at, not an update
            got = "Traceback (most recent call last):\n  ...\n" + "\n".join(msg) + "\n"
        new = [" " * ex.indent + ln if ln.strip() else "<BLANKLINE>" for ln in got.splitlines()]
        body[start : start + ex.want.count("\n")] = new
    return body


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------


def _fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _state_for(block: Block, tmp_path_factory: pytest.TempPathFactory) -> PageState:
    required = needs(block)
    state = _STATES.get(block.path)
    if state is None or not (
        {b.index for b in required} <= set(state.done) and all(i < block.index for i in state.done)
    ):
        state = PageState(tmp_path_factory.mktemp(block.path.stem))
        _STATES[block.path] = state
        for dep in required:
            try:
                with _environment(state.cwd, _fresh_seed()):
                    if dep.kind == "doctest":
                        run_doctest(dep, state)
                    else:
                        run_script(dep, state)
            except Exception as exc:
                failed = f"{block.id} needs the names of {dep.id}, which raised\n{_traceback(exc)}"
                break
            state.done.append(dep.index)
        else:
            failed = ""
        if failed:
            pytest.fail(failed, pytrace=False)
    return state


@pytest.mark.parametrize("block", ALL_RUNNABLE, ids=lambda b: b.id)
def test_doc_block(block: Block, tmp_path_factory: pytest.TempPathFactory) -> None:
    if block.kind == "copy":
        check_copy(block)
        return
    if block.kind == "commands":
        check_commands(block)
        return
    state = _state_for(block, tmp_path_factory)
    seed = _fresh_seed()
    hint = (
        f"\n(The global RNGs were seeded with {seed} before the block: output that depends on "
        "them must come from a seed the block sets itself. MIXPREC_UPDATE_DOCS=1 rewrites the "
        "outputs; review them with git diff.)"
    )
    update = UPDATE
    if block.cpu is not None:
        hint += (
            "\n(The page's digits come from a CPU whose capability and vendor are "
            f"{block.cpu}; here: {MACHINE}"
        )
        if block.exact_numbers:
            hint += ".)"
        else:
            hint += ": only the text around the numbers is compared, and not rewritten here.)"
            update = False
    state.done.append(block.index)
    with _environment(state.cwd, seed):
        if block.kind == "doctest":
            report, mismatches = run_doctest(block, state)
            if report and update and mismatches:
                rewrite(block, _doctest_body(block, mismatches))
            if report:
                pytest.fail(report + hint, pytrace=False)
        elif block.kind == "script":
            try:
                got = _shown(run_script(block, state), state.cwd)
            except Exception as exc:
                got = exc
            if isinstance(got, Exception):
                pytest.fail(f"{block.id} raised\n{_traceback(got)}{hint}", pytrace=False)
            out = block.output
            if out is not None and not _matches(out.text, got, block.exact_numbers):
                if update:
                    rewrite(out, got.splitlines())
                pytest.fail(f"{block.id}: the script printed something else than {out.id} shows\n"
                            + _diff(out.text, got, out.id) + hint, pytrace=False)  # fmt: skip
        else:
            problems, new_body, skipped = run_console(block, state.cwd)
            if problems:
                if update:
                    rewrite(block, new_body)
                pytest.fail("\n\n".join(problems) + hint, pytrace=False)
            if skipped:
                skip_slow(block, skipped)


def skip_slow(block: Block, skipped: list[tuple[str, str]]) -> None:
    """The block passed its checks; say which commands were only parsed, and why."""
    reasons: dict[str, list[str]] = {}
    for command, reason in skipped:
        reasons.setdefault(reason, []).append(f"`{command}`")
    parts = [f"{', '.join(cmds)} parsed, not run ({why})" for why, cmds in reasons.items()]
    pytest.skip(f"{block.id}: " + "; ".join(parts))


def check_commands(block: Block) -> None:
    """A shell block without output: mixprec commands run (slow ones are parsed), nothing else."""
    skipped: list[tuple[str, str]] = []
    for ln in block.body:
        command = _strip_comment(ln) if ln.strip() and not ln.lstrip().startswith("#") else ""
        if not command:
            continue
        reason = slow_reason(command)
        if reason:
            check_parses(command)
            skipped.append((command, reason))
        else:
            status, got = run_command(command)
            assert status == 0, f"{block.id}: `{command}` exited with {status}:\n{got}"
    if skipped:
        skip_slow(block, skipped)


def check_copy(block: Block) -> None:
    source = ROOT / block.directive.split(None, 1)[1]
    outputs = [b for b in BLOCKS[source] if b.kind == "output"]
    if any(_normalise(b.text) == _normalise(block.text) for b in outputs):
        return
    like = max(outputs, key=lambda b: difflib.SequenceMatcher(None, b.text, block.text).ratio())
    pytest.fail(
        f"{block.id} quotes an output block of {source.relative_to(ROOT)} that is not there (any "
        f"more); the most similar one, which the update does not copy for you:\n"
        + _diff(block.text, like.text, block.id).replace("printed", like.id),
        pytrace=False,
    )


def test_every_code_fence_is_run() -> None:
    """Every python/console/shell fence of the pages is a test (a broken fence would hide some)."""
    names = "|".join(PYTHON | SHELL | {"console"})
    code = re.compile(rf"^\s*```({names})\s*$")
    for path in PAGES:
        fences = [ln for ln in path.read_text(encoding="utf-8").splitlines() if code.match(ln)]
        run = [b for b in RUNNABLE[path] if b.kind != "copy"]
        assert len(run) == len(fences), f"{path.name}: {len(fences)} code fences, {len(run)} run"
