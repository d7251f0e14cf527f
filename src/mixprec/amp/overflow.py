"""The overflow check shared by every loss-scaling path: unscale gradients in place and flag
NaN/inf, make the ranks agree on the flag, and name the parameters that overflowed.

One implementation serves both callers (a scaler's ``unscale_``/``step`` and ``mixprec.amp``'s
``scale_loss``, which reaches it through :meth:`LossScaler.unscale_grads_`):

* :func:`check_and_unscale_` groups tensors by device and runs torch's fused kernel
  (``torch._amp_foreach_non_finite_check_and_unscale_``: one read and one write per element, no
  sync) per dtype, or a fallback with the same results.
* :func:`all_reduce_max_` is the one collective: MAX over the flags when ``torch.distributed``
  is initialised, so every rank skips the same steps.
* :class:`ParamNames` maps parameters to names for the overflow messages.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_FUSED = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)


def _by_dtype(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by dtype: torch's foreach/fused ops demand a single dtype per call."""
    groups: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[t.dtype].append(t)
    return list(groups.values())


def _by_device(tensors: Iterable[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    groups: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[t.device].append(t)
    return groups


def non_finite_check_and_unscale_(
    grads: Sequence[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    fused: bool | None = None,
) -> None:
    """Set ``found_inf`` to 1 if any of ``grads`` (one device) holds NaN/inf; multiply all by
    ``inv_scale`` in place.

    ``fused=None`` uses torch's fused kernel where it exists (one pass, no sync) and falls back
    to a per-tensor ``isfinite`` reduction plus a foreach multiply. As in torch's kernel, the
    check looks at the values *before* the multiply.
    """
    if not grads:
        return
    if fused is not False and _FUSED is not None:
        try:
            for group in _by_dtype(grads):
                _FUSED(group, found_inf, inv_scale)
            return
        except (RuntimeError, NotImplementedError):
            if fused:
                raise
    flags = torch.stack([torch.isfinite(g).all() for g in grads])
    found_inf.copy_(torch.maximum(found_inf, (~flags.all()).to(found_inf.dtype)))
    unscale_only_(grads, inv_scale)


def unscale_only_(grads: Sequence[torch.Tensor], inv_scale: torch.Tensor) -> None:
    """Multiply ``grads`` (one device) by ``inv_scale`` in place, one foreach call per dtype."""
    for group in _by_dtype(grads):
        # fp32 scalar: the product is formed in fp32 and rounded once, as the fused kernel does
        torch._foreach_mul_(group, inv_scale.to(group[0].device))


def check_and_unscale_(
    grads: Iterable[torch.Tensor],
    inv_scale: float,
    *,
    check: bool,
    home: torch.device | None = None,
) -> torch.Tensor | None:
    """Multiply dense ``grads`` (any devices) by ``inv_scale`` in place and, with ``check``,
    return ``found_inf``: a float32 0-d tensor on ``home`` (default: the first gradient's device),
    > 0 when some gradient held NaN/inf *before* the multiply.

    Without ``check`` it only unscales (nothing at all when ``inv_scale == 1``) and returns
    None. Cost: one fused read+write pass per device and dtype, no device sync.
    """
    per_device = _by_device(grads)
    if not check:
        if inv_scale != 1.0:
            for device, group in per_device.items():
                unscale_only_(group, torch.full((), inv_scale, dtype=torch.float32, device=device))
        return None
    if home is None:
        home = next(iter(per_device), torch.device("cpu"))
    found = torch.zeros((), dtype=torch.float32, device=home)
    for device, group in per_device.items():
        f = found if device == home else torch.zeros((), dtype=torch.float32, device=device)
        inv_t = torch.full((), inv_scale, dtype=torch.float32, device=device)
        non_finite_check_and_unscale_(group, f, inv_t)
        if f is not found:
            found += f.to(home)
    return found


def is_distributed(setting: bool | None) -> bool:
    """Whether to all-reduce: ``setting`` None follows ``torch.distributed.is_initialized()``,
    True requires it (``RuntimeError`` otherwise), False never."""
    if setting is False:
        return False
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    if setting and not available:
        raise RuntimeError(
            "distributed=True but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first or pass distributed=None (auto)"
        )
    return available


def all_reduce_max_(
    flags: torch.Tensor, setting: bool | None, group: ProcessGroup | None = None
) -> None:
    """All-reduce ``flags`` in place with MAX over ``group`` when :func:`is_distributed`; every
    rank must call it at the same point. Cost: one collective (none when not distributed)."""
    if is_distributed(setting):
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)


NameSource = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, Any]]


class ParamNames:
    """Parameter names for overflow messages: registered ones (held by weak reference, so a
    reused ``id`` never picks up a stale name), else the optimizer's ``param_names``, else the
    position in ``param_groups``."""

    def __init__(self) -> None:
        self._names: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}

    def register(self, names: NameSource) -> None:
        """Accept a module (its ``named_parameters()``), a mapping or pairs ``name -> tensor``."""
        if isinstance(names, torch.nn.Module):
            pairs: Iterable[tuple[str, Any]] = names.named_parameters()
        elif isinstance(names, Mapping):
            pairs = names.items()
        else:
            pairs = names
        for name, t in pairs:
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"register_names: {name!r} maps to {type(t).__name__}, not a tensor"
                )
            self._names[id(t)] = (weakref.ref(t), str(name))

    def name_of(self, p: torch.Tensor, group: Mapping[str, Any], gi: int, pi: int) -> str:
        entry = self._names.get(id(p))
        if entry is not None and entry[0]() is p:
            return entry[1]
        names = group.get("param_names")
        if names is not None and pi < len(names):
            return str(names[pi])
        return f"param_groups[{gi}]['params'][{pi}] {tuple(p.shape)}"

    def offenders(self, optimizer: Any, *, values: bool = False) -> tuple[str, ...]:
        """Names of the optimizer's parameters whose gradient (``values=True``: whose value)
        holds NaN/inf. Cost: one device sync per parameter, so it is only called on the rare
        collapse/divergence path."""
        bad = []
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                g = p.detach() if values else p.grad
                if g is None:
                    continue
                vals = g._values() if g.is_sparse else g
                if not bool(torch.isfinite(vals).all()):
                    bad.append(self.name_of(p, group, gi, pi))
        return tuple(bad)
