"""Precision recipes of the mixed-precision paper's ablation, and the engine that trains with them.

A :class:`Recipe` says *what* is in which format (GEMM inputs, GEMM outputs, gradients, weight
storage, loss scaling); an :class:`Engine` makes one training run follow it:

* ``with engine.autocast(): loss = loss_fn(model(x))`` — the forward pass with every GEMM
  (``F.linear``, ``matmul``, ``bmm``, ...) fed rounded inputs and its output rounded; the
  backward pass rounds the gradient flowing into each GEMM output and out of each GEMM input to the
  recipe's gradient format. That is where fp16's narrow range flushes small gradients to zero.
* ``engine.backward(loss)`` multiplies by the loss scale first;
* ``engine.step()`` unscales, skips the step on inf/NaN (dynamic scaling), steps the optimizer and,
  without master weights, rounds the weights back into the compute format, which is where updates
  smaller than half a weight's spacing are lost. It counts both effects.

The engine rounds with :func:`mixprec.fake_quantize`-style straight-through functions (bit-exact
:func:`mixprec.quantize`), inside a ``TorchFunctionMode`` that is active only within
``engine.autocast()``; nothing is patched globally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mixprec.formats.float_format import FloatFormat, get_format
from mixprec.quantization.elementwise import quantize, quantize_

__all__ = [
    "DEFAULT_FORMATS",
    "RECIPES",
    "Engine",
    "GradientProbe",
    "MixprecEngine",
    "Recipe",
    "make_engine",
    "mixprec_available",
    "probe_gradients",
    "resolve_recipes",
]


@dataclass(frozen=True)
class Recipe:
    """One precision recipe.

    Attributes:
        id: short name used on the command line and in the report (``"fp16-O2"``).
        label: one-line description for tables and plots.
        compute: format of GEMM inputs (weights and activations) in the forward pass.
        output: format GEMM outputs are rounded to (what the next op reads).
        grad: format of gradients in the backward pass (GEMM output and input gradients).
        master_weights: keep float32 weights and update those (else the weights are stored in
            ``compute`` and every update is rounded into it).
        loss_scale: ``"dynamic"`` (start 2^16, halve and skip on inf/NaN, double after
            ``growth_interval`` good steps) or ``"none"``.
        per_tensor_scaling: scale every rounded tensor by a power of two that puts its largest
            magnitude at the top of the format's range (fp8 recipes), before rounding.
        shows: which claim of the paper this run tests, for the report.
    """

    id: str
    label: str
    compute: str = "float32"
    output: str = "float32"
    grad: str = "float32"
    master_weights: bool = True
    loss_scale: str = "none"
    per_tensor_scaling: bool = False
    shows: str = ""

    def __post_init__(self) -> None:
        for what in ("compute", "output", "grad"):
            object.__setattr__(self, what, get_format(getattr(self, what)).name)
        if self.loss_scale not in ("none", "dynamic"):
            raise ValueError(f"loss_scale must be 'none' or 'dynamic', got {self.loss_scale!r}")

    @property
    def is_baseline(self) -> bool:
        return self.compute == self.output == self.grad == "float32" and self.master_weights

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "label": self.label,
            "compute_format": self.compute,
            "output_format": self.output,
            "grad_format": self.grad,
            "master_weights": self.master_weights,
            "loss_scale": self.loss_scale,
            "per_tensor_scaling": self.per_tensor_scaling,
            "shows": self.shows,
        }


RECIPES: dict[str, Recipe] = {
    r.id: r
    for r in (
        Recipe("fp32", "fp32 baseline", shows="reference"),
        Recipe(
            "fp16-O2",
            "fp16 O2: fp32 master weights + dynamic loss scaling",
            "float16", "float16", "float16", True, "dynamic",
            shows="mixed precision matches fp32",
        ),
        Recipe(
            "fp16-O3",
            "fp16 O3: fp16 weights (no master copy) + dynamic loss scaling",
            "float16", "float16", "float16", False, "dynamic",
            shows="updates below the weights' fp16 spacing are lost",
        ),
        Recipe(
            "fp16-noscale",
            "fp16 O2 without loss scaling",
            "float16", "float16", "float16", True, "none",
            shows="small gradients flush to zero in fp16",
        ),
        Recipe(
            "bf16-O2",
            "bf16 O2: fp32 master weights, no loss scaling",
            "bfloat16", "bfloat16", "bfloat16", True, "none",
            shows="bf16's fp32 range needs no loss scaling",
        ),
        Recipe(
            "fp8-hybrid",
            "fp8 HYBRID: e4m3 forward, e5m2 backward, per-tensor scaling, bf16 elsewhere",
            "float8_e4m3fn", "bfloat16", "float8_e5m2", True, "none", True,
            shows="fp8 GEMMs with per-tensor scaling",
        ),
    )
}  # fmt: skip

DEFAULT_FORMATS: tuple[str, ...] = ("fp16", "bf16", "fp8")

_FP8_NAMES = {"fp8", "hybrid", "fp8-hybrid", "float8", "e4m3", "e5m2", "float8_e4m3fn",
              "float8_e5m2", "e4m3fn"}  # fmt: skip


def resolve_recipes(formats: str | tuple[str, ...] | list[str] | None) -> tuple[Recipe, ...]:
    """Recipes for a ``--formats`` list; the fp32 baseline always comes first.

    ``fp16`` (or ``float16``/``half``) gives the three fp16 ablations, ``bf16`` the bf16 recipe,
    ``fp8`` (or ``e4m3``, ``e5m2``, ``e4m3fn``, ``hybrid``) the fp8 HYBRID recipe, a recipe id
    (``fp16-O3``) that recipe alone, and any other format name (``e3m4``, ``float6_e3m2fn``,
    ``e6m9``) an O2 recipe in that format (master weights, dynamic loss scaling).
    """
    if formats is None:
        formats = DEFAULT_FORMATS
    if isinstance(formats, str):
        formats = tuple(f for f in formats.split(",") if f.strip())
    chosen: dict[str, Recipe] = {"fp32": RECIPES["fp32"]}
    for raw in formats:
        name = raw.strip()
        key = name.lower()
        if name in RECIPES:
            chosen[name] = RECIPES[name]
        elif key in _FP8_NAMES:
            chosen["fp8-hybrid"] = RECIPES["fp8-hybrid"]
        elif key in ("fp32", "float32"):
            continue
        else:
            try:
                fmt = get_format(name)
            except ValueError as exc:
                raise ValueError(
                    f"unknown format or recipe {name!r} in --formats; use recipe ids "
                    f"({', '.join(RECIPES)}), 'fp16', 'bf16', 'fp8' or any format name "
                    f"({exc})"
                ) from None
            if fmt.name == "float16":
                for rid in ("fp16-O2", "fp16-O3", "fp16-noscale"):
                    chosen[rid] = RECIPES[rid]
            elif fmt.name == "bfloat16":
                chosen["bf16-O2"] = RECIPES["bf16-O2"]
            elif fmt.name == "float32":
                continue
            else:
                rid = f"{fmt.name}-O2"
                chosen[rid] = Recipe(
                    rid,
                    f"{fmt.name} O2: fp32 master weights + dynamic loss scaling",
                    fmt.name, fmt.name, fmt.name, True, "dynamic",
                    shows=f"training with {fmt.name} GEMMs",
                )  # fmt: skip
    return tuple(chosen.values())


# --------------------------------------------------------------------------------------------
# rounding functions
# --------------------------------------------------------------------------------------------


def _pow2_scale(t: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Power-of-two factor putting ``max|t|`` in the top binade of ``fmt`` (1 if t is all zero).

    A power of two makes scaling and unscaling exact; one reduction, no host sync.
    """
    amax = t.detach().abs().amax().float()
    ok = torch.isfinite(amax) & (amax > 0)
    exp = torch.floor(torch.log2(fmt.max / torch.where(ok, amax, torch.ones_like(amax))))
    return torch.where(ok, torch.exp2(exp.clamp(-126, 126)), torch.ones_like(amax)).to(t.dtype)


def _rounder(fmt: FloatFormat | None, scaled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if fmt is None or fmt.name in ("float32", "float64"):
        return lambda t: t
    if not scaled:
        return lambda t: quantize(t, fmt)

    def scaled_round(t: torch.Tensor) -> torch.Tensor:
        s = _pow2_scale(t, fmt)
        return quantize(t * s, fmt, saturate=True) / s

    return scaled_round


class _Round(torch.autograd.Function):
    """Round forward with one function and the incoming gradient with another."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):  # type: ignore[override]
        ctx.bwd = bwd
        return fwd(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.bwd(grad), None, None


_GEMMS = frozenset(
    {
        F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
        torch.Tensor.__rmatmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm,
        torch.addmm, torch.baddbmm, F.conv1d, F.conv2d,
    }
)  # fmt: skip


class _GemmMode(TorchFunctionMode):
    """Wrap every GEMM's tensor arguments and result with ``wrap_in`` / ``wrap_out``."""

    def __init__(
        self,
        wrap_in: Callable[[torch.Tensor, int], torch.Tensor],
        wrap_out: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.wrap_in = wrap_in
        self.wrap_out = wrap_out

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func not in _GEMMS:
            return func(*args, **kwargs)
        args = tuple(
            self.wrap_in(a, i) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for i, a in enumerate(args)
        )
        if isinstance(kwargs.get("bias"), torch.Tensor):
            kwargs = {**kwargs, "bias": self.wrap_in(kwargs["bias"], 2)}
        out = func(*args, **kwargs)
        return self.wrap_out(out) if isinstance(out, torch.Tensor) else out


def _emulation_mode(recipe: Recipe) -> TorchFunctionMode | None:
    if recipe.is_baseline:
        return None
    comp, outp, grad = (get_format(n) for n in (recipe.compute, recipe.output, recipe.grad))
    scaled = recipe.per_tensor_scaling
    in_fwd = _rounder(comp, scaled)
    bias_fwd = _rounder(outp, False)  # a bias is added to the output, in the output format
    # the gradient a GEMM hands back for its inputs is a GEMM result: it is produced in the
    # output format, while the gradient fed *into* the backward GEMMs is in the grad format
    in_bwd = _rounder(outp if scaled else grad, False)
    out_fwd = _rounder(outp, False)
    out_bwd = _rounder(grad, scaled)

    def wrap_in(t: torch.Tensor, pos: int) -> torch.Tensor:
        if pos == 2 and t.ndim == 1:  # F.linear's bias
            return _Round.apply(t, bias_fwd, in_bwd)
        return _Round.apply(t, in_fwd, in_bwd)

    def wrap_out(t: torch.Tensor) -> torch.Tensor:
        return _Round.apply(t, out_fwd, out_bwd)

    return _GemmMode(wrap_in, wrap_out)


# --------------------------------------------------------------------------------------------
# engine
# --------------------------------------------------------------------------------------------


@dataclass
class _Scaler:
    """Dynamic loss scaling as in the paper / torch.amp.GradScaler (defaults of the latter)."""

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    _good: int = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, 2.0**-24)
            self._good = 0
        else:
            self._good += 1
            if self._good >= self.growth_interval:
                self.scale = min(self.scale * self.growth_factor, 2.0**64)
                self._good = 0


class Engine:
    """Runs one training run under ``recipe``: forward context, scaled backward, guarded step.

    Counters (plain ints/floats, read after training): ``steps``, ``skipped``, ``updates`` (weight
    elements a step meant to change), ``updates_lost`` (of those, unchanged after the step because
    the change was below half the stored weight's spacing), ``loss_scale``.
    """

    def __init__(
        self,
        recipe: Recipe,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        growth_interval: int = 2000,
    ) -> None:
        self.recipe = recipe
        self.model = model
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._scaler = (
            _Scaler(growth_interval=growth_interval) if recipe.loss_scale == "dynamic" else None
        )
        self._store = None if recipe.master_weights else get_format(recipe.compute)
        self.steps = 0
        self.skipped = 0
        self.updates = 0
        self.updates_lost = 0
        self.backend = "mixprec.demo.recipes (fake-quantize GEMM emulation)"
        if self._store is not None:  # the only copy of the weights lives in the compute format
            with torch.no_grad():
                for p in self.params:
                    quantize_(p.data, self._store)

    @property
    def loss_scale(self) -> float:
        return 1.0 if self._scaler is None else self._scaler.scale

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Forward-pass context: GEMMs in the recipe's formats (no-op for the fp32 baseline)."""
        mode = _emulation_mode(self.recipe)
        if mode is None:
            yield
            return
        with mode:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """``(loss * scale).backward()``; the loss itself stays float32."""
        (loss.float() * self.loss_scale).backward()

    def step(self) -> bool:
        """Unscale, check, step. Returns False when the step was skipped (inf/NaN gradients).

        Cost: one host sync for the overflow check (dynamic scaling only) and, to count lost
        updates, one copy of the weights.
        """
        self.steps += 1
        grads = [p.grad for p in self.params if p.grad is not None]
        if self._scaler is not None:
            scale = self._scaler.scale
            found_inf = bool(torch.stack([(~torch.isfinite(g)).any() for g in grads]).any())
            if found_inf:
                self._scaler.update(True)
                self.skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                return False
            with torch.no_grad():
                for g in grads:
                    g.mul_(1.0 / scale)
                    if self._store is not None:  # no fp32 copy: unscaled grads are fp16 too
                        quantize_(g, self._store)
            self._scaler.update(False)
        with torch.no_grad():
            before = [p.detach().clone() for p in self.params]
            wanted = [None if p.grad is None else p.grad.ne(0) for p in self.params]
        self.optimizer.step()
        with torch.no_grad():
            for p, old, want in zip(self.params, before, wanted, strict=True):
                if self._store is not None:
                    quantize_(p.data, self._store)
                if want is not None:
                    self.updates += int(want.sum())
                    self.updates_lost += int((want & p.eq(old)).sum())
        self.optimizer.zero_grad(set_to_none=True)
        return True


class MixprecEngine:
    """The same interface as :class:`Engine`, on mixprec's public API.

    ``mixprec.initialize(model, optimizer, opt_level="O2"|"O3", compute=..., loss_scale=...,
    emulate=True)`` and ``mixprec.scale_loss`` for the fp16/bf16/custom-format recipes;
    ``mixprec.autocast("bfloat16", emulate=True, fp8_recipe=CurrentScaling())`` around the
    forward pass for fp8 HYBRID (fp32 weights, fp8 GEMMs writing bf16); plain torch for fp32.
    Formats are always emulated, so numbers do not depend on the CPU's bf16 support.
    """

    def __init__(
        self,
        recipe: Recipe,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        growth_interval: int = 2000,
    ) -> None:
        import mixprec
        from mixprec import amp

        self.recipe = recipe
        self.model = model
        self.optimizer = optimizer
        self._amp = amp
        self._autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
        self._initialized = False
        self.steps = 0
        self._skipped_plain = 0
        self.updates = 0
        self.updates_lost = 0
        if recipe.per_tensor_scaling:
            from mixprec.precision.fp8 import CurrentScaling

            out_fmt = recipe.output
            self._autocast = lambda: mixprec.autocast(
                out_fmt, emulate=True, fp8_recipe=CurrentScaling()
            )
            self.backend = "mixprec.autocast(fp8_recipe=CurrentScaling())"
        elif recipe.is_baseline:
            self.backend = "torch (float32)"
        else:
            # a diverging recipe is a result to report, not an error: on_divergence="ignore"
            kw: dict[str, Any] = {}
            if recipe.loss_scale == "dynamic":
                loss_scale: Any = mixprec.DynamicLossScaler(
                    growth_interval=growth_interval, on_divergence="ignore"
                )
            else:
                loss_scale, kw["on_divergence"] = "none", "ignore"
            level = "O2" if recipe.master_weights else "O3"
            self.model, self.optimizer = mixprec.initialize(
                model, optimizer, opt_level=level, compute=recipe.compute,
                loss_scale=loss_scale, emulate=True, **kw,
            )  # fmt: skip
            self._initialized = True
            self.backend = f"mixprec.initialize(opt_level={level!r}) + scale_loss"

    @property
    def loss_scale(self) -> float:
        if not self._initialized:
            return 1.0
        return float(self._amp.get_scaler(self.optimizer).loss_scale)

    @property
    def skipped(self) -> int:
        if not self._initialized:
            return self._skipped_plain
        return int(self._amp.skipped_steps(self.optimizer))

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self._autocast is None:  # initialize() already put the policy on the model
            yield
            return
        with self._autocast():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if not self._initialized:
            loss.float().backward()
            return
        with self._amp.scale_loss(loss.float(), self.optimizer) as scaled:
            scaled.backward()

    def step(self) -> bool:
        """``optimizer.step()`` (mixprec skips it after an overflow); counts lost updates as
        weights with a nonzero gradient that did not move. Cost: one copy of the weights."""
        self.steps += 1
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            before = [p.detach().clone() for p in params]
            wanted = [None if p.grad is None else p.grad.ne(0) for p in params]
        skipped_before = self.skipped
        self.optimizer.step()
        applied = self.skipped == skipped_before
        if applied:
            with torch.no_grad():
                for p, old, want in zip(params, before, wanted, strict=True):
                    if want is None:
                        continue
                    # at O3 the stored weight is the model's own; at O2 the master moved
                    self.updates += int(want.sum())
                    self.updates_lost += int((want & p.eq(old)).sum())
        self.optimizer.zero_grad(set_to_none=True)
        return applied


def make_engine(
    recipe: Recipe,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    backend: str = "auto",
    growth_interval: int = 2000,
) -> Engine | MixprecEngine:
    """An engine for ``recipe``: ``"mixprec"`` (the public API), ``"internal"`` (this module's
    own GEMM emulation, no dependency on mixprec.amp/autocast) or ``"auto"`` (mixprec when its
    amp and autocast layers import, else internal)."""
    if backend not in ("auto", "mixprec", "internal"):
        raise ValueError(f"backend must be 'auto', 'mixprec' or 'internal', got {backend!r}")
    if backend == "auto":
        backend = "mixprec" if mixprec_available() else "internal"
    cls = MixprecEngine if backend == "mixprec" else Engine
    return cls(recipe, model, optimizer, growth_interval=growth_interval)


def mixprec_available() -> bool:
    """True when ``mixprec.amp`` and ``mixprec.autocast`` import (they are built in parallel)."""
    try:
        import mixprec.amp
        import mixprec.precision  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# gradient probe: which gradient values would flush to zero in a format at a given scale
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientProbe:
    """Gradients of one fp32 forward/backward pass at loss scale 1, one tensor per GEMM operand.

    ``act``: gradients flowing into and out of every GEMM (the tensors a mixed-precision backward
    pass holds in its gradient format); ``weight``: the parameters' gradients. Both flattened.
    """

    act: tuple[torch.Tensor, ...]
    weight: tuple[torch.Tensor, ...]

    def flushed(
        self, fmt: str | FloatFormat, *, scale: float = 1.0, per_tensor: bool = False
    ) -> tuple[float, float]:
        """Fractions of nonzero (activation, weight) gradients that round to zero in ``fmt``
        after multiplying by ``scale`` (then by a per-tensor power of two if ``per_tensor``)."""
        f = get_format(fmt)
        return _flushed(self.act, f, scale, per_tensor), _flushed(self.weight, f, scale, per_tensor)


def _flushed(
    parts: tuple[torch.Tensor, ...], fmt: FloatFormat, scale: float, per_tensor: bool
) -> float:
    nonzero = 0
    lost = 0
    for t in parts:
        t = t.double() * scale  # float64: the scaled value itself must not underflow
        if per_tensor:
            t = t * _pow2_scale(t, fmt).double()
        nz = t != 0
        q = quantize(t, fmt, saturate=True)
        nonzero += int(nz.sum())
        lost += int((nz & (q == 0)).sum())
    return lost / nonzero if nonzero else 0.0


def probe_gradients(
    model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor]
) -> GradientProbe:
    """One fp32 forward/backward of ``loss_fn(model)`` recording every GEMM's input/output grads.

    The model's ``.grad`` fields are left as they were. Cost: one extra training step in fp32.
    """
    saved = [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    acts: list[torch.Tensor] = []

    def record(g: torch.Tensor) -> torch.Tensor:
        acts.append(g.detach().float().reshape(-1).clone())
        return g

    ident = lambda t: t  # noqa: E731

    def wrap_in(t: torch.Tensor, pos: int) -> torch.Tensor:
        if not t.requires_grad:
            return t
        return _Round.apply(t, ident, record)

    def wrap_out(t: torch.Tensor) -> torch.Tensor:
        return _Round.apply(t, ident, record) if t.requires_grad else t

    with _GemmMode(wrap_in, wrap_out):
        loss = loss_fn(model)
    loss.float().backward()
    weights = tuple(
        p.grad.detach().float().reshape(-1).clone()
        for p in model.parameters()
        if p.grad is not None
    )
    for p, g in zip(model.parameters(), saved, strict=True):
        p.grad = g
    return GradientProbe(tuple(acts), weights)


def _log2_magnitudes(t: torch.Tensor) -> torch.Tensor:
    t = t[t != 0].abs().double()
    return torch.log2(t) if t.numel() else t


def log2_histogram(t: torch.Tensor, lo: int = -100, hi: int = 30) -> tuple[list[int], list[int]]:
    """Counts of nonzero ``|t|`` per binade [2^e, 2^(e+1)) for e in [lo, hi); zeros counted apart.

    Returns (edges, counts); values below 2^lo fall in the first bin, above 2^hi in the last.
    """
    e = torch.floor(_log2_magnitudes(t)).clamp(lo, hi - 1).long() - lo
    counts = torch.bincount(e, minlength=hi - lo) if e.numel() else torch.zeros(hi - lo)
    return list(range(lo, hi + 1)), [int(c) for c in counts]
