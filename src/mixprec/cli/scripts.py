"""Running a user's Python script as ``__main__``, for the subcommands that wrap one
(``mixprec run``, and the same command-line shape as ``mixprec sanitize``).

The command line is ``mixprec CMD [options] script.py [script args] [options] [-- args]``: the
subcommand's own options may appear before or after the script path; everything else after the
script path goes to the script, and everything after a bare ``--`` goes to the script verbatim
(for script options named like the subcommand's). :func:`prepare_script` checks all of it before
anything runs, so a bad option is a usage error and the script does not start.

:func:`run_script` ends like ``python script.py``: ``sys.exit(N)`` gives status N,
``sys.exit()``/``sys.exit(None)`` give 0, ``sys.exit("message")`` prints the message to stderr
and gives 1, an uncaught exception prints its traceback from the script's own frames on and
gives 1, Ctrl-C (``KeyboardInterrupt``) gives 130.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn


@dataclass(frozen=True)
class ScriptOption:
    """One of a subcommand's own options (accepted before and after the script path)."""

    flag: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    action: str | None = None

    def add_to(self, p: argparse.ArgumentParser, *, defaults: bool) -> None:
        # without defaults (the late parser): options not given stay as the first parse set them
        kw: dict[str, Any] = {"default": self.default if defaults else argparse.SUPPRESS}
        for name in ("type", "metavar", "choices", "action"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        p.add_argument(self.flag, help=self.help, **kw)


def add_script_arguments(parser: argparse.ArgumentParser, options: Sequence[ScriptOption]) -> None:
    """``options`` and the script with its arguments, on a subcommand's parser."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the usage block
    for option in options:
        option.add_to(parser, defaults=True)
    # one REMAINDER positional (not script + REMAINDER): argparse then keeps a "--" that
    # follows the script path, which split_script_args needs to see. Its dest may not be
    # "command", the subparsers' dest: it would replace the subcommand's name.
    parser.add_argument(
        "script_command",
        nargs=argparse.REMAINDER,
        metavar="script.py [args]",
        help="the script and its arguments (mixprec options may follow)",
    )


class _LateOptionError(Exception):
    """A bad option after the script path (reported through the real parser)."""


class _LateParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _LateOptionError(message)


def split_script_args(
    args: argparse.Namespace, options: Sequence[ScriptOption], command: str
) -> tuple[str, list[str]]:
    """(script, its argv): ``options`` after the script path (up to a bare ``--``) are the
    subcommand's and are set on ``args``. A bad one raises ValueError with argparse's message."""
    words = list(args.script_command)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise ValueError(f"missing the script to run: mixprec {command} script.py [args]")
    script, rest = words[0], words[1:]
    verbatim: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, verbatim = rest[:i], rest[i + 1 :]
    late = _LateParser(prog=f"mixprec {command}", add_help=False, allow_abbrev=False)
    for option in options:
        option.add_to(late, defaults=False)
    try:
        ns, unknown = late.parse_known_args(rest)
    except _LateOptionError as exc:
        raise ValueError(str(exc)) from None
    for k, v in vars(ns).items():
        setattr(args, k, v)
    return script, unknown + verbatim


def prepare_script(args: argparse.Namespace, options: Sequence[ScriptOption], command: str) -> None:
    """Split off the script and its arguments into ``args.script`` / ``args.script_argv`` and
    check that the script is a file; ValueError if not."""
    script, script_argv = split_script_args(args, options, command)
    if not os.path.exists(script):
        raise ValueError(f"cannot run script {script!r}: no such file or directory")
    if not os.path.isfile(script):
        raise ValueError(f"cannot run script {script!r}: it is not a regular file")
    args.script, args.script_argv = script, script_argv


def script_check(
    prepare: Callable[[argparse.Namespace], None],
) -> Callable[[argparse.Namespace, argparse.ArgumentParser], None]:
    """A subcommand's ``check(args, parser)``: runs ``prepare(args)`` (which splits off the
    script and checks every option, also those after the script path) before anything runs,
    and reports its ValueError as a usage error."""

    def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
        try:
            prepare(args)
        except ValueError as exc:
            parser.error(str(exc))

    return check


def _script_frames(tb: TracebackType | None, script: str) -> TracebackType | None:
    """The traceback from the script's first frame on (python shows no runpy/mixprec frames)."""
    target = os.path.abspath(script)
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != target:
        tb = tb.tb_next
    return tb


def exit_status(exc: BaseException, script: str) -> int:
    """Print what python prints when a script ends with ``exc``; return python's exit status."""
    sys.stdout.flush()
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return int(code)  # sys.exit(True) is status 1
        print(code, file=sys.stderr)  # sys.exit("message"): the message, status 1
        return 1
    traceback.print_exception(type(exc), exc, _script_frames(exc.__traceback__, script))
    sys.stderr.flush()
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def run_script(script: str, script_argv: Sequence[str]) -> int:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *script_argv]`` and its folder
    first on ``sys.path`` (as ``python script.py`` does); return python's exit status. Both are
    restored afterwards, however the script ended."""
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script, *script_argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except (SystemExit, KeyboardInterrupt, Exception) as exc:
        return exit_status(exc, script)
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path
    return 0
