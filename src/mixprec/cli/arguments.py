"""argparse ``type=`` callables shared by the ``mixprec`` subcommands.

Each one checks a single option value while the command line is parsed, before a subcommand
runs anything, and raises :class:`argparse.ArgumentTypeError` naming the bad value and what is
accepted; argparse then prints ``usage: mixprec CMD ...`` and
``mixprec CMD: error: argument --OPTION: MESSAGE`` and exits with status 2. They return the value
converted (``int``, ``float``, ``Path``) or, for names checked against the library (formats,
recipe lists), the text unchanged, so the subcommand passes to the library what the user wrote.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer ``low <= n`` (``<= high`` too when given)."""

    def parse(text: str) -> int:
        want = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {want}") from None
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {want}")
        return n

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        want = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {want}") from None
        if not math.isfinite(x) or x > high or x < low or (low_open and x == low):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {want}")
        return x

    parse.__name__ = "number"
    return parse


def checked_by(check: Callable[[str], object], name: str) -> Callable[[str], str]:
    """An argparse type that lets the library judge a value: ``check(text)``'s ValueError or
    TypeError (whose message names the valid choices) becomes the usage error, and the text is
    passed on unchanged, so the subcommand hands the library what the user wrote."""

    def parse(text: str) -> str:
        try:
            check(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _get_format(text: str) -> object:
    from mixprec.formats import get_format  # not at import time: ``mixprec --help`` stays light

    return get_format(text)


#: A format name, alias or custom ``eXmY`` that :func:`mixprec.formats.get_format` accepts.
format_name = checked_by(_get_format, "format")


def format_list(text: str) -> str:
    """A comma-separated list of format names (at least one)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected one or more comma-separated format names"
        )
    for name in names:
        format_name(name)
    return text


def existing_file(text: str) -> Path:
    """A path to an existing regular file."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file: no such file or directory")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise argparse.ArgumentTypeError(f"{text!r} is not a file: it is {kind}")
    return path


def python_file(text: str) -> Path:
    """An existing ``.py`` file."""
    path = existing_file(text)
    if path.suffix != ".py":
        raise argparse.ArgumentTypeError(f"{text!r} is not a .py file")
    return path


def output_dir(text: str) -> Path:
    """A directory to write into: it may not exist yet (it is created), but may not be a file."""
    if not text:
        raise argparse.ArgumentTypeError("invalid value '': expected a directory path")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    for parent in path.parents:  # the first existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{str(parent)!r} is not a directory")
            break
    return path
