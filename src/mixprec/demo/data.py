"""Data for ``mixprec demo``: nothing is downloaded, everything ships with the install.

* **digits**: the 1,797 8x8 handwritten digits (UCI optdigits) that scikit-learn bundles as
  ``sklearn/datasets/data/digits.csv.gz``. The file is located with ``importlib`` *without importing
  scikit-learn* (which costs ~1 s) and parsed with the standard library. Where scikit-learn is not
  installed, a deterministic stand-in is rendered from the DejaVu Sans glyphs that matplotlib (a
  runtime dependency) ships: random affine distortions of "0".."9" rasterised to 8x8 with 17 grey
  levels, the same shape and value range as the real data. The report says which one was used.
* **text**: docstrings of a fixed list of standard-library modules, read from the running
  interpreter's own ``.py`` sources (parsed with :mod:`ast`, so nothing is imported or executed).
  Where sources are not installed (zipped or ``.pyc``-only stdlib), the modules' runtime
  ``__doc__`` strings are used instead.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "VOCAB",
    "DigitsData",
    "TextData",
    "encode_text",
    "load_digits",
    "load_text",
]

# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsData:
    """Train/validation split of 8x8 digit images, pixels scaled to [0, 1]."""

    x_train: torch.Tensor  # (n, 64) float32
    y_train: torch.Tensor  # (n,) int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    source: str  # "sklearn-digits" or "synthetic-digits"
    sha256: str  # of the raw pixel/label bytes, so a report names exactly what it trained on


def _sklearn_digits_path() -> Path | None:
    """Path of scikit-learn's bundled ``digits.csv.gz``, found without importing sklearn."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _read_digits_csv(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(path, "rt", encoding="ascii") as fh:
        rows = [line.split(",") for line in fh.read().splitlines() if line.strip()]
    data = torch.tensor([[int(float(v)) for v in row] for row in rows], dtype=torch.int64)
    if data.ndim != 2 or data.shape[1] != 65:
        raise ValueError(f"{path} is not the 8x8 digits table (shape {tuple(data.shape)})")
    return data[:, :64].to(torch.float32), data[:, 64].clone()


def _synthetic_digits(n_per_class: int = 180, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Render "0".."9" from matplotlib's DejaVu Sans under random affine maps, 8x8, levels 0..16.

    Deterministic for a given matplotlib (the glyph outlines come from its bundled font file).
    """
    import numpy as np
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    rng = np.random.default_rng(seed)
    font = FontProperties(family="DejaVu Sans", weight="bold")
    sub = 4  # 4x4 supersampling per pixel -> 17 grey levels, as in optdigits
    grid = (np.arange(8 * sub) + 0.5) / (8 * sub)
    gx, gy = np.meshgrid(grid, 1.0 - grid)  # image rows go downwards
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    images, labels = [], []
    for digit in range(10):
        path = TextPath((0, 0), str(digit), size=1.0, prop=font)
        verts = path.vertices
        lo, hi = verts.min(axis=0), verts.max(axis=0)
        centre, extent = (lo + hi) / 2, float((hi - lo).max())
        for _ in range(n_per_class):
            angle = rng.normal(0.0, 0.15)
            scale = rng.uniform(0.7, 0.95) / extent
            shear = rng.normal(0.0, 0.15)
            aspect = rng.uniform(0.8, 1.15)
            c, s = math.cos(angle), math.sin(angle)
            m = np.array([[c, -s], [s, c]]) @ np.array([[aspect, shear], [0.0, 1.0]]) * scale
            shift = np.array([0.5, 0.5]) + rng.normal(0.0, 0.04, size=2)
            # map image points back into glyph space and test which fall inside the outline
            inv = np.linalg.inv(m)
            glyph_pts = (pts - shift) @ inv.T + centre
            inside = path.contains_points(glyph_pts).reshape(8 * sub, 8 * sub)
            img = inside.reshape(8, sub, 8, sub).sum(axis=(1, 3)).astype(np.float32)
            images.append(img.reshape(64))
            labels.append(digit)
    order = rng.permutation(len(labels))
    x = torch.from_numpy(np.stack(images)[order])
    return x, torch.tensor(labels, dtype=torch.int64)[order]


def load_digits(*, val_fraction: float = 0.25, seed: int = 0, source: str = "auto") -> DigitsData:
    """The 8x8 digits, split with a fixed permutation (``seed``) into train and validation.

    ``source``: ``"auto"`` (scikit-learn's file if present, else synthetic), ``"sklearn"`` or
    ``"synthetic"``. Cost: parsing a 1,797-line CSV (~20 ms), or rendering 1,800 glyphs (~1 s).
    """
    if source not in ("auto", "sklearn", "synthetic"):
        raise ValueError(f"source must be 'auto', 'sklearn' or 'synthetic', got {source!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    path = None if source == "synthetic" else _sklearn_digits_path()
    if path is None and source == "sklearn":
        raise FileNotFoundError("scikit-learn's digits.csv.gz was not found; is sklearn installed?")
    if path is not None:
        x, y = _read_digits_csv(path)
        name = "sklearn-digits"
    else:
        x, y = _synthetic_digits(seed=seed)
        name = "synthetic-digits"
    digest = hashlib.sha256(x.to(torch.uint8).numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    n_val = round(len(y) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    x = x / 16.0  # pixel counts 0..16 -> [0, 1]
    return DigitsData(x[train], y[train], x[val], y[val], name, digest)


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
