"""What both executors of a policy region share: op names and walking op arguments/results.

A ``TorchFunctionMode`` sees functions, methods and dunders; :func:`func_name` turns each into
the name :class:`~mixprec.precision.OpLists` uses (``__matmul__`` -> ``matmul``), or None for
metadata calls that pass through untouched. Nested arguments and results (lists of tensors for
``cat``, named tuples of ``max``, dicts of module outputs) are walked with
``torch.utils._pytree``, the walker torch itself uses.
"""

from __future__ import annotations

from typing import Any

from mixprec.precision._tracing import constant_under_compile, trace_cache
from mixprec.precision.policy import OpLists

# ----------------------------------------------------------------------------------------------
# op names
# ----------------------------------------------------------------------------------------------

_RENAME = {
    "__matmul__": "matmul", "__rmatmul__": "matmul", "__imatmul__": "matmul_",
    "__pow__": "pow", "__rpow__": "pow", "__ipow__": "pow_",
    "__add__": "add", "__radd__": "add", "__iadd__": "add_",
    "__sub__": "sub", "__rsub__": "sub", "__isub__": "sub_",
    "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul_",
    "__truediv__": "div", "__rtruediv__": "div", "__itruediv__": "div_",
    "__neg__": "neg", "__abs__": "abs",
}  # fmt: skip
_VIEW_PROPS = frozenset({"T", "mT", "H", "mH", "data", "real"})
_NAME_CACHE: dict[Any, str | None] = {}

#: ops that never produce a tensor worth tracking (metadata, Python conversions): pass through
META = frozenset({
    "size", "dim", "numel", "stride", "storage_offset", "is_contiguous", "data_ptr",
    "element_size", "item", "tolist", "__len__", "__bool__", "__format__", "__repr__",
    "__index__", "__int__", "__float__", "is_floating_point", "is_complex", "requires_grad_",
    "retain_grad", "register_hook", "backward", "ndimension", "nelement", "get_device",
    "untyped_storage", "_is_view", "__reduce_ex__", "__deepcopy__", "is_nonzero", "__hash__",
    "__setstate__", "dim_order", "__dlpack__", "numpy",
    # state setters torch's own runtime calls (a compiled graph's autograd wrapper, per call)
    "_set_grad_enabled", "_set_view_replay_enabled",
})  # fmt: skip


def func_name(func: Any) -> str | None:
    """Normalised op name of a function seen by a TorchFunctionMode (None: pass through)."""
    try:
        return _NAME_CACHE[func]
    except KeyError:
        pass
    except TypeError:  # unhashable callable
        return getattr(func, "__name__", None)
    name = getattr(func, "__name__", None)
    if name == "__get__":
        prop = getattr(getattr(func, "__self__", None), "__name__", None)
        name = prop if prop in _VIEW_PROPS else None
    elif name is not None:
        name = _RENAME.get(name, name)
        if name in META:
            name = None
    _NAME_CACHE[func] = name
    return name


def is_inplace(name: str) -> bool:
    return (name.endswith("_") and not name.startswith("_")) or name == "__setitem__"


@trace_cache(maxsize=4096)
def op_category(op_lists: OpLists, name: str) -> str:
    """``"inplace"`` for in-place ops (``add_``, ``__setitem__``: they keep their tensor's
    format), else the op's :meth:`~mixprec.precision.OpLists.category`. Cached per op list."""
    return "inplace" if is_inplace(name) else op_lists.category(name)


constant_under_compile(func_name)
