"""How ``mixprec.amp`` executes an opt level's op policy: a thin adapter over
:func:`mixprec.apply_policy` (the policy autocast), kept apart so amp's weight/master/scaler
machinery does not depend on the autocast internals.

The adapter builds the :class:`~mixprec.precision.Policy` and
:class:`~mixprec.precision.OpLists` of each opt level and attaches them to a model with a
removable handle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixprec.formats import FloatFormat
from mixprec.precision import OpLists, Policy, PolicyHandle, apply_policy

_NATIVE = (torch.float16, torch.bfloat16)


def native_dtype(fmt: FloatFormat) -> torch.dtype | None:
    """The torch dtype amp would store/compute ``fmt`` in natively (fp16/bf16/fp32/fp64)."""
    dt = fmt.torch_dtype
    return dt if dt in (*_NATIVE, torch.float32, torch.float64) else None


def level_policy(
    opt_level: str, fmt: FloatFormat | str, emulate: bool
) -> tuple[Policy, OpLists] | None:
    """(Policy, OpLists) of an opt level, or None for O0 (nothing to execute).

    O1: fp32 parameters read as they are, low ops in ``fmt``, fp32 ops in fp32, module output
    fp32. O2: the same ops, parameters read in ``fmt`` (they are stored in it already: a no-op
    cast natively; emulated storage holds exactly representable values, so it reads them as
    fp32 and skips a redundant rounding). O3: every op of the fp32 list moved to the low list,
    output in ``fmt``.
    """
    if opt_level == "O0":
        return None
    name = fmt if isinstance(fmt, str) else fmt.name
    lists = OpLists.default()
    if opt_level == "O1":
        return Policy(params="float32", compute=name, output="float32"), lists
    params = "float32" if emulate else name
    if opt_level == "O2":
        return Policy(params=params, compute=name, output="float32"), lists
    return Policy(params=params, compute=name, output=name), lists.with_low(*lists.fp32)


def attach_policy(
    model: torch.nn.Module,
    opt_level: str,
    fmt: FloatFormat | str,
    emulate: bool,
    keep_fp32: Callable[[torch.nn.Module, str], bool] | None,
    device_type: str,
) -> list[PolicyHandle]:
    """Attach the opt level's policy to ``model``; returns handles (each with ``remove()``).

    The policy goes on the root module (one region per forward). Modules picked by
    ``keep_fp32(module, fqn)`` get a float32 policy of their own, which wins inside their
    forward (the autocast layer nests policies).
    """
    spec = level_policy(opt_level, fmt, emulate)
    if spec is None:
        return []
    policy, lists = spec
    handles = [
        apply_policy(model, policy, emulate=emulate, op_lists=lists, device_type=device_type)
    ]
    if keep_fp32 is not None:
        try:
            handles.append(
                apply_policy(
                    model, "float32", filter_fn=keep_fp32, emulate=emulate, device_type=device_type
                )
            )
        except Exception:
            handles[0].remove()
            raise
    return handles
