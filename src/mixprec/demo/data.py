"""Data for ``mixprec demo``: nothing is downloaded, everything ships with the install.

* **digits**: the 1,797 8x8 handwritten digits of the UCI "Optical Recognition of Handwritten
  Digits" test set (Alpaydin & Kaynak, CC BY 4.0), shipped as ``data_files/digits.csv.gz`` (53 KB;
  source, licence and provenance in ``data_files/README.txt``). Its checksum is verified on
  every load, so every install trains on exactly the same images.
* **text**: docstrings of a fixed list of standard-library modules, read from the running
  interpreter's own ``.py`` sources (parsed with :mod:`ast`, so nothing is imported or executed).
  Where sources are not installed (zipped or ``.pyc``-only stdlib), the modules' runtime
  ``__doc__`` strings are used instead.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.resources
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------

DIGITS_FILE = "data_files/digits.csv.gz"  # relative to the mixprec.demo package
#: sha256 of the decompressed CSV (byte-identical to scikit-learn 1.9.1's bundled copy)
DIGITS_CSV_SHA256 = "6ebb3d2fee246a4e99363262ddf8a00a3c41bee6014c373ed9d9216ba7f651b8"
DIGITS_NAME = "uci-optdigits"


@dataclass(frozen=True)
class DigitsData:
    """Train/validation split of 8x8 digit images, pixels scaled to [0, 1]."""

    x_train: torch.Tensor  # (n, 64) float32
    y_train: torch.Tensor  # (n,) int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    source: str  # DIGITS_NAME
    sha256: str  # of the raw pixel/label bytes, so a report names exactly what it trained on


def _shipped_digits_csv() -> bytes:
    """The shipped CSV's bytes, checked against :data:`DIGITS_CSV_SHA256`."""
    resource = importlib.resources.files("mixprec.demo").joinpath(DIGITS_FILE)
    try:
        text = gzip.decompress(resource.read_bytes())
    except OSError as exc:  # missing, unreadable or not gzip
        raise FileNotFoundError(
            f"mixprec/demo/{DIGITS_FILE} is missing or unreadable ({exc}); the installation is "
            "incomplete: reinstall mixprec"
        ) from None
    digest = hashlib.sha256(text).hexdigest()
    if digest != DIGITS_CSV_SHA256:
        raise ValueError(
            f"mixprec/demo/{DIGITS_FILE} has sha256 {digest}, expected {DIGITS_CSV_SHA256}: "
            "the file was modified; reinstall mixprec"
        )
    return text


def read_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as (pixels (1797, 64) int64 in 0..16, labels (1797,) int64 in 0..9).

    Cost: decompressing, hashing and parsing 53 KB (~50 ms).
    """
    rows = _shipped_digits_csv().decode("ascii").split()
    data = torch.tensor([[int(v) for v in row.split(",")] for row in rows], dtype=torch.int64)
    return data[:, :64].clone(), data[:, 64].clone()


def load_digits(*, val_fraction: float = 0.25, seed: int = 0) -> DigitsData:
    """The shipped 8x8 digits, split with a fixed permutation (``seed``) into train and validation.

    Cost: :func:`read_digits` (~50 ms).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    x, y = read_digits()
    digest = hashlib.sha256(x.to(torch.uint8).numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    n_val = round(len(y) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    pixels = x.to(torch.float32) / 16.0  # pixel counts 0..16 -> [0, 1]
    return DigitsData(pixels[train], y[train], pixels[val], y[val], DIGITS_NAME, digest)


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------

# Fixed order; modules missing from an interpreter are skipped (the report lists those used).
TEXT_MODULES: tuple[str, ...] = (
    "difflib", "logging/__init__", "typing", "inspect", "statistics", "threading",
    "email/message", "unittest/case", "tarfile", "subprocess", "os", "collections/__init__",
    "argparse", "json/__init__", "zipfile", "enum", "socket", "pathlib", "random", "textwrap",
    "functools", "fractions", "contextlib", "pickle", "calendar", "dataclasses", "heapq",
    "pprint", "bisect", "fnmatch", "string", "shlex", "_pydecimal",
)  # fmt: skip

# 95 printable ASCII characters and newline; anything else maps to UNK (index 96).
VOCAB: str = "".join(chr(c) for c in range(32, 127)) + "\n"
_UNK = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1


@dataclass(frozen=True)
class TextData:
    """A character stream split into train and validation (the last ``val_fraction``)."""

    train: torch.Tensor  # (n,) int64 character ids
    val: torch.Tensor
    vocab_size: int
    source: str  # "stdlib-docstrings (sources)" or "stdlib-docstrings (runtime __doc__)"
    modules: tuple[str, ...]
    n_chars: int
    sha256: str


def encode_text(text: str) -> torch.Tensor:
    """Character ids in :data:`VOCAB` (tabs become four spaces, anything else unknown -> UNK)."""
    table = {ch: i for i, ch in enumerate(VOCAB)}
    text = text.replace("\t", "    ")
    return torch.tensor([table.get(ch, _UNK) for ch in text], dtype=torch.int64)


def _docstrings_from_source(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):  # breadth-first, deterministic for a given file
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def _docstrings_from_runtime(module: str) -> list[str]:
    import importlib

    try:
        mod = importlib.import_module(module.removesuffix("/__init__").replace("/", "."))
    except ImportError:
        return []
    docs = [mod.__doc__] if mod.__doc__ else []
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if getattr(obj, "__module__", None) == mod.__name__ and getattr(obj, "__doc__", None):
            docs.append(obj.__doc__)
    return docs


def load_text(*, max_chars: int = 300_000, val_fraction: float = 0.1) -> TextData:
    """Docstrings of the standard library's own modules as one character stream.

    Modules are read in :data:`TEXT_MODULES` order until ``max_chars`` characters are collected.
    Cost: parsing a few stdlib files with :mod:`ast` (~0.3 s).
    """
    if max_chars < 1000:
        raise ValueError(f"max_chars must be at least 1000, got {max_chars!r}")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction!r}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not (stdlib / "os.py").is_file():  # e.g. a zipped stdlib: fall back to os's directory
        stdlib = Path(os.__file__).parent
    from_source = (stdlib / "difflib.py").is_file()
    pieces: list[str] = []
    used: list[str] = []
    total = 0
    for module in TEXT_MODULES:
        path = stdlib / f"{module}.py"
        if from_source:
            if not path.is_file():
                continue
            docs = _docstrings_from_source(path)
        else:
            docs = _docstrings_from_runtime(module)
        if not docs:
            continue
        used.append(module)
        for doc in docs:
            pieces.append(doc)
            total += len(doc) + 2
        if total >= max_chars:
            break
    text = "\n\n".join(pieces)[:max_chars]
    if len(text) < 1000:
        raise FileNotFoundError(
            f"found only {len(text)} characters of standard-library docstrings under {stdlib}"
        )
    ids = encode_text(text)
    n_val = int(len(ids) * val_fraction)
    source = "stdlib-docstrings (sources)" if from_source else "stdlib-docstrings (runtime __doc__)"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return TextData(ids[:-n_val], ids[-n_val:], VOCAB_SIZE, source, tuple(used), len(text), digest)
