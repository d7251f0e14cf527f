"""What torch.compile needs of the region machinery: caches it can trace, constant decisions.

The emulated executor runs the same Python while dynamo traces a region (see
docs/autocast.md, "torch.compile"); two things in it need help: ``functools.lru_cache``
wrappers (dynamo traces through them but warns each time) and decisions that depend only on
which function is called (``func_name``), which dynamo would otherwise trace into attribute
reads and string methods of builtins it cannot follow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from torch.compiler import is_compiling

F = TypeVar("F", bound=Callable[..., Any])


def trace_cache(maxsize: int) -> Callable[[F], F]:
    """``functools.lru_cache`` in eager code; the plain function while torch.compile traces.

    Dynamo traces through an lru_cache wrapper (ignoring the cache) but warns every time; the
    results depend only on constants, so tracing the function itself gives the same graph.
    Cost in eager: one extra Python call (~0.1 us) per use.
    """

    def deco(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return fn(*args) if is_compiling() else cached(*args)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return deco


def constant_under_compile(*fns: Any) -> None:
    """Let torch.compile call ``fns`` at trace time and use their results as constants (they
    depend only on a function's identity and an op list, never on tensors): exactly what
    ``torch.compiler.assume_constant_result`` does, which sets this marker. Set directly, since
    that helper imports torch._dynamo (about a second) and ``import mixprec`` should not."""
    for fn in fns:
        fn._dynamo_marked_constant = True
