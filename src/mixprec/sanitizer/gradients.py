"""Gradient magnitude histograms: collection during a run, and the public :class:`GradHistogram`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mixprec.formats import FloatFormat
from mixprec.sanitizer.passes import grad_stats

HIST_OFFSET = 1100  # histogram bin index = floor(log2|g|) + HIST_OFFSET (fp64 range -1074..1023)
HIST_BINS = 2200


class GradCollector:
    """log2-magnitude histograms of gradients (exact fp64 shadow values where available).

    Tensors above ``max_elems`` elements are binned on an evenly strided sample of about
    ``max_elems`` elements (the maximum is always exact); ``sampled`` counts how many were.
    """

    def __init__(self, max_elems: int = 1 << 16) -> None:
        self.max_elems = max_elems
        self.sampled: dict[str, int] = {}
        # (kind, exponent shift) -> summed bincount of biased exponents, on the device
        self._raw: dict[tuple[str, int], torch.Tensor] = {}
        self.max_abs: dict[str, float] = {}
        self.tensors: dict[str, int] = {}

    def add(self, kind: str, g: torch.Tensor, smax: float | None = None) -> None:
        """Bin ``g`` by its exponent field over a sample of at most ``max_elems`` elements, and
        note its largest finite magnitude (``smax`` when it is already known).

        float64 (shadows) bins exactly; a float32 gradient's subnormals land in the zero count.
        Cost: one C pass and no torch op for a dense float32/float64 CPU tensor
        (:meth:`add_fast`), a copy first for other strided ones; else bit ops, a bincount and
        an aminmax pass (torch ops).
        """
        if self.add_fast(kind, g, smax):
            return
        # a strided view (a module output such as x[:, 0]): one copy, then the kernel, instead
        # of the torch path's ten ops (~150 us); the same sample, in logical order
        strided = g.layout == torch.strided and g.dtype in (torch.float32, torch.float64)
        if strided and g.is_cpu and self.add_fast(kind, g.detach().contiguous(), smax):
            return
        self._add_torch(kind, g.detach(), smax)

    def add_fast(self, kind: str, g: torch.Tensor, smax: float | None = None) -> bool:
        """:meth:`add` in the C kernel, without any torch op; False (nothing done) where the
        kernel does not apply."""
        n = g.numel()
        if n == 0 or g.dtype not in (torch.float32, torch.float64):
            return False
        shift = 52 if g.dtype == torch.float64 else 23
        acc = self._counts(kind, shift, g.device)
        step = -(-n // self.max_elems)
        mx = grad_stats(g, acc, step)
        if mx is None:
            return False
        self._note(kind, smax if smax is not None and math.isfinite(smax) else mx, step > 1)
        return True

    def _add_torch(self, kind: str, g: torch.Tensor, smax: float | None) -> None:
        if not g.is_floating_point() or g.numel() == 0:
            return
        g = g.reshape(-1) if g.is_contiguous() else g.flatten()
        mx = _max_abs(g) if smax is None else smax
        if not math.isfinite(mx):  # rare: max over the finite values only
            fin = g[torch.isfinite(g)]
            mx = float(fin.abs().max()) if fin.numel() else 0.0
        sampled = g.numel() > self.max_elems
        if sampled:  # the shape of the distribution, from a sample
            g = g[:: -(-g.numel() // self.max_elems)]
        if g.dtype not in (torch.float32, torch.float64):
            g = g.float()
        shift, mask = (52, 0x7FF) if g.dtype == torch.float64 else (23, 0xFF)
        self._counts(kind, shift, g.device).add_(_bincount(g, shift, mask))
        self._note(kind, mx, sampled)

    def _counts(self, kind: str, shift: int, device: torch.device) -> torch.Tensor:
        """The exponent counts of ``kind`` for one float width (``shift``: 23 or 52). They stay
        on the device, summed: no host sync per gradient (:meth:`_fold` reads them once)."""
        acc = self._raw.get((kind, shift))
        if acc is None:
            size = 2048 if shift == 52 else 256
            acc = self._raw[(kind, shift)] = torch.zeros(size, dtype=torch.int64, device=device)
        return acc

    def _note(self, kind: str, mx: float, sampled: bool) -> None:
        self.max_abs[kind] = max(self.max_abs.get(kind, 0.0), mx)
        self.tensors[kind] = self.tensors.get(kind, 0) + 1
        if sampled:
            self.sampled[kind] = self.sampled.get(kind, 0) + 1

    def _fold(self) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, int]]:
        """(log2 bins, zeros, non-finite) per kind, from the exponent counts."""
        counts: dict[str, torch.Tensor] = {}
        zeros: dict[str, int] = {}
        nonfinite: dict[str, int] = {}
        for (kind, shift), raw in self._raw.items():
            c = raw.cpu()
            mask, bias = (0x7FF, 1023) if shift == 52 else (0xFF, 127)
            if kind not in counts:
                counts[kind] = torch.zeros(HIST_BINS, dtype=torch.int64)
            # biased exponent b in 1..mask-1 holds [2^(b-bias), 2^(b-bias+1))
            start = 1 - bias + HIST_OFFSET
            counts[kind][start : start + mask - 1] += c[1:mask]
            zeros[kind] = zeros.get(kind, 0) + int(c[0])
            nonfinite[kind] = nonfinite.get(kind, 0) + int(c[mask])
        return counts, zeros, nonfinite

    def data(self, track_grads: bool) -> dict[str, Any] | None:
        """The histograms trimmed to their non-empty bins (the report's ``gradients``)."""
        if not self._raw:
            return {"counts": {}} if track_grads else None
        counts, zeros, nonfinite = self._fold()
        nonzero = [i for c in counts.values() for i in c.nonzero().reshape(-1).tolist()]
        # every gradient zero or non-finite: keep one (empty) bin, at 2^0
        lo, hi = (min(nonzero), max(nonzero)) if nonzero else (HIST_OFFSET, HIST_OFFSET)
        return {
            "bin_lo": lo - HIST_OFFSET,
            "counts": {k: c[lo : hi + 1].tolist() for k, c in counts.items()},
            "zeros": zeros,
            "nonfinite": nonfinite,
            "max_abs": dict(self.max_abs),
            "tensors": dict(self.tensors),
            "sampled": dict(self.sampled),
        }


def _bincount(g: torch.Tensor, shift: int, mask: int) -> torch.Tensor:
    """Counts of ``g``'s biased exponent field (``shift``, ``mask``: its place in the bits)."""
    bits = g.view(torch.int64 if g.dtype == torch.float64 else torch.int32)
    e = torch.bitwise_and(bits >> shift, mask)
    if e.device.type != "cpu" and torch.are_deterministic_algorithms_enabled():
        e = e.cpu()  # CUDA's bincount refuses deterministic mode: count on the host
    return torch.bincount(e, minlength=mask + 1).to(g.device)


def _max_abs(g: torch.Tensor) -> float:
    lo, hi = torch.aminmax(g)
    return max(-float(lo), float(hi))


@dataclass(frozen=True)
class GradHistogram:
    """log2-magnitude histograms of gradients against a target format's range.

    ``counts[kind][i]`` is the number of finite non-zero gradient values ``g`` of ``kind``
    (``"activation"``: gradients w.r.t. module outputs; ``"weight"``: gradients of leaf tensors,
    i.e. parameters) with ``floor(log2|g|) == bin_lo + i``. Values are the float64 shadows of
    the gradients where the sanitizer has them (so a float16 run shows what float16 lost).
    Fractions are of the finite non-zero values and are computed from the bins: a value flushes
    to zero when it is below ``min_subnormal / 2`` (exact except for values equal to that tie),
    is subnormal between that and ``min_normal``, overflows from ``2^(emax+1)`` up (values in
    ``[max, 2^(emax+1))`` are counted as not overflowing).
    ``recommended_loss_scale`` is the largest power of two ``S`` with ``max|g| * S <= fmt.max``
    over all kinds; ``flush_to_zero_scaled`` is the flush fraction after multiplying by it.
    """

    fmt: str
    bin_lo: int
    counts: dict[str, tuple[int, ...]]
    zeros: dict[str, int]
    nonfinite: dict[str, int]
    max_abs: dict[str, float]
    flush_to_zero: dict[str, float]
    subnormal: dict[str, float]
    overflow: dict[str, float]
    recommended_loss_scale: float | None
    flush_to_zero_scaled: dict[str, float]
    min_subnormal: float
    min_normal: float
    max: float

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.counts)

    def total(self, kind: str) -> int:
        return int(sum(self.counts[kind]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = {k: list(v) for k, v in self.counts.items()}
        return d

    def plot(self, path: str | os.PathLike[str]) -> str:
        """Write the histogram figure (one panel per kind) as a PNG; returns the path."""
        from mixprec.sanitizer.render import plot_grad_histogram

        return plot_grad_histogram(self, path)


def _loss_scale(max_all: float, f: FloatFormat) -> float | None:
    """The largest power of two S with max_all * S <= f.max (None without a finite maximum)."""
    if not (max_all > 0 and math.isfinite(max_all)):
        return None
    k = math.floor(math.log2(f.max / max_all))
    while max_all * 2.0**k > f.max:  # guard log2 rounding
        k -= 1
    return 2.0**k


def make_histogram(data: dict[str, Any], f: FloatFormat) -> GradHistogram:
    """The histogram of a report's gradient data (:meth:`GradCollector.data`) against ``f``."""
    lo = int(data["bin_lo"])
    counts = {k: tuple(int(x) for x in v) for k, v in data["counts"].items()}
    # bin e holds [2^e, 2^(e+1)); min_subnormal = 2^m
    m = round(math.log2(f.min_subnormal))
    n = round(math.log2(f.min_normal))
    emax = math.floor(math.log2(f.max))

    def frac(pred: Callable[[int], bool], shift: int = 0) -> dict[str, float]:
        return {k: _fraction(c, lo + shift, pred) for k, c in counts.items()}

    def flush(e: int) -> bool:
        return e <= m - 2  # whole bin below min_subnormal / 2

    scale = _loss_scale(max(data["max_abs"].values(), default=0.0), f)
    return GradHistogram(
        fmt=f.name,
        bin_lo=lo,
        counts=counts,
        zeros={k: int(v) for k, v in data.get("zeros", {}).items()},
        nonfinite={k: int(v) for k, v in data.get("nonfinite", {}).items()},
        max_abs={k: float(v) for k, v in data.get("max_abs", {}).items()},
        flush_to_zero=frac(flush),
        subnormal=frac(lambda e: m - 1 <= e < n),
        overflow=frac(lambda e: e > emax),
        recommended_loss_scale=scale,
        flush_to_zero_scaled=frac(flush, 0 if scale is None else round(math.log2(scale))),
        min_subnormal=f.min_subnormal,
        min_normal=f.min_normal,
        max=f.max,
    )


def _fraction(c: tuple[int, ...], lo: int, pred: Callable[[int], bool]) -> float:
    """Fraction of the counts whose bin exponent (``lo + i``) satisfies ``pred``."""
    tot = sum(c)
    if tot == 0:
        return 0.0
    return sum(x for i, x in enumerate(c) if pred(lo + i)) / tot
