"""The seam between a policy region and the strategy that runs the ops inside it.

:class:`~mixprec.precision.Autocast` picks an executor when a region is entered and routes every
torch function call made inside it to the executor's :meth:`Executor.handle`. Two implement it:
:class:`~mixprec.precision.native.NativeExecutor` (``torch.autocast`` with the policy's op lists)
and :class:`~mixprec.precision.emulated.EmulatedExecutor` (fp32 compute on values rounded
bit-exactly into the policy's formats).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from mixprec.precision.policy import Policy


@runtime_checkable
class Executor(Protocol):
    """One entry of a policy region: fresh per-entry state, entered and left exactly once.

    Attributes:
        policy: the region's policy (what :func:`~mixprec.precision.current_policy` reports).
        emulated: True when values are rounded by emulation rather than cast natively.
    """

    policy: Policy
    emulated: bool

    def enter(self) -> None:
        """Set up the torch state the executor needs (``torch.autocast`` on or off)."""
        ...

    def exit(self) -> None:
        """Restore what :meth:`enter` changed (also when the region exits by an exception)."""
        ...

    def handle(self, func: Callable[..., Any], name: str, args: tuple, kwargs: dict) -> Any:
        """Run one torch function call; ``name`` is its op name (:func:`~.ops.func_name`)."""
        ...
