"""Attribution of ops to the user's source lines and modules (private)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

import torch

from mixprec.frames import Where


def format_location(where: Where | None) -> tuple[str | None, str | None]:
    """("file.py:LINE", full path) of a user frame."""
    if where is None:
        return None, None
    code, line = where
    return f"{os.path.basename(code.co_filename)}:{line}", code.co_filename


ModuleFilter = Callable[[torch.nn.Module, str], bool]


def _is_compiled(module: torch.nn.Module) -> bool:
    """Is ``module`` the wrapper ``torch.compile`` returns for a module (OptimizedModule)?"""
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


class ModuleTracker:
    """Module stack for attribution, via global forward pre/post hooks registered on enter.

    Fully qualified names: from ``root.named_modules()`` when a single root module is given,
    else discovered: a module called while its parent is on the stack gets
    ``parent_fqn + "." + attribute name``; a module called with nothing on the stack is a root
    (fqn ``""``). ``watch`` restricts which modules (and their descendants) are checked.
    """

    def __init__(self, watch: Any) -> None:
        self.stack: list[tuple[torch.nn.Module, str, bool]] = []
        self.names: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
        self.watch_ids: set[int] | None = None
        self.watch_fn: ModuleFilter | None = None
        self.handles: list[Any] = []
        self.on_output: Callable[[torch.nn.Module, Any], None] | None = None
        self.on_root: Callable[[], None] | None = None
        self.seen_module = False
        self.compiled: dict[str, str] = {}  # torch.compile'd modules seen: fqn -> class name
        self._keep: list[torch.nn.Module] = []  # watched modules stay alive (ids stay theirs)
        if isinstance(watch, torch.nn.Module):
            for fqn, m in watch.named_modules(remove_duplicate=False):
                self.names.setdefault(m, fqn)
            self._watch_modules([watch])
        elif callable(watch):
            self.watch_fn = watch
        elif watch is not None:
            self._watch_modules(list(watch))

    def _watch_modules(self, mods: list[Any]) -> None:
        for m in mods:
            if not isinstance(m, torch.nn.Module):
                raise TypeError(
                    "modules= takes an nn.Module, an iterable of nn.Module or a callable "
                    f"(module, fqn) -> bool; got an element of type {type(m).__name__}"
                )
        self.watch_ids = {id(m) for m in mods}
        self._keep = mods

    @property
    def watch_all(self) -> bool:
        return self.watch_ids is None and self.watch_fn is None

    def install(self) -> None:
        from torch.nn.modules import module as nnm

        self.handles.append(nnm.register_module_forward_pre_hook(self._pre))
        self.handles.append(nnm.register_module_forward_hook(self._post, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.stack.clear()

    def _child_name(self, parent: torch.nn.Module, module: torch.nn.Module) -> str | None:
        for n, child in parent._modules.items():
            if child is module:
                return n
        for n, child in parent.named_modules():
            if child is module and n:
                return n
        return None

    def _name_of(self, module: torch.nn.Module) -> str:
        name = ""
        if self.stack:
            parent, pfqn, _ = self.stack[-1]
            found = self._child_name(parent, module)
            if found is not None and _is_compiled(parent) and found == "_orig_mod":
                name = pfqn  # the compiled wrapper's module: the user knows it by that name
            elif found is not None:
                name = f"{pfqn}.{found}" if pfqn else found
        self.names[module] = name
        return name

    def _watched(self, module: torch.nn.Module, fqn: str) -> bool:
        parent_watched = self.stack[-1][2] if self.stack else self.watch_all
        if parent_watched:
            return True
        if self.watch_ids is not None:
            return id(module) in self.watch_ids
        if self.watch_fn is not None:
            return bool(self.watch_fn(module, fqn))
        return True

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self.seen_module = True
        if not self.stack and self.on_root is not None:
            self.on_root()
        fqn = self.names.get(module)
        if fqn is None:
            fqn = self._name_of(module)
        if _is_compiled(module):
            self.compiled[fqn or "(root)"] = type(module._orig_mod).__name__
        self.stack.append((module, fqn, self._watched(module, fqn)))

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] is module:
                watched = self.stack[i][2]
                del self.stack[i:]
                if watched and self.on_output is not None:
                    self.on_output(module, output)
                return

    def current(self) -> tuple[str | None, str | None, bool]:
        """(fqn, class name, watched) of the innermost module running now."""
        if self.stack:
            m, fqn, watched = self.stack[-1]
            return fqn, type(m).__name__, watched
        return None, None, self.watch_all
