#!/usr/bin/env python3
"""Set-up-and-run entry point for a fresh clone: ``python3 scripts/dev.py demo|test [args]``.

Creates (or reuses) ``.venv``, installs the pinned CPU torch first (a bare ``torch`` requirement
would pull several GB of CUDA wheels), then ``mixprec[dev]`` in editable mode, and runs the
demo or the test suite. Re-installs only when pyproject.toml, setup.py or the C kernel changed.
Needs nothing but python3 (3.11+).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"
STAMP = VENV / ".mixprec-install-stamp"


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _fingerprint() -> str:
    h = hashlib.sha256(TORCH.encode())
    for rel in ("pyproject.toml", "setup.py", "src/mixprec/_kernels.c"):
        path = ROOT / rel
        if path.exists():
            h.update(path.read_bytes())
    return h.hexdigest()


def _run(*args: str | os.PathLike[str]) -> None:
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT)


def ensure_env() -> Path:
    if not _python().exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    fp = _fingerprint()
    if not STAMP.exists() or STAMP.read_text() != fp:
        py = _python()
        _run(py, "-m", "pip", "install", "-q", "--upgrade", "pip")
        _run(py, "-m", "pip", "install", "-q", TORCH)  # pinned CPU build before anything else
        _run(py, "-m", "pip", "install", "-q", "-e", ".[dev]")
        STAMP.write_text(fp)
    return _python()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "env"):
        print("usage: python3 scripts/dev.py demo [mixprec demo args] | test [pytest args] | env")
        return 2
    py = ensure_env()
    cmd, rest = argv[0], argv[1:]
    if cmd == "env":
        return 0
    if cmd == "demo":
        return subprocess.call([str(py), "-m", "mixprec", "demo", *rest], cwd=ROOT)
    args = rest or ["-n", "2", "-q"]
    return subprocess.call([str(py), "-m", "pytest", *args], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
