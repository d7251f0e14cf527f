#!/usr/bin/env python3
"""Set-up-and-run entry point for a fresh clone: ``python3 scripts/dev.py COMMAND [args]``.

Commands: ``demo`` (the main job), ``test`` (what CI runs: ruff, then the whole suite),
``env`` (set up only), ``lock``.

Creates (or reuses) ``.venv`` and installs the development environment pinned by
``constraints.txt`` (every direct and transitive dependency at an exact version, pip and the build
backend included): the CPU torch first (a bare ``torch`` requirement would pull several GB of
CUDA wheels), then ``mixprec[dev]`` in editable mode, with that file as a pip constraint on every
install. Re-installs only when pyproject.toml, setup.py, the C kernel or the lock changed.

``lock`` rebuilds ``constraints.txt`` from the ranges in pyproject.toml in a scratch virtual
environment (torch held at its pin): a dependency upgrade is a deliberate commit of that file,
followed by a full test run. Needs nothing but python3 (3.11+).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
LOCK = ROOT / "constraints.txt"
TORCH = "torch==2.13.0"  # the CPU build; repeated in constraints.txt
BUILD = ("pip", "setuptools", "wheel")  # installed first, from the lock, so the build is pinned too
STAMP = VENV / ".mixprec-install-stamp"
LINTED = ("src", "tests", "benchmarks", "scripts")
LOCK_HEADER = """\
# Development/CI environment of mixprec: every dependency at an exact version.
# Used as a pip constraint by scripts/dev.py for every install. Users get the ranges in
# pyproject.toml. Regenerate deliberately with `python3 scripts/dev.py lock`, then run the tests.
"""


def _python(env: Path = VENV) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _fingerprint() -> str:
    h = hashlib.sha256(TORCH.encode())
    sources = sorted((ROOT / "src").rglob("*.c"))  # the C kernels: a change means a rebuild
    for path in [ROOT / "pyproject.toml", ROOT / "setup.py", *sources, ROOT / LOCK.name]:
        if path.exists():
            h.update(path.read_bytes())
    return h.hexdigest()


def _run(*args: str | os.PathLike[str]) -> None:
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT)


def _pip(py: Path, *args: str | os.PathLike[str]) -> None:
    _run(py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args)


def ensure_env() -> Path:
    if not LOCK.exists():
        raise SystemExit(f"{LOCK.name} is missing: run `python3 scripts/dev.py lock` first")
    if not _python().exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    fp = _fingerprint()
    if not STAMP.exists() or STAMP.read_text() != fp:
        py = _python()
        _pip(py, "-c", LOCK, *BUILD)
        _pip(py, "-c", LOCK, TORCH)  # the pinned CPU build before anything that depends on torch
        _pip(py, "-c", LOCK, "--no-build-isolation", "-e", ".[dev]")
        STAMP.write_text(fp)
    return _python()


def lock() -> int:
    """Resolve pyproject.toml's ranges afresh (torch held) and write constraints.txt."""
    with tempfile.TemporaryDirectory() as tmp:
        env = Path(tmp) / "venv"
        venv.create(env, with_pip=True)
        py = _python(env)
        hold = Path(tmp) / "hold.txt"
        hold.write_text(TORCH + "\n")
        _pip(py, "--upgrade", *BUILD)
        _pip(py, "-c", hold, TORCH)
        _pip(py, "-c", hold, "--no-build-isolation", ".[dev]")
        frozen = subprocess.run(
            [str(py), "-m", "pip", "freeze", "--all", "--exclude", "mixprec"],
            check=True, capture_output=True, text=True,
        ).stdout.splitlines()  # fmt: skip
    pins = sorted((_normalise(line) for line in frozen if "==" in line), key=str.lower)
    LOCK.write_text(LOCK_HEADER + "\n".join(pins) + "\n")
    print(f"wrote {len(pins)} pins to {LOCK}")
    return 0


def _normalise(pin: str) -> str:
    # "torch==2.13.0+cpu" -> "torch==2.13.0": the local label names the wheel, not the release
    name, version = pin.split("==", 1)
    return f"{name}=={version.split('+', 1)[0]}"


def main(argv: list[str]) -> int:
    commands = ("demo", "test", "env", "lock")
    if not argv or argv[0] not in commands:
        print(
            "usage: python3 scripts/dev.py demo [mixprec demo args] | test [pytest args] | env"
            " | lock"
        )
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "lock":
        return lock()
    py = ensure_env()
    if cmd == "env":
        return 0
    if cmd == "demo":
        return subprocess.call([str(py), "-m", "mixprec", "demo", *rest], cwd=ROOT)
    if rest:  # a developer's own selection: pytest only
        return subprocess.call([str(py), "-m", "pytest", *rest], cwd=ROOT)
    lint = [
        [str(py), "-m", "ruff", "check", *LINTED],
        [str(py), "-m", "ruff", "format", "--check", *LINTED],
    ]
    for cmd_ in lint:
        if subprocess.call(cmd_, cwd=ROOT) != 0:
            return 1
    return subprocess.call([str(py), "-m", "pytest", "-n", "2", "-q"], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
