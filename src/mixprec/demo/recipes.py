"""Precision recipes of the mixed-precision paper's ablation, run through mixprec's public API.

A :class:`Recipe` says *what* is in which format (GEMM inputs, GEMM outputs, gradients, weight
storage, loss scaling). A :class:`RecipeTrainer` makes one training run follow it with the calls
a user would make, and nothing else:

* fp16/bf16/custom-format recipes: ``mixprec.initialize(model, optimizer, opt_level="O2"|"O3",
  compute=..., loss_scale=..., emulate=True)``, then ``mixprec.scale_loss`` around the backward;
* fp8 HYBRID: ``mixprec.autocast("bfloat16", emulate=True,
  fp8_recipe=mixprec.precision.CurrentScaling())`` around the forward pass (fp32 weights);
* the fp32 baseline: plain torch.

Formats are always emulated, so the numbers do not depend on the CPU's bf16 support. The trainer
also counts what the report needs: skipped steps, the loss scale, and weight updates lost
because they were below half the stored weight's spacing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import mixprec
from mixprec import amp
from mixprec.formats import get_format
from mixprec.precision import CurrentScaling


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


def _one_format(
    rid: str, label: str, fmt: str, loss_scale: str, *, master_weights: bool = True, shows: str
) -> Recipe:
    """A recipe whose GEMM inputs, outputs and gradients are all in ``fmt``."""
    return Recipe(rid, label, fmt, fmt, fmt, master_weights, loss_scale, shows=shows)


RECIPES: dict[str, Recipe] = {
    r.id: r
    for r in (
        Recipe("fp32", "fp32 baseline", shows="reference"),
        _one_format(
            "fp16-O2", "fp16 O2: fp32 master weights + dynamic loss scaling", "float16",
            "dynamic", shows="mixed precision matches fp32",
        ),
        _one_format(
            "fp16-O3", "fp16 O3: fp16 weights (no master copy) + dynamic loss scaling", "float16",
            "dynamic", master_weights=False,
            shows="updates below the weights' fp16 spacing are lost",
        ),
        _one_format(
            "fp16-noscale", "fp16 O2 without loss scaling", "float16", "none",
            shows="small gradients flush to zero in fp16",
        ),
        _one_format(
            "bf16-O2", "bf16 O2: fp32 master weights, no loss scaling", "bfloat16", "none",
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
        for recipe in _recipes_for(raw.strip()):
            chosen[recipe.id] = recipe
    return tuple(chosen.values())


def _recipes_for(name: str) -> tuple[Recipe, ...]:
    """The recipes one ``--formats`` entry names (none for fp32, which always runs)."""
    key = name.lower()
    if name in RECIPES:
        return (RECIPES[name],)
    if key in _FP8_NAMES:
        return (RECIPES["fp8-hybrid"],)
    if key in ("fp32", "float32"):
        return ()
    try:
        fmt = get_format(name)
    except ValueError as exc:
        raise ValueError(
            f"unknown format or recipe {name!r} in --formats; use recipe ids "
            f"({', '.join(RECIPES)}), 'fp16', 'bf16', 'fp8' or any format name ({exc})"
        ) from None
    if fmt.name == "float32":
        return ()
    if fmt.name == "float16":
        return tuple(RECIPES[rid] for rid in ("fp16-O2", "fp16-O3", "fp16-noscale"))
    if fmt.name == "bfloat16":
        return (RECIPES["bf16-O2"],)
    label = f"{fmt.name} O2: fp32 master weights + dynamic loss scaling"
    shows = f"training with {fmt.name} GEMMs"
    return (_one_format(f"{fmt.name}-O2", label, fmt.name, "dynamic", shows=shows),)


# --------------------------------------------------------------------------------------------
# the adapter onto the public API
# --------------------------------------------------------------------------------------------


def _initialize(
    recipe: Recipe, model: torch.nn.Module, optimizer: torch.optim.Optimizer, growth_interval: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, str]:
    """``mixprec.initialize`` for an O2/O3 recipe; returns the model, optimizer and the call."""
    # a diverging recipe is a result to report, not an error: on_divergence="ignore"
    kw: dict[str, Any] = {}
    if recipe.loss_scale == "dynamic":
        loss_scale: Any = mixprec.DynamicLossScaler(
            growth_interval=growth_interval, on_divergence="ignore"
        )
        scale_text = f"DynamicLossScaler(growth_interval={growth_interval})"
    else:
        loss_scale, kw["on_divergence"] = "none", "ignore"
        scale_text = "'none'"
    level = "O2" if recipe.master_weights else "O3"
    model, optimizer = mixprec.initialize(
        model, optimizer, opt_level=level, compute=recipe.compute,
        loss_scale=loss_scale, emulate=True, **kw,
    )  # fmt: skip
    call = (
        f"mixprec.initialize(opt_level={level!r}, compute={recipe.compute!r}, "
        f"loss_scale={scale_text}, emulate=True) + mixprec.scale_loss"
    )
    return model, optimizer, call


class RecipeTrainer:
    """One training run under ``recipe``: forward context, (scaled) backward, step, counters.

    ``model`` and ``optimizer`` are the ones to train with (``mixprec.initialize`` sets them up
    in place). Counters, read after training: ``steps``, ``skipped``, ``loss_scale``,
    ``updates`` (weight elements a step meant to change) and ``updates_lost`` (of those,
    unchanged after the step). ``api_call`` names the public call the recipe runs through.
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
        self.steps = 0
        self.updates = 0
        self.updates_lost = 0
        self._region: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
        self._initialized = False
        if recipe.per_tensor_scaling:
            out_fmt = recipe.output
            self._region = lambda: mixprec.autocast(
                out_fmt, emulate=True, fp8_recipe=CurrentScaling()
            )
            self.api_call = (
                f"mixprec.autocast({out_fmt!r}, emulate=True, "
                "fp8_recipe=mixprec.precision.CurrentScaling())"
            )
        elif recipe.is_baseline:
            self.api_call = "torch (float32)"
        else:
            self.model, self.optimizer, self.api_call = _initialize(
                recipe, model, optimizer, growth_interval
            )
            self._initialized = True

    @property
    def loss_scale(self) -> float:
        if not self._initialized:
            return 1.0
        return float(amp.get_scaler(self.optimizer).loss_scale)

    @property
    def skipped(self) -> int:
        return int(amp.skipped_steps(self.optimizer)) if self._initialized else 0

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward pass's context (``initialize`` already put its policy on the model)."""
        if self._region is None:
            yield
            return
        with self._region():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, inside ``mixprec.scale_loss`` for initialized recipes."""
        if not self._initialized:
            loss.float().backward()
            return
        with amp.scale_loss(loss.float(), self.optimizer) as scaled:
            scaled.backward()

    def step(self) -> bool:
        """``optimizer.step()``; False when mixprec skipped it after an overflow.

        Counts lost updates as weights with a nonzero gradient that did not move (at O2 the
        float32 masters, at O3 the model's own weights). Cost: one copy of the weights.
        """
        self.steps += 1
        params = list(amp.master_params(self.optimizer))
        with torch.no_grad():
            before = [p.detach().clone() for p in params]
            wanted = [None if p.grad is None else p.grad.ne(0) for p in params]
        skipped_before = self.skipped
        self.optimizer.step()
        applied = self.skipped == skipped_before
        if applied:
            self._count_updates(params, before, wanted)
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    @torch.no_grad()
    def _count_updates(
        self,
        params: list[torch.Tensor],
        before: list[torch.Tensor],
        wanted: list[torch.Tensor | None],
    ) -> None:
        for p, old, want in zip(params, before, wanted, strict=True):
            if want is not None:
                self.updates += int(want.sum())
                self.updates_lost += int((want & p.eq(old)).sum())
