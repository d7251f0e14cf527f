"""The shadow-execution engine behind :func:`mixprec.sanitize`: the dispatch mode (private).

One :class:`ShadowMode` (a ``TorchDispatchMode``) sees every aten op, forward and backward. For
each op it

1. runs the real op unchanged (the user's program computes exactly what it would without us);
2. runs the same op again on *shadow* inputs (:mod:`.shadows`): the float64 copies kept for
   each real float tensor in a side table (:class:`~.store.ShadowStore`), or the input upcast
   where there is none;
3. compares real and shadow outputs and records findings (:mod:`.measurement`).

Which of these an op gets depends on its kind (:mod:`.ops`): views and data movement only
carry shadows along, random and opaque mutating ops are never re-run. Ops are attributed to
modules and source lines (:mod:`.attribution`); backward ops take the module and line recorded
on their autograd node in the forward pass. Gradients are binned into histograms
(:mod:`.gradients`).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.hooks import RemovableHandle

from mixprec.formats import FloatFormat, get_format
from mixprec.frames import user_frame
from mixprec.quantization import register_rounding_observer
from mixprec.sanitizer.attribution import ModuleTracker
from mixprec.sanitizer.findings import Finding, FindingLog, Site, Stats
from mixprec.sanitizer.gradients import GradCollector
from mixprec.sanitizer.measurement import Measurer, ShadowedCall
from mixprec.sanitizer.ops import (
    COMPUTE,
    DROPOUT,
    EXACT,
    OPAQUE,
    RANDOM,
    SKIP,
    VIEWISH,
    OpInfo,
    RealCall,
    RealOpError,
    classify,
)
from mixprec.sanitizer.passes import is_functorch_wrapped, unwrap_functorch
from mixprec.sanitizer.shadows import ShadowInputs, Shadows
from mixprec.sanitizer.tolerances import real_formats
from mixprec.trees import leaves, tensors

aten = torch.ops.aten

_META_KEY = "mixprec.sanitize"  # key in an autograd node's metadata dict

# classify(func) per OpOverload, shared by all runs: keyed by id (an OpOverload hashes in
# Python, ~0.3 us an op); each entry holds its overload, so the id stays that overload's
_OP_INFO: dict[int, tuple[Any, OpInfo]] = {}

# process-wide, not thread-local: on CUDA the autograd engine runs backward (and our gradient
# hooks) on its own device threads, which inherit the dispatch mode but not Python thread-locals
_ACTIVE: list[ShadowMode] = []


def active_engine() -> ShadowMode | None:
    """The running sanitizer, or None (for cooperating modules, e.g. an emulating autocast)."""
    return _ACTIVE[0] if _ACTIVE else None


def record_rounding(
    src: torch.Tensor, dst: torch.Tensor, fmt: Any, op: str = "mixprec.quantize"
) -> None:
    """Tell a running sanitizer that ``dst`` is ``src`` rounded to ``fmt`` outside aten.

    For code that rounds tensors with non-aten kernels, which dispatch cannot see
    (``mixprec.quantize`` reports its own roundings, through its rounding observer): ``dst``
    inherits ``src``'s shadow and the rounding is checked against ``fmt``'s range and
    precision (underflow / overflow). No-op when no sanitizer is active.
    """
    eng = active_engine()
    if eng is not None:
        eng.note_rounding(src, dst, get_format(fmt), op)


class ShadowMode(TorchDispatchMode):
    """Shadows every aten op in ``shadow_dtype``; see the module docstring."""

    def __init__(
        self,
        *,
        shadow_dtype: torch.dtype,
        threshold_bits: float | None,
        track_grads: bool,
        tracker: ModuleTracker,
        dtype_hint: FloatFormat | None,
        memory: float = float("inf"),
    ) -> None:
        super().__init__()
        self.track_grads = track_grads
        self.tracker = tracker
        self.shadows = Shadows(shadow_dtype, memory)
        self.log = FindingLog()
        self.stats = Stats()
        self.measurer = Measurer(
            self.shadows,
            real_formats(threshold_bits, dtype_hint),
            self.log,
            self.stats,
            threshold_bits,
        )
        self.grads = GradCollector()
        self.backward_passes = 0
        self.ops = _OP_INFO  # classification is per overload, the same in every run
        self._need_step = False
        self._last_backward = False
        self._pending: list[torch.Tensor] = []  # outputs of the last op, to label (see _pend)
        self._pending_meta: Any = None
        self._internal = False  # our own bookkeeping ops run under the mode: pass them through
        # tensors given a gradient hook: id -> weak reference (the reference tells a live
        # tensor from a dead one whose id was reused; a WeakIdKeyDictionary probe builds a
        # weak reference object per lookup, ~1 us on every forward op that uses a weight)
        self._hooked: dict[int, weakref.ref[torch.Tensor]] = {}
        self._hook_handles: list[Any] = []
        self._observer: RemovableHandle | None = None  # our quantize observer, while active
        self._stance: Any = None  # torch.compiler's force_eager stance, while active
        tracker.on_output = self._on_module_output if track_grads else None
        tracker.on_root = self._on_root

    @property
    def step(self) -> int:
        return self.log.step

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Install the mode, module hooks and the rounding observer (all undone on failure)."""
        if active_engine() is not None:
            raise RuntimeError("mixprec.sanitize() contexts cannot be nested")
        _ACTIVE.append(self)
        try:
            self.tracker.install()
            self._observer = register_rounding_observer(self._observe_rounding)
            self._run_compiled_eagerly()
            self.__enter__()
        except BaseException:
            self._uninstall()
            raise

    def stop(self) -> None:
        """Remove everything :meth:`start` installed, and the tensor hooks; free the shadows."""
        try:
            self.__exit__(None, None, None)
        finally:
            self._flush_pending()
            self._uninstall()
            for h in self._hook_handles:
                h.remove()
            self._hook_handles.clear()
            self.shadows.clear()

    def _run_compiled_eagerly(self) -> None:
        """torch.compile'd code runs eagerly while we are active: compiled kernels bypass
        dispatch, so they could not be checked (the report lists the compiled modules seen).
        Only where torch._dynamo is loaded: nothing was compiled otherwise."""
        if "torch._dynamo" in sys.modules:
            self._stance = torch.compiler.set_stance("force_eager")
            self._stance.__enter__()

    def _uninstall(self) -> None:
        if self._stance is not None:
            stance, self._stance = self._stance, None
            stance.__exit__(None, None, None)
        if self._observer is not None:
            self._observer.remove()
            self._observer = None
        self.tracker.remove()
        _ACTIVE.clear()

    def mark_step(self) -> None:
        """Start a new step: live tensors are taken as exact from here on (tables cleared)."""
        self.log.step += 1
        self._need_step = False
        self.shadows.clear()
        # forget hooks of tensors that died (long runs would accumulate them)
        self._hook_handles = [h for h in self._hook_handles if h.hooks_dict_ref() is not None]
        self._hooked = {k: r for k, r in self._hooked.items() if r() is not None}

    # -- what the report reads -----------------------------------------------------------------
    def report_findings(self) -> list[Finding]:
        return self.log.findings()

    def report_stats(self) -> dict[str, Any]:
        stats = self.stats.to_dict(self.step, self.backward_passes)
        if self.tracker.compiled:  # additive: only present when compiled modules ran
            stats["compiled_run_eagerly"] = sorted(self.tracker.compiled)
        return stats

    def report_gradients(self) -> dict[str, Any] | None:
        return self.grads.data(self.track_grads)

    # -- autograd labels and gradient hooks ----------------------------------------------------
    def _pend(self, out: Any, meta: tuple[Site, bool]) -> None:
        """Label ``out``'s autograd nodes at the next op (their grad_fn is set after we return)."""
        if not torch.is_grad_enabled():
            return
        self._pending = tensors(out)
        self._pending_meta = meta

    def _flush_pending(self) -> None:
        """Label the autograd nodes of the previous op's outputs with module and location."""
        pend, meta = self._pending, self._pending_meta
        self._pending = []
        for t in pend:
            gf = t.grad_fn
            if gf is not None:
                md = gf.metadata
                if _META_KEY not in md:
                    md[_META_KEY] = meta

    def _on_root(self) -> None:
        """A root module's forward begins: the first one after a backward starts a new step."""
        if self._need_step:
            self.mark_step()

    def _on_module_output(self, module: torch.nn.Module, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        # the output's own tensors (a tuple's elements), not tensors nested deeper
        for o in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point():
                self._hook(o, "activation")

    def _hook_leaves(self, args: tuple[Any, ...]) -> None:
        """Weight gradients: hook the leaf tensors (parameters) a forward op uses."""
        if not (self.track_grads and torch.is_grad_enabled()):
            return
        for a in args:
            if (
                isinstance(a, torch.Tensor)
                and a.requires_grad
                and a.grad_fn is None
                and a.is_floating_point()
            ):
                self._hook(a, "weight")

    def _hook(self, t: torch.Tensor, kind: str) -> None:
        ref = self._hooked.get(id(t))
        if ref is None or ref() is not t:
            self._hooked[id(t)] = weakref.ref(t)
            self._hook_handles.append(t.register_hook(self._grad_hook(kind)))

    def _grad_hook(self, kind: str) -> Callable[[torch.Tensor], None]:
        ref = weakref.ref(self)

        def hook(grad: torch.Tensor) -> None:
            eng = ref()
            if eng is None or active_engine() is not eng:
                return
            eng._internal = True  # our own ops (the shadow's as_strided) pass through
            try:
                if is_functorch_wrapped(grad):
                    # torch.func (grad, vmap): the values under the wrappers, all samples at
                    # once, and our own tensors outside the transform
                    with torch._C._DisableFuncTorch():
                        eng._bin_gradient(kind, unwrap_functorch(grad))
                else:
                    eng._bin_gradient(kind, grad)
            finally:
                eng._internal = False

        return hook

    def _bin_gradient(self, kind: str, grad: torch.Tensor) -> None:
        # a gradient covering its storage is binned from the flat shadow, without building a
        # view (an op through this mode: ~6 us)
        store = self.shadows.store
        ent = store.whole(grad)
        if ent is None:
            view = store.get(grad)
            ent = (grad if view is None else view[0], None)
        shadow, smax = ent
        if not self.grads.add_fast(kind, shadow, smax):  # the C kernel: no torch op
            # the torch binning is a handful of small ops: run them outside the mode
            with _disable_current_modes():
                self.grads.add(kind, shadow, smax)

    # -- cooperation with non-aten rounding (mixprec.quantize) ---------------------------------
    def _observe_rounding(self, src: torch.Tensor, dst: torch.Tensor, fmt: FloatFormat) -> None:
        """mixprec.quantize's observer: dst holds src rounded to fmt (e.g. emulated autocast).
        Under torch.func (vmap), the values under the wrappers, all samples at once, checked
        outside the transform (it refuses the checks' reads of counts)."""
        if self.measurer.rounding:  # our own rounding of shadows
            return
        if is_functorch_wrapped(src) or is_functorch_wrapped(dst):
            with torch._C._DisableFuncTorch():
                self.note_rounding(
                    unwrap_functorch(src), unwrap_functorch(dst), fmt, "mixprec.quantize"
                )
            return
        self.note_rounding(src, dst, fmt, "mixprec.quantize")

    def note_rounding(
        self, src: torch.Tensor, dst: torch.Tensor, fmt: FloatFormat, op: str
    ) -> None:
        """``dst`` inherits ``src``'s shadow; the rounding is checked in ``fmt``."""
        store = self.shadows.store
        ent = store.get(src)
        s = src.detach().to(self.shadows.dtype) if ent is None else ent[0]
        if dst.dtype in self.shadows.shadowable:
            store.put(dst, s)
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        module, module_type, _ = self.tracker.current()
        site = Site(module, module_type, user_frame())
        self._internal = True
        try:
            self.measurer.check_rounding(op, phase, site, s, dst, fmt)
        finally:
            self._internal = False

    # -- the dispatch hook ---------------------------------------------------------------------
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # False: torch then leaves __torch_dispatch__ unwrapped, and it applies the same
        # wrapper itself where dynamo could trace its frames. torch's wrapper imports
        # torch._dynamo on the first call (1.5 s before the first sanitized op of a process
        # that never compiles anything) and costs ~1 us per op (3 % of a small model's step).
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Dynamo can trace these frames only once it is loaded, and not under the force_eager
        # stance set at start where it was loaded then (no compiled call installs its frame
        # hook): so only where it was first loaded inside the region
        if self._stance is None and "torch._dynamo" in sys.modules:
            return _dispatch_without_dynamo(self, func, types, args, kwargs)
        return self._torch_dispatch(func, types, args, kwargs)

    def _torch_dispatch(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._internal:  # our own bookkeeping ops (gradient hooks, note_rounding)
            return func(*args, **kwargs)
        call = RealCall(func, args, kwargs)
        try:
            return self._dispatch(call)
        except RealOpError as wrapped:  # the user's op failed: their error, unchanged
            raise wrapped.exc.with_traceback(wrapped.exc.__traceback__) from None
        except Exception as exc:  # a sanitizer bug must never break the user's program
            return self._recover(call, exc)

    def _recover(self, call: RealCall, exc: Exception) -> Any:
        """After an internal error: count it, and give the user the real result. Calls on
        meta tensors (no values: torch's reference decompositions check shapes with them,
        e.g. under forward-mode AD) have nothing to shadow and are not errors."""
        if not any(t.is_meta for t in tensors((call.args, call.kwargs))):
            name = str(call.func)
            Stats.count(self.stats.internal_errors, name)
            self.stats.last_internal_error = f"{name}: {type(exc).__name__}: {exc}"
        if not call.ran:
            return call.func(*call.args, **call.kwargs)
        self.shadows.drop(call.out)
        self._after_unshadowed(self._op_info(call.func), call)
        return call.out

    def _op_info(self, func: Any) -> OpInfo:
        hit = self.ops.get(id(func))
        if hit is not None:
            return hit[1]
        info = classify(func)
        self.ops[id(func)] = (func, info)
        return info

    def _dispatch(self, call: RealCall) -> Any:
        if self._pending:
            self._flush_pending()
        info = self._op_info(call.func)
        call.op = info.op
        backward = torch._C._current_graph_task_id() != -1
        if backward and not self.track_grads:
            return call.run()
        if info.plain_view:
            return self._plain_view(call, backward)
        site, watched = self._backward_site() if backward else self._forward_site(info)
        self.stats.ops += 1
        if not watched or info.kind == SKIP:
            out = call.run()
            self._after_unshadowed(info, call)
        else:
            if not backward:
                self._hook_leaves(call.args)
            out = self._route(call, info, "backward" if backward else "forward", site)
        if not backward and self.track_grads:
            self._pend(out, (site, watched))
        return out

    def _plain_view(self, call: RealCall, backward: bool) -> Any:
        """A view whose backward cannot round (half of a transformer's ops): no source line,
        no autograd label; only the pass bookkeeping, the weight-gradient hooks, and
        :meth:`_view`."""
        self.stats.ops += 1
        if backward:
            self._enter_backward()
            return self._view(call)
        self._enter_forward()
        self._hook_leaves(call.args)  # a weight used through a view (linear's weight.t())
        return self._view(call)

    def _enter_forward(self) -> None:
        """A forward op: code without modules starts a new step at the first one after a
        backward."""
        self._last_backward = False
        if self._need_step and not self.tracker.seen_module:
            self.mark_step()

    def _enter_backward(self) -> None:
        """A backward op: the first one after forward ops starts a new backward pass."""
        if not self._last_backward:
            self.backward_passes += 1
            self._need_step = True
        self._last_backward = True

    def _forward_site(self, info: OpInfo) -> tuple[Site, bool]:
        self._enter_forward()
        module, module_type, watched = self.tracker.current()
        # the stack walk only where the line is used: checked ops, or autograd labels
        used = (watched and info.kind != SKIP) or self.track_grads
        return Site(module, module_type, user_frame() if used else None), watched

    def _backward_site(self) -> tuple[Site, bool]:
        self._enter_backward()
        node = torch._C._current_autograd_node()
        meta = node.metadata.get(_META_KEY) if node is not None else None
        if meta is None:
            return Site(None, None, user_frame()), self.tracker.watch_all
        return meta  # (site, watched) of the forward op that made the node

    def _route(self, call: RealCall, info: OpInfo, phase: str, site: Site) -> Any:
        """Run a watched op by its kind: shadowed, carried along, or only tracked."""
        if info.kind in (RANDOM, OPAQUE) or (
            info.dropout_at is not None and call.arg(info.dropout_at)
        ):
            out = call.run()
            self._after_unshadowed(info, call)
            return out
        if info.kind == VIEWISH:
            return self._view(call)
        # shadow inputs before the real op: in-place ops overwrite their inputs
        lazy = info.kind == EXACT
        inputs = self.shadows.inputs(call.args, lazy=lazy, compute=info.kind == COMPUTE)
        if info.kind == DROPOUT:
            return self._dropout(call, inputs)
        if info.copy and inputs.has_shadow:
            return self._copy(call, inputs)
        if not inputs.any_float or (lazy and not inputs.has_shadow):
            # nothing to shadow: all float inputs are exact and the op does not round
            out = call.run()
            if info.written:
                self._after_unshadowed(info, call)
            if lazy and call.func is aten.where.self:
                self.measurer.check_where(info.name, call.args, phase, site)
            return out
        return self._shadowed(call, info, phase, site, inputs)

    def _view(self, call: RealCall) -> Any:
        """A view op: its outputs alias its input's storage. Where that storage has a whole
        shadow they already have theirs (views of it, derived on lookup): no lookup of the
        input's shadow, no re-run, no measurement: one table probe. Only a partially shadowed
        storage has the op re-run on the shadows."""
        out = call.run()
        base = call.args[0] if call.args else None
        if isinstance(base, torch.Tensor) and self.shadows.aliased(base, out):
            return out
        if not self.tracker.current()[2]:
            return out  # an unwatched module: its tensors are taken as exact
        inputs = self.shadows.inputs(call.args, lazy=True, compute=False)
        if inputs.has_shadow:
            self.shadows.views(call.func, call.args, call.kwargs, inputs, out)
        return out

    def _copy(self, call: RealCall, inputs: ShadowInputs) -> Any:
        """An exact copy (``clone``, ``alias_copy``, ...): its output's shadow is the input's:
        no float64 copy when their layouts agree (shared in the store, copied on write), one
        copy into the output's layout otherwise."""
        out = call.run()
        src = inputs.args[0]
        if isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor):
            # a new tensor over the same storage: the store counts the sharing (copy on write)
            self.shadows.put([out], [src.detach()], inputs.err, cause=inputs.cause)
            self.stats.ops_shadowed += 1  # shadowed, at the cost of a table entry
        return out

    def _dropout(self, call: RealCall, inputs: ShadowInputs) -> Any:
        """Dropout is shadowed through its mask (never re-run: it would draw new randoms)."""
        out = call.run()
        if inputs.has_shadow:
            p = call.args[1]
            scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
            shadow = inputs.args[0] * out[1] * scale
            self.shadows.store.put(out[0], shadow, inputs.err, cause=inputs.cause)
        return out

    def _shadowed(
        self, call: RealCall, info: OpInfo, phase: str, site: Site, inputs: ShadowInputs
    ) -> Any:
        """Run the op for real and on the shadows; carry or measure the results."""
        lazy = info.kind == EXACT
        sargs = self.shadows.fill(call.args, inputs.args) if lazy else inputs.args
        skwargs = self.shadows.kwargs(call.kwargs)
        if info.half_to_float is not None and len(sargs) > info.half_to_float:
            sargs[info.half_to_float] = False
        if info.written:
            _own_view_shadows(info, call, sargs)
        out = call.run()
        self.stats.ops_shadowed += 1
        sfunc = info.functional or call.func
        try:
            sout = info.shadow_op(*sargs, **skwargs)
        except Exception:  # an op without a float64 kernel here: carry on unshadowed
            Stats.count(self.stats.ops_unshadowed, info.name)
            self._after_unshadowed(info, call)
            self.shadows.drop(out)
            return out
        reals, souts = self._results(info, call, out, sout)
        if info.kind == EXACT:
            self.shadows.put(reals, souts, inputs.err, cause=inputs.cause)
            if call.func is aten.where.self:
                self.measurer.check_where(info.name, call.args, phase, site)
        else:
            shadowed = ShadowedCall(info, sfunc, call, sargs, skwargs, inputs, phase, site)
            self.measurer.measure(shadowed, reals, souts)
        return out

    def _results(self, info: OpInfo, call: RealCall, out: Any, sout: Any) -> tuple[list, list]:
        """(real results, their shadows). In-place: the real result lives in the first mutated
        argument, and its new shadow is written into its storage's shadow (views of it stay
        consistent); any other mutated argument is taken as exact from now on."""
        if not info.written:
            return leaves(out), leaves(sout)
        for w in info.written[1:]:
            self.shadows.drop(call.arg(w))
        return [call.arg(info.written[0])], leaves(sout)[:1]

    def _after_unshadowed(self, info: OpInfo, call: RealCall) -> None:
        """A mutation we did not shadow: the mutated tensors are exact from now on."""
        for w in info.written:
            self.shadows.forget(call.arg(w))


# what TorchDispatchMode does to every subclass's __torch_dispatch__ (imports dynamo lazily)
_dispatch_without_dynamo = torch._disable_dynamo(ShadowMode._torch_dispatch, recursive=True)


def _own_view_shadows(info: OpInfo, call: RealCall, sargs: list[Any]) -> None:
    """Copy the shadows of mutated arguments that are views of part of a storage.

    Such a shadow is a view of its storage's flat shadow, which the op's new shadow is written
    into (so the base and other views see the update); the checks after that still need the
    old values. A mutated whole storage gets a new flat shadow instead: no copy. Cost: one copy
    of the view's shadow per in-place op on a partial view.
    """
    for w in info.written:
        a = call.arg(w)
        if not (isinstance(w, int) and w < len(sargs) and isinstance(a, torch.Tensor)):
            continue
        s = sargs[w]
        if (
            isinstance(s, torch.Tensor)
            and a.numel() * a.element_size() < a.untyped_storage().nbytes()
        ):
            sargs[w] = s.clone()
