"""Where ``mixprec.amp`` keeps its state, and the read-only accessors on it.

One :class:`AmpHandle` per :func:`mixprec.initialize` call sits on each of its models (attribute
``_mixprec_amp``); one :class:`AmpOptimizerState` per optimizer sits on the optimizer (same
attribute) and points at the handle. Nothing global: the state lives and dies with the objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from mixprec.amp.config import AmpConfig
from mixprec.amp.scaling import LossScaler

ATTR = "_mixprec_amp"
T = TypeVar("T")


class Removable(Protocol):
    """A hook or policy handle: ``remove()`` undoes what installed it."""

    def remove(self) -> None: ...


class _NotCopied:
    """amp state is tied to the live objects: a deep copy or pickle of a model/optimizer gets
    None instead (the copy is then not initialized; call initialize on it if needed)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return type(None), ()


@dataclass(eq=False)
class AmpHandle(_NotCopied):
    """Shared state of one initialize() call: config, models, optimizers, scalers."""

    config: AmpConfig
    models: list[torch.nn.Module]
    optimizers: list[torch.optim.Optimizer]
    scalers: list[LossScaler]
    lowered: dict[int, torch.nn.Parameter]  # id -> model parameter stored in compute
    names: dict[int, str]  # id(model param) -> qualified name
    policy_handles: list[Removable] = field(default_factory=list)
    hooks: list[Removable] = field(default_factory=list)
    orig_dtypes: dict[int, torch.dtype] = field(default_factory=dict)

    def optimizer_states(self) -> list[AmpOptimizerState]:
        """The state of each optimizer still attached to this call."""
        states = (getattr(opt, ATTR, None) for opt in self.optimizers)
        return [st for st in states if isinstance(st, AmpOptimizerState)]


@dataclass(eq=False)
class AmpOptimizerState(_NotCopied):
    """Per-optimizer amp state (lives in ``optimizer._mixprec_amp``).

    Between two ``step()`` calls an optimizer goes through: the first ``scale_loss`` opens an
    accumulation window (``window_open``: the masters' gradients restart from zero), each
    ``scale_loss`` exit makes a step due (``pending``) and ORs its overflow into ``found``;
    ``step()`` skips when ``found`` and closes the window.
    """

    handle: AmpHandle
    optimizer: torch.optim.Optimizer
    had_instance_step: bool
    orig_step: Callable[..., Any]
    master_of: dict[int, torch.nn.Parameter] = field(default_factory=dict)  # model -> master
    model_of: dict[int, torch.nn.Parameter] = field(default_factory=dict)  # master -> model
    stash: dict[int, torch.Tensor] = field(default_factory=dict)
    pending: bool = False  # a scale_loss exited since the last step()
    found: bool = False  # some gradient of this optimizer overflowed since the last step()
    window_open: bool = False  # masters' grads belong to the current accumulation window
    delayed: bool = False  # .grad holds scaled gradients of delay_unscale blocks, still scaled
    warned_sync: bool = False  # the distributed accumulation warning was given
    skipped_steps: int = 0
    last_step_skipped: bool = False
    hooks: list[Removable] = field(default_factory=list)
    pending_load: dict[str, Any] | None = None

    def params(self) -> list[torch.Tensor]:
        """Every parameter the optimizer updates, in ``param_groups`` order."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """(model, master) pairs in param_groups order."""
        out = []
        for p in self.params():
            m = self.model_of.get(id(p))
            if m is not None:
                out.append((m, p))
        return out

    def direct(self) -> list[torch.Tensor]:
        """Parameters the optimizer updates in place (everything but masters)."""
        return [p for p in self.params() if id(p) not in self.model_of]


def optimizer_state(optimizer: object, what: str) -> AmpOptimizerState:
    """The amp state of ``optimizer``; ``RuntimeError`` naming ``what`` if it has none."""
    st = getattr(optimizer, ATTR, None) if optimizer is not None else None
    if not isinstance(st, AmpOptimizerState):
        raise RuntimeError(
            f"{what}: the optimizer {type(optimizer).__name__} was not set up by "
            "mixprec.initialize(model, optimizer, ...)"
        )
    return st


def handle_of(obj: object) -> AmpHandle:
    """The :class:`AmpHandle` of an initialized model or optimizer (``RuntimeError`` if none)."""
    h = getattr(obj, ATTR, None)
    if isinstance(h, AmpOptimizerState):
        return h.handle
    if not isinstance(h, AmpHandle):
        raise RuntimeError(f"{type(obj).__name__} was not set up by mixprec.initialize")
    return h


def as_list(x: T | Sequence[T], what: str, kind: type[T]) -> tuple[list[T], bool]:
    """``x`` as a non-empty list of ``kind``, and whether it was given as a list."""
    if isinstance(x, kind):
        return [x], False
    if isinstance(x, (list, tuple)):
        items = list(x)
        for i, item in enumerate(items):
            if not isinstance(item, kind):
                raise TypeError(
                    f"{what}[{i}] must be a {kind.__module__}.{kind.__qualname__}, got "
                    f"{type(item).__name__}"
                )
        if not items:
            raise ValueError(f"{what} is an empty list")
        return items, True
    raise TypeError(
        f"{what} must be a {kind.__qualname__} or a list of them, got {type(x).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# queries (public)
# ----------------------------------------------------------------------------------------------


def master_params(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Yield the parameters the optimizer updates: the float32 masters at O2, the model's own
    parameters otherwise (also for an optimizer never passed to initialize). Use it for
    gradient clipping: ``clip_grad_norm_(mixprec.master_params(opt), 1.0)`` after scale_loss."""
    for group in optimizer.param_groups:
        yield from group["params"]


def get_config(obj: torch.nn.Module | torch.optim.Optimizer) -> AmpConfig:
    """The :class:`AmpConfig` of an initialized model or optimizer."""
    return handle_of(obj).config


def get_scaler(optimizer: torch.optim.Optimizer, loss_id: int = 0) -> LossScaler:
    """The loss scaler of ``loss_id`` (its scale, skip record, state)."""
    handle = optimizer_state(optimizer, "get_scaler").handle
    if not 0 <= loss_id < len(handle.scalers):
        raise ValueError(f"loss_id must be in [0, {len(handle.scalers)}), got {loss_id!r}")
    return handle.scalers[loss_id]


def last_step_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's last ``step()`` was skipped because of an overflow (e.g. to hold
    back an LR scheduler: ``if not mixprec.amp.last_step_skipped(opt): sched.step()``)."""
    return optimizer_state(optimizer, "last_step_skipped").last_step_skipped


def skipped_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many of the optimizer's ``step()`` calls were skipped so far."""
    return optimizer_state(optimizer, "skipped_steps").skipped_steps
