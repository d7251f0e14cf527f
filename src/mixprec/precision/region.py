"""Execute a precision policy: ``autocast(...)`` regions and per-module ``apply_policy``.

Two executors, one entry point:

* **native** - ``torch.autocast`` with the policy's op lists (:mod:`mixprec.precision.native`),
  for formats the device runs fast (CUDA bf16/fp16; CPU bf16 with AVX512-BF16 or AMX);
* **emulated** - fp32 compute on values rounded bit-exactly with :func:`mixprec.quantize`
  (:mod:`mixprec.precision.emulated`): any format, MX block formats, fp8 scaling recipes,
  narrow accumulators, at close to fp32 speed.

Interception level: a ``TorchFunctionMode`` (``torch`` / ``torch.nn.functional`` / Tensor-method
names, the names of :class:`~mixprec.precision.OpLists`). The roundings themselves are autograd
functions, so backward ops follow the policy through the autograd graph whether ``backward()``
runs inside the region or after it (as with torch.autocast). A dispatch-level mode would see
backward aten ops too, but only while the region is active, and its roundings would be invisible
to autograd. One mode object is pushed while any region is active; regions nest (the innermost
wins) on a thread-local stack; every exit - also by exception - restores the previous state.
Nothing is monkeypatched.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.utils.checkpoint
from torch._ops import OpOverload, OpOverloadPacket
from torch.overrides import TorchFunctionMode

from mixprec.formats.float_format import FloatFormat
from mixprec.frames import is_internal
from mixprec.precision._tracing import trace_cache
from mixprec.precision.accumulate import Accumulate, AccumulateLike
from mixprec.precision.emulated import EmulatedExecutor, mirrored_tags, round_output, tags_mirrored
from mixprec.precision.executor import Executor
from mixprec.precision.fp8 import DEFAULT_RECIPE, RecipeLike, resolve_recipe
from mixprec.precision.native import (
    NativeExecutor,
    cast_output,
    native_is_fast,
    native_unsupported_reason,
)
from mixprec.precision.ops import func_name
from mixprec.precision.policy import FormatSpec, OpLists, Policy
from mixprec.trees import map_outputs

PolicyLike = Policy | str | FloatFormat | FormatSpec | torch.dtype


# ----------------------------------------------------------------------------------------------
# the mode and the region stack
# ----------------------------------------------------------------------------------------------


class _Local(threading.local):
    # Only ever mutated in place, never re-assigned: code dynamo compiles (a module's
    # pre-hook that enters a region, the post-hook that leaves it, each its own frame) replays
    # list mutations, but silently drops attribute assignments on a threading.local, which
    # left one stale mode on the stack per compiled call.
    def __init__(self) -> None:
        self.entries: list[Executor] = []  # innermost last
        self.mode: list[_PolicyMode] = []  # the one pushed mode while any region is active
        self.regions: list[Autocast] = []  # the regions entered in eager code, innermost last


_LOCAL = _Local()


class _PolicyMode(TorchFunctionMode):
    """Routes every torch function call to the innermost region's executor."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        entries = _LOCAL.entries
        if func is _SET_GRAD_ENABLED and entries and args and args[0] is False:
            _check_reentrant_checkpoint(sys._getframe(1))
        name = _region_op(func) if entries else None
        if name is None:
            return func(*args, **kwargs)
        executor = entries[-1]
        if not executor.emulated and torch.compiler.is_compiling():
            return _handle_opaque(executor, func, name, args, kwargs)
        return _dispatch(executor, func, name, args, kwargs)


def _region_op(func: Any) -> str | None:
    """The op name a region acts on (:func:`~mixprec.precision.ops.func_name`), or None for a
    call that passes through: metadata and conversions (``size``, ``_is_view``, ...), and the
    calls a compiled graph makes at run time.

    Dynamo traces a region's mode into the graph (the emulation is in it) but leaves the mode
    active while the graph runs, so the mode sees the graph's own calls again: ATen overloads
    (``torch.ops.aten.mm.default``, ``torch.ops.mixprec.round.default``) and the torch
    functions inductor's generated code calls directly, its extern kernels
    (``extern_kernels.addmm(..., out=buf)``, ``extern_kernels.convolution(...)``). Both pass
    through unchanged: their operands were rounded inside the graph. The user's own calls,
    ``out=`` ones included, are emulated.
    """
    if isinstance(func, (OpOverload, OpOverloadPacket)):
        return None
    name = func_name(func)
    if name is None or torch.compiler.is_compiling() or "torch._inductor" not in sys.modules:
        return name  # traced calls are the user's; no generated code before inductor
    return None if _from_generated_code(sys._getframe(2)) else name


#: source file name -> what its frames are to :func:`_from_generated_code`: ``_GEN`` (inductor's
#: generated code, a file in its cache directory), ``_THROUGH`` (torch's own code: look at its
#: caller) or ``_USER``. Keyed by the file name, whose hash Python caches, not by the code
#: object, whose hash is computed from its bytecode and constants on every lookup (~10 us for a
#: generated graph's ``call``). A file never moves, so an entry never goes stale.
_FILES: dict[str, int] = {}
_USER, _GEN, _THROUGH = 0, 1, 2
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _from_generated_code(frame: FrameType | None) -> bool:
    """Is ``frame``, the caller of a torch function, inductor's generated code, directly or
    through torch's own Python? Inductor calls some extern kernels through Python wrappers of its
    own (``bias_addmm``, ``conv1x1_via_mm``), and a function mode stacked above this one calls
    the function again from its ``__torch_function__``: such frames are looked through to their
    callers (a few). Generated code calls no user code, so an eager op never has it among its
    callers. One dict lookup per frame: every op of an eager region asks once anything has
    imported inductor."""
    for _ in range(6):
        if frame is None:
            return False
        code = frame.f_code
        kind = _FILES.get(code.co_filename)
        if kind is None:
            kind = _file_kind(code.co_filename)
        if kind == _GEN:
            return True
        if kind == _USER and code.co_name != "__torch_function__":
            return False
        frame = frame.f_back
    return False


def _file_kind(filename: str) -> int:
    if len(_FILES) > 4096:  # a long session's exec'd sources: bound the map
        _FILES.clear()
    root = _inductor_cache_dir(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    if filename.startswith(root):
        kind = _GEN
    elif filename.startswith(_TORCH_DIR):
        kind = _THROUGH
    else:
        kind = _USER
    _FILES[filename] = kind
    return kind


@trace_cache(maxsize=8)
def _inductor_cache_dir(env: str | None) -> str:
    """Inductor's cache directory for this value of its environment variable, asked once: the
    lookup stats the file system (~8 us)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def _dispatch(
    executor: Executor, func: Callable[..., Any], name: str, args: tuple, kwargs: dict
) -> Any:
    # saved-tensor hooks on top (rare): a checkpoint's forward? (a traced graph has none)
    if not torch.compiler.is_compiling():
        hooks = _top_saved_tensors_hooks(False)
        if hooks is not None:
            _check_checkpoint(hooks)
    if kwargs.get("out") is not None:
        return _into_out(executor, func, name, args, kwargs)
    return executor.handle(func, name, args, kwargs)


def _into_out(executor: Executor, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
    """The user's ``out=`` call: the op as the region computes it, copied into ``out`` (which
    is resized like torch resizes it). Cost: one copy per output."""
    out = kwargs["out"]
    result = executor.handle(func, name, args, {k: v for k, v in kwargs.items() if k != "out"})
    outs = out if isinstance(out, (tuple, list)) else (out,)
    results = result if isinstance(result, (tuple, list)) else (result,)
    for o, r in zip(outs, results, strict=True):
        if o.shape != r.shape:
            o.resize_(r.shape)
        o.copy_(r)
    return out


def _handle_opaque(executor: Executor, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
    # Native regions stay opaque to torch.compile (tracing their torch.autocast switching per op
    # is neither done nor tested): a compiled model called inside one runs its ops eagerly
    # through this handler (graph breaks), with eager's results.
    # (Emulated regions are traced: see docs/autocast.md, "torch.compile".) The wrapper is built
    # on first use: torch.compiler.disable imports torch._dynamo, about a second.
    global _OPAQUE
    if _OPAQUE is None:
        _OPAQUE = torch.compiler.disable(_dispatch)
    return _OPAQUE(executor, func, name, args, kwargs)


_OPAQUE: Any = None


def _push(executor: Executor) -> None:
    local = _LOCAL
    if not local.mode:
        mode = _PolicyMode()
        mode.__enter__()
        local.mode.append(mode)
    local.entries.append(executor)


def _pop(executor: Executor) -> None:
    local = _LOCAL
    if not local.entries or local.entries[-1] is not executor:
        # exits out of order (a generator left open, ...): drop it wherever it is
        if executor in local.entries:
            local.entries.remove(executor)
    else:
        local.entries.pop()
    if not local.entries and local.mode:
        local.mode.pop().__exit__(None, None, None)


def checkpoint_context() -> tuple[
    contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]
]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False,
    context_fn=mixprec.checkpoint_context)``: the recomputation in backward runs in the regions
    active when the forward ran, so activation checkpointing keeps emulation bit-exact.

    Without it the recomputation runs outside any region, in plain fp32, and the gradients
    differ from the same step without checkpointing. Called by torch at the forward, it
    captures the regions (outermost first) and returns ``(forward, re-entry)``; each region is
    entered again as a fresh entry (see :class:`Autocast`). Both keep the format tags of the
    segment's tensors on their storages too (:func:`~.emulated.mirrored_tags`), so tensors torch
    hands back through saved-tensor hooks, as nested checkpoints' inputs are (Swin checkpoints
    its stages and their layers), keep their formats. HF transformers:
    ``model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant":
    False, "context_fn": mixprec.checkpoint_context})``. Exact for every stateless setting;
    fp8 delayed scaling advances its amax history during the recomputation too, so its
    recomputed values can differ.
    """
    return mirrored_tags(), _recomputed(tuple(_LOCAL.regions))


class CheckpointPrecisionWarning(UserWarning):
    """``torch.utils.checkpoint`` inside a region without ``context_fn=
    mixprec.checkpoint_context``: its recomputation in backward runs outside the region, so
    the gradients differ from the same step without checkpointing."""


_SET_GRAD_ENABLED = torch._C._set_grad_enabled
_top_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_REENTRANT_FORWARD = torch.utils.checkpoint.CheckpointFunction.forward.__code__
_CHECKPOINT_ADVICE = (
    "torch.utils.checkpoint inside a mixprec.autocast region{how}: the recomputation in "
    "backward runs outside the region (plain float32 where the region emulates), so the "
    "gradients differ from the same step without checkpointing. Pass use_reentrant=False, "
    "context_fn=mixprec.checkpoint_context (HF transformers: "
    "model.activation_checkpointing_enable(activation_checkpointing_kwargs="
    "{{'use_reentrant': False, 'context_fn': mixprec.checkpoint_context}}))"
)


def _check_checkpoint(hooks: tuple[Any, Any]) -> None:
    """Warn when an op of a region runs in the forward of a non-reentrant checkpoint made
    without :func:`checkpoint_context`: ``hooks``, the saved-tensor hooks on top (read by
    :func:`_dispatch`, one C call per op), are torch's checkpoint's, and ours do not mirror
    tags."""
    if getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint" and not tags_mirrored():
        _warn_checkpoint(" without context_fn=mixprec.checkpoint_context")


def _check_reentrant_checkpoint(frame: FrameType | None) -> None:
    """Warn when grad mode is switched off by a reentrant checkpoint's forward (it takes no
    ``context_fn``). Runs only on ``torch.no_grad()`` entries in a region: a few frames."""
    if torch.compiler.is_compiling():  # (dynamo does not trace frame objects)
        return
    for _ in range(4):
        if frame is None:
            return
        if frame.f_code is _REENTRANT_FORWARD:
            _warn_checkpoint(" with use_reentrant=True")
            return
        frame = frame.f_back


def _warn_checkpoint(how: str) -> None:
    warnings.warn(
        _CHECKPOINT_ADVICE.format(how=how), CheckpointPrecisionWarning, stacklevel=_user_level()
    )


def _user_level() -> int:
    """The ``stacklevel`` of the innermost caller outside torch and mixprec (the user's line
    that called the checkpoint), for :func:`warnings.warn` called by our caller."""
    frame, level = sys._getframe(2), 2
    while frame is not None and is_internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


@contextlib.contextmanager
def _recomputed(regions: tuple[Autocast, ...]) -> Iterator[None]:
    with mirrored_tags(), _entered(regions):
        yield


def _forget(region: Autocast) -> None:
    """Drop ``region``'s innermost entry from the eager region stack."""
    regions = _LOCAL.regions
    for i in range(len(regions) - 1, -1, -1):
        if regions[i] is region:
            del regions[i]
            return


@contextlib.contextmanager
def _entered(regions: tuple[Autocast, ...]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for region in regions:
            stack.enter_context(region)
        yield


def current_policy() -> Policy | None:
    """The policy of the innermost active region on this thread (None outside regions)."""
    entries = _LOCAL.entries
    return entries[-1].policy if entries else None


def is_emulating() -> bool:
    """True inside an emulated region (innermost region decides)."""
    entries = _LOCAL.entries
    return bool(entries) and entries[-1].emulated


# ----------------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------------


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_DEFAULT_OP_LISTS = OpLists()  # one object: validated once, one op-category cache


def _coerce_op_lists(op_lists: Any) -> OpLists:
    if op_lists is None:
        return _DEFAULT_OP_LISTS
    if not isinstance(op_lists, OpLists):
        raise TypeError(f"op_lists must be an OpLists or None, got {type(op_lists).__name__}")
    return op_lists


def _check_emulate(emulate: Any) -> bool | None:
    if emulate is not None and not isinstance(emulate, bool):
        raise TypeError(f"emulate must be None, True or False, got {emulate!r}")
    return emulate


def _check_device_type(device_type: Any) -> str:
    if device_type is None:
        return _default_device_type()
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu', 'cuda' or None, got {device_type!r}")
    return device_type


def _with_scale_rounding(policy: Policy, scale_rounding: str | None) -> Policy:
    if scale_rounding is None or scale_rounding == policy.scale_rounding:
        return policy
    return policy.replace(scale_rounding=scale_rounding)


# ----------------------------------------------------------------------------------------------
# autocast
# ----------------------------------------------------------------------------------------------


class Autocast:
    """A policy region (returned by :func:`autocast`); a context manager and a decorator.

    Attributes: ``policy``, ``emulated`` (the executor chosen), ``op_lists``, ``accumulate``
    (an :class:`~mixprec.precision.Accumulate` or None), ``fp8_recipe`` (the
    :class:`~mixprec.precision.Fp8Recipe` in use, the policy's default one included, or None),
    ``device_type``. The same object may be
    entered again (also nested); every entry gets a fresh :class:`~.executor.Executor` (operand
    caches, op counters for fp8 slots).
    """

    def __init__(
        self,
        policy_or_format: PolicyLike,
        *,
        emulate: bool | None = None,
        op_lists: OpLists | None = None,
        accumulate: AccumulateLike = None,
        fp8_recipe: RecipeLike = DEFAULT_RECIPE,
        scale_rounding: str | None = None,
        device_type: str | None = None,
        scope: str = "",
    ) -> None:
        self.policy = _with_scale_rounding(Policy.coerce(policy_or_format), scale_rounding)
        emulate = _check_emulate(emulate)
        self.op_lists = _coerce_op_lists(op_lists)
        self.accumulate = Accumulate.coerce(accumulate)
        self.fp8_recipe = resolve_recipe(fp8_recipe, self.policy)
        self.device_type = _check_device_type(device_type)
        self.scope = scope
        reason = native_unsupported_reason(
            self.policy, accumulate=self.accumulate, recipe=self.fp8_recipe
        )
        if emulate is False and reason is not None:
            raise ValueError(f"emulate=False (native execution) is impossible: {reason}")
        if emulate is None:
            fast = native_is_fast(self.policy.compute_format, self.device_type)
            emulate = reason is not None or not fast
        self.emulated: bool = emulate
        self._active: list[Executor] = []

    def _for_scope(self, scope: str) -> Autocast:
        """The same region for one module of :func:`apply_policy` (``scope`` names fp8 slots)."""
        region = copy.copy(self)
        region.scope = scope
        region._active = []
        return region

    def _executor(self) -> Executor:
        if self.emulated:
            return EmulatedExecutor(
                self.policy,
                self.op_lists,
                accumulate=self.accumulate,
                recipe=self.fp8_recipe,
                scope=self.scope,
            )
        return NativeExecutor(
            self.policy, self.op_lists, device_type=self.device_type, scope=self.scope
        )

    def __enter__(self) -> Autocast:
        ex = self._executor()
        ex.enter()
        _push(ex)
        self._active.append(ex)
        if not torch.compiler.is_compiling():  # (for checkpoint_context, an eager seam)
            _LOCAL.regions.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        ex = self._active.pop()
        if not torch.compiler.is_compiling():
            _forget(self)
        try:
            _pop(ex)
        finally:
            ex.exit()

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` run inside this region. Under ``torch.compile(autocast(...)(fn))`` the region
        is entered inside the compiled function, the fast placement (docs/autocast.md). The
        wrapper calls ``__enter__``/``__exit__`` itself: dynamo cannot trace a ``with`` on a
        context manager made outside the compiled function, but traces these calls.

        Raises ``TypeError`` when ``fn`` is not callable."""
        if not callable(fn):
            raise TypeError(
                f"autocast(...) decorates a callable (a function or module); got "
                f"{type(fn).__name__}: {fn!r}"
            )

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.__enter__()
            try:
                return fn(*args, **kwargs)
            finally:
                self.__exit__(None, None, None)

        # a code object of its own per decorated function: dynamo keeps its compiled entries
        # per code object, and with one shared wrapper code the ninth decorated function to
        # compile would hit the recompile limit (a hard error under fullgraph=True)
        wrapper.__code__ = wrapper.__code__.replace()
        return wrapper

    def __repr__(self) -> str:
        how = "emulated" if self.emulated else f"native {self.device_type}"
        extra = ""
        if self.accumulate is not None:
            extra += f", accumulate={self.accumulate}"
        if self.fp8_recipe is not None:
            extra += f", fp8_recipe={type(self.fp8_recipe).__name__}"
        return f"autocast({str(self.policy)!r}, {how}{extra})"


def autocast(
    policy_or_format: PolicyLike,
    *,
    emulate: bool | None = None,
    op_lists: OpLists | None = None,
    accumulate: AccumulateLike = None,
    fp8_recipe: RecipeLike = DEFAULT_RECIPE,
    scale_rounding: str | None = None,
    device_type: str | None = None,
) -> Autocast:
    """Run the ops inside a ``with`` block under a precision policy.

    Args:
        policy_or_format: a :class:`~mixprec.precision.Policy`, a policy string
            (``"p=f32,c=bf16,o=f32"``) or a single format (``"bf16"``, ``"e4m3"``,
            ``"mxfp4_e2m1"``, ``torch.float16``), which means ``Policy(compute=format)``.
        emulate: ``None`` picks native torch.autocast when the compute format is a dtype the
            device runs fast (CUDA bf16/fp16; CPU bf16 with AVX512-BF16/AMX) and the policy
            needs nothing native cannot do, else emulation. ``True``/``False`` force it
            (``False`` raises ``ValueError`` when native execution cannot express the policy).
        op_lists: :class:`~mixprec.precision.OpLists` (default: ``OpLists()``).
        accumulate: emulate a narrower accumulator in matmul-family ops: a format
            (``"float16"``) or ``(format, block_k)``; the running sum is rounded after every
            block of ``block_k`` (default 32) products of K. Emulated only.
        fp8_recipe: ``CurrentScaling()``, ``DelayedScaling()`` (keep the object across steps)
            or ``"current"``: per-tensor scaled fp8 operands (e4m3 forward; e5m2 gradients
            for ``fp8_format="HYBRID"``). The policy's compute format then only decides how
            results are stored (e.g. ``"bf16"``: fp8 GEMMs writing bf16, Transformer Engine
            style). Emulated only. The default, ``DEFAULT_RECIPE``, gives an 8-bit float
            compute format (``"e4m3"``, ...) per-tensor current scaling
            (:func:`~mixprec.precision.default_recipe`), other formats none; ``None`` means
            raw, unscaled rounding.
        scale_rounding: the shared-exponent rule of the policy's MX formats (``"floor"``,
            ``"rceil"``, ``"ceil"``, ``"even"``; see :func:`mixprec.mx_quantize`); ``None``
            keeps the policy's (``Policy.scale_rounding``, default ``"floor"``).
        device_type: ``"cpu"`` or ``"cuda"`` for native execution (default: cuda if available).

    Returns an :class:`Autocast` (context manager / decorator). Entering is cheap; inside,
    every torch function call costs one Python call of the mode (microseconds).
    """
    return Autocast(
        policy_or_format,
        emulate=emulate,
        op_lists=op_lists,
        accumulate=accumulate,
        fp8_recipe=fp8_recipe,
        scale_rounding=scale_rounding,
        device_type=device_type,
    )


# ----------------------------------------------------------------------------------------------
# apply_policy
# ----------------------------------------------------------------------------------------------


@dataclass
class PolicyHandle:
    """Hooks installed by :func:`apply_policy`; ``remove()`` (or leaving ``with``) undoes them.

    Attributes: ``modules`` - the qualified names of the modules that got the policy (``""`` is
    the root); ``policy``; ``emulated``.
    """

    modules: list[str]
    policy: Policy
    emulated: bool
    _hooks: list[Any]

    def remove(self) -> None:
        """Remove every hook (idempotent). Module state was never changed otherwise."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def __enter__(self) -> PolicyHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _cast_outputs(out: Any, ac: Autocast) -> Any:
    spec = ac.policy.output_format
    if ac.emulated:
        return map_outputs(lambda t: round_output(t, spec), out)
    return map_outputs(lambda t: cast_output(t, spec.torch_dtype), out)


def _iter_targets(
    module: torch.nn.Module, filter_fn: Callable[[torch.nn.Module, str], bool] | None
) -> Iterator[tuple[str, torch.nn.Module]]:
    if filter_fn is None:
        yield "", module
        return
    for fqn, m in module.named_modules():
        if filter_fn(m, fqn):
            yield fqn, m


def apply_policy(
    module: torch.nn.Module,
    policy: PolicyLike,
    *,
    filter_fn: Callable[[torch.nn.Module, str], bool] | None = None,
    emulate: bool | None = None,
    op_lists: OpLists | None = None,
    accumulate: AccumulateLike = None,
    fp8_recipe: RecipeLike = DEFAULT_RECIPE,
    scale_rounding: str | None = None,
    device_type: str | None = None,
) -> PolicyHandle:
    """Run ``module`` (or the submodules ``filter_fn`` picks) under ``policy``.

    Each selected module's ``forward`` runs inside ``autocast(policy, ...)`` (a forward
    pre-hook enters it, an always-called forward hook leaves it, also when forward raises) and
    its floating outputs are cast to ``policy.output``. Applied policies nest: a module's own
    policy wins over its parents' inside its forward, so
    ``apply_policy(model, "bf16")`` followed by
    ``apply_policy(model, "fp32", filter_fn=lambda m, name: isinstance(m, nn.LayerNorm))``
    keeps the norms in fp32. Parameters and buffers are never modified.

    Args:
        module: the model.
        policy: as :func:`autocast`'s first argument.
        filter_fn: ``filter_fn(submodule, qualified_name) -> bool``; every module of
            ``module.named_modules()`` (the root has name ``""``) for which it returns True gets
            the policy. ``None``: the root only.
        emulate, op_lists, accumulate, fp8_recipe, scale_rounding, device_type: as
            :func:`autocast`.

    Returns a :class:`PolicyHandle`; ``handle.remove()`` (or ``with apply_policy(...):``)
    restores the module.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, name) -> bool, got {filter_fn!r}")
    # validate once (raises on bad arguments before any hook is installed)
    proto = Autocast(
        policy, emulate=emulate, op_lists=op_lists, accumulate=accumulate,
        fp8_recipe=fp8_recipe, scale_rounding=scale_rounding, device_type=device_type,
    )  # fmt: skip
    hooks: list[Any] = []
    names: list[str] = []
    for fqn, m in _iter_targets(module, filter_fn):
        hooks.extend(_install(m, proto._for_scope(fqn)))
        names.append(fqn)
    return PolicyHandle(names, proto.policy, proto.emulated, hooks)


def _install(m: torch.nn.Module, ac: Autocast) -> list[Any]:
    def pre_hook(mod: torch.nn.Module, args: Any) -> None:
        ac.__enter__()

    def post_hook(mod: torch.nn.Module, args: Any, out: Any) -> Any:
        ac.__exit__(None, None, None)
        if out is None:  # forward raised (always_call) or returned nothing
            return None
        return _cast_outputs(out, ac)

    h1 = m.register_forward_pre_hook(pre_hook)
    h2 = m.register_forward_hook(post_hook, always_call=True)
    return [h1, h2]
