"""The ``sanitize()`` context manager: checks its arguments, runs the mode, freezes the report."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mixprec.formats import FloatFormat, get_format
from mixprec.sanitizer.attribution import ModuleTracker
from mixprec.sanitizer.mode import ShadowMode
from mixprec.sanitizer.report import Report

_SHADOWS = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
}

ModuleSelection = torch.nn.Module | Iterable[torch.nn.Module] | Callable[..., bool] | None


def _shadow_dtype(shadow: str | torch.dtype) -> torch.dtype:
    if isinstance(shadow, torch.dtype):
        sdt = shadow if shadow in (torch.float64, torch.float32) else None
    else:
        sdt = _SHADOWS.get(str(shadow).lower())
    if sdt is None:
        raise ValueError(f"shadow={shadow!r} is not supported; valid choices are float64, float32")
    return sdt


def _check_threshold(threshold_bits: float | None) -> None:
    if threshold_bits is None:
        return
    if isinstance(threshold_bits, bool) or not isinstance(threshold_bits, (int, float)):
        raise TypeError(f"threshold_bits must be a number or None, got {threshold_bits!r}")
    if not 0 < threshold_bits <= 53:
        raise ValueError(f"threshold_bits={threshold_bits} must be in (0, 53] or None")


def _check_modules(modules: Any) -> Any:
    if modules is None or isinstance(modules, torch.nn.Module) or callable(modules):
        return modules
    if isinstance(modules, Iterable) and not isinstance(modules, (str, bytes)):
        return list(modules)
    raise TypeError(
        "modules= takes None, an nn.Module, an iterable of nn.Module or a callable "
        f"(module, fqn) -> bool; got {type(modules).__name__}"
    )


def _hint_format(dtype_hint: str | FloatFormat | torch.dtype | None) -> FloatFormat | None:
    if dtype_hint is None:
        return None
    if isinstance(dtype_hint, torch.dtype):
        return get_format(str(dtype_hint).replace("torch.", ""))
    return get_format(dtype_hint)


def _check_memory(mib: float | None) -> float:
    """``shadow_memory_mib`` in bytes (None: no limit)."""
    if mib is None:
        return float("inf")
    if isinstance(mib, bool) or not isinstance(mib, (int, float)):
        raise TypeError(f"shadow_memory_mib must be a number of MiB or None, got {mib!r}")
    if not mib >= 0:
        raise ValueError(f"shadow_memory_mib={mib} must be >= 0 (MiB) or None (no limit)")
    return float(mib) * 2**20


def _describe_modules(modules: Any) -> str:
    if isinstance(modules, torch.nn.Module):
        return type(modules).__name__
    if callable(modules):
        return getattr(modules, "__name__", "filter_fn")
    return ",".join(type(m).__name__ for m in modules)


@dataclass(frozen=True)
class _Settings:
    """The checked arguments of one :func:`sanitize` call."""

    shadow: torch.dtype
    threshold_bits: float | None
    track_grads: bool
    modules: Any
    hint: FloatFormat | None
    memory: float  # bytes of float64 shadows kept uncompressed

    @classmethod
    def check(
        cls,
        shadow: str | torch.dtype,
        threshold_bits: float | None,
        track_grads: bool,
        modules: ModuleSelection,
        dtype_hint: str | FloatFormat | torch.dtype | None,
        shadow_memory_mib: float | None,
    ) -> _Settings:
        """Validate in argument order: the first bad one raises (TypeError / ValueError)."""
        sdt = _shadow_dtype(shadow)
        _check_threshold(threshold_bits)
        if not isinstance(track_grads, bool):
            raise TypeError(f"track_grads must be True or False, got {track_grads!r}")
        modules = _check_modules(modules)
        hint, memory = _hint_format(dtype_hint), _check_memory(shadow_memory_mib)
        return cls(sdt, threshold_bits, track_grads, modules, hint, memory)

    def config(self) -> dict[str, Any]:
        """The report's ``config`` (JSON-ready)."""
        return {
            "shadow": str(self.shadow).replace("torch.", ""),
            "threshold_bits": self.threshold_bits,
            "track_grads": self.track_grads,
            "modules": None if self.modules is None else _describe_modules(self.modules),
            "dtype_hint": None if self.hint is None else self.hint.name,
            "shadow_memory_mib": None if self.memory == float("inf") else self.memory / 2**20,
        }

    def engine(self) -> ShadowMode:
        return ShadowMode(
            shadow_dtype=self.shadow,
            threshold_bits=self.threshold_bits,
            track_grads=self.track_grads,
            tracker=ModuleTracker(self.modules),
            dtype_hint=self.hint,
            memory=self.memory,
        )


@contextmanager
def sanitize(
    *,
    shadow: str | torch.dtype = "float64",
    threshold_bits: float | None = None,
    track_grads: bool = True,
    modules: ModuleSelection = None,
    dtype_hint: str | FloatFormat | torch.dtype | None = None,
    shadow_memory_mib: float | None = 64.0,
) -> Iterator[Report]:
    """Run the enclosed code under the numerical sanitizer; yields a live :class:`Report`.

    Args:
        shadow: shadow precision, ``"float64"`` (default) or ``"float32"`` (cheaper; only
            shadows float16/bfloat16 tensors).
        threshold_bits: flag an op when it loses more than this many significand bits locally.
            ``None``: half the mantissa bits of each result's format.
        track_grads: also shadow backward ops and collect gradient histograms.
        modules: restrict checking to these modules (and their submodules): an ``nn.Module``
            (fully qualified names are then taken from it), an iterable of modules, or a
            ``filter_fn(module, fqn) -> bool``. Ops outside them run unshadowed, and tensors
            entering a watched module are taken as exact.
        dtype_hint: the format float32 tensors really hold (emulated formats, e.g. inside
            ``mixprec.autocast(..., emulate=True)``): thresholds, range checks and the rounding
            of local-error inputs then use it. Code that rounds with non-aten kernels should
            also call :func:`record_rounding`.
        shadow_memory_mib: float64 shadows are kept as they are up to this much memory (MiB);
            beyond it, shadows that have lived more than a few ops (activations saved for
            backward) are compressed to float32 residuals ``shadow - real``: about half the
            memory, at three extra passes over each (compress, rebuild when used). ``0``:
            always compress; ``None``: never.

    Leaving the context, also by an exception, removes everything it installed (dispatch mode,
    module and tensor hooks, the quantize observer) and freezes the report.

    Cost: every aten op that rounds runs twice (once in float64) plus one or two fused passes
    over each result; suspicious ops run a third time; views cost nothing. A shadow costs a
    float64 copy (a float32 residual beyond ``shadow_memory_mib``); shadows are freed with the
    real tensors. One host sync per op output (CPU: free; CUDA: a sync per op). Measured on the
    reference transformer's training step: ~4.1x the time, ~2.6x the live memory
    (benchmarks/sanitize.py).
    """
    settings = _Settings.check(
        shadow, threshold_bits, track_grads, modules, dtype_hint, shadow_memory_mib
    )
    report = Report(settings.config())
    engine = settings.engine()
    engine.start()
    report._attach(engine)
    try:
        yield report
    finally:
        engine.stop()
        report._freeze()
