"""The shadow-execution engine behind :func:`mixprec.sanitize` (private).

One :class:`ShadowMode` (a ``TorchDispatchMode``) sees every aten op, forward and backward. For
each op it

1. runs the real op unchanged (the user's program computes exactly what it would without us);
2. runs the same op again on *shadow* inputs: the float64 copies kept for each real float tensor
   in a side table (:class:`ShadowStore`), or the input upcast where there is none;
3. compares real and shadow outputs. Only when the comparison says "possibly bad" (the slow path,
   rare on healthy code) does it re-run the op a third time on the shadow inputs rounded to the
   real dtype, to split *local* error (what this op introduced, Herbgrind's idea) from the error
   it inherited, and classify the bad elements into findings.

Side tables are keyed by storage (``StorageWeakRef``) and view geometry, not by Python tensor
identity: autograd hands saved tensors back to backward ops as fresh Python objects over the
same storage, and those must find their shadows. Entries die with the storage (swept lazily).

Nothing here is public; :mod:`mixprec.sanitize` defines the user-facing records and reports.
"""

from __future__ import annotations

import importlib
import math
import os
import struct
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from mixprec.formats.float_format import FloatFormat, get_format
from mixprec.sanitizer.store import ShadowStore

# the module (its name is shadowed by the function in the package namespace)
_mq = importlib.import_module("mixprec.quantization.elementwise")

aten = torch.ops.aten

_LOW = (torch.float16, torch.bfloat16, torch.float32)  # real dtypes that get shadows
_FLOAT = (*_LOW, torch.float64)
_TINY = 2.0**-1022  # smallest normal float64: keeps 0/0 out of the fast path
_AMP = 4.0  # re-check an op locally only if its error is > _AMP x the error it inherited
_META_KEY = "mixprec.sanitize"  # key in an autograd node's metadata dict
_SWEEP_EVERY = 64  # store insertions between sweeps of dead storages
HIST_OFFSET = 1100  # histogram bin index = floor(log2|g|) + HIST_OFFSET (fp64 range -1074..1023)
HIST_BINS = 2200

KINDS = (
    "nan",
    "inf",
    "overflow",
    "decision_flip",
    "underflow",
    "cancellation",
    "precision_loss",
)

# ---------------------------------------------------------------------------------------------
# formats and the bits-lost measure


@dataclass(frozen=True)
class FmtInfo:
    """What the checks need to know about a real tensor's format (precomputed floats)."""

    name: str
    mantissa_bits: int
    eps: float  # 2^-mantissa_bits
    min_normal: float
    max: float
    threshold_bits: float
    tol: float  # relative error above which more than threshold_bits are lost
    floor: float  # 2^-(threshold_bits / 2): noise floor relative to the tensor's max magnitude
    fmt: FloatFormat | None = None  # set for emulated formats (dtype_hint): local-input rounding


def make_fmt_info(fmt: FloatFormat, threshold_bits: float | None) -> FmtInfo:
    p = fmt.mantissa_bits
    thr = p / 2 if threshold_bits is None else float(threshold_bits)
    # bits_lost = log2(rel / eps) + 1  ->  bits_lost > thr  <=>  rel > eps * 2^(thr - 1)
    return FmtInfo(
        name=fmt.name,
        mantissa_bits=p,
        eps=fmt.eps,
        min_normal=fmt.min_normal,
        max=fmt.max,
        threshold_bits=thr,
        tol=fmt.eps * 2.0 ** (thr - 1),
        floor=2.0 ** (-thr / 2),
    )


def bits_lost(rel: float, info: FmtInfo) -> float:
    """Bits of the real format's significand that are wrong for relative error ``rel``.

    ``log2(rel / eps) + 1`` clipped to ``[0, mantissa_bits + 1]``: a correctly rounded result
    (``rel <= eps/2``) loses 0 bits, one ulp of error loses 1 bit, ``rel >= 1`` loses them all.
    """
    if not rel > 0.0:
        return 0.0
    if math.isinf(rel) or math.isnan(rel):
        return float(info.mantissa_bits + 1)
    return min(max(math.log2(rel / info.eps) + 1.0, 0.0), float(info.mantissa_bits + 1))


# ---------------------------------------------------------------------------------------------
# op classification (cached per OpOverload)

_VIEWISH = "view"  # output aliases input: shadow = same op on the shadow
_EXACT = "exact"  # data movement / selection: no rounding, nothing to measure
_COMPUTE = "compute"  # rounds: measure
_RANDOM = "random"  # RNG: never re-run (it would change the user's random stream)
_DROPOUT = "dropout"
_OPAQUE = "opaque"  # mutates something we cannot shadow: invalidate, move on
_SKIP = "skip"  # no float data involved (metadata, integer ops, factories)

_EXACT_PACKETS = {
    "clone", "contiguous", "cat", "stack", "index_select", "gather", "scatter", "index",
    "index_put", "embedding", "masked_fill", "where", "constant_pad_nd", "flip", "roll", "repeat",
    "select_backward", "slice_backward", "narrow_copy", "fill", "zero",
    "neg", "abs", "relu", "threshold_backward", "amax", "amin", "maximum", "minimum", "clamp",
    "clamp_min", "clamp_max", "hardtanh", "lift_fresh_copy", "alias_copy", "expand_copy",
    "permute_copy", "transpose_copy", "view_copy", "t_copy", "unsqueeze_copy", "squeeze_copy",
    "slice_copy", "select_copy", "detach_copy", "_unsafe_view", "split_with_sizes_copy",
    "unbind_copy", "sign", "sgn", "max_pool2d_with_indices", "masked_scatter", "diag_embed",
    "tril", "triu", "unfold_copy",
}  # fmt: skip
# outputs independent of the inputs' values (empty_*: undefined values) or not tensors: skip
_FACTORY_PACKETS = {
    "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_empty",
    "new_full", "new_empty_strided", "empty_strided", "scalar_tensor", "empty_permuted",
    "_local_scalar_dense", "equal", "is_nonzero", "_assert_async", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset",
}  # fmt: skip
_ADDSUB = {"add", "sub", "rsub"}
# sums of products of the tensor inputs (linear in each): f(|inputs|) = sum of |terms|
_MULTILINEAR = {
    "sum", "mean", "nansum", "cumsum", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv",
    "mv", "dot", "vdot", "convolution", "convolution_backward", "_convolution",
    "embedding_dense_backward", "trace", "_trilinear", "addr", "outer",
}  # fmt: skip
_INDEX_DECISIONS = {  # packet -> (input position, dim position, default dim); None dim = flat
    "argmax": (0, 1, None),
    "argmin": (0, 1, None),
    "max": (0, 1, None),
    "min": (0, 1, None),
    "sort": (0, 1, -1),
    "topk": (0, 2, -1),
    "kthvalue": (0, 2, -1),
    "median": (0, 1, None),
    "mode": (0, 1, -1),
}
_META_MUTATIONS = {"set_", "resize_", "resize_as_", "as_strided_", "_resize_output_"}


@dataclass
class OpInfo:
    name: str
    packet: str
    kind: str
    written: tuple[int | str, ...] = ()  # positions / kwarg names of mutated tensor args
    functional: Any = None  # out-of-place variant for in-place ops
    addsub: bool = False
    multilinear: bool = False  # a sum of products of its tensor inputs (see _abs_run)
    index_decision: tuple[int, int, int | None] | None = None
    half_to_float: int | None = None  # position of _softmax's half_to_float flag


def classify(func: Any) -> OpInfo:
    name = str(func)  # "aten.sub.Tensor"
    packet = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else name
    schema = func._schema
    written: list[int | str] = []
    for i, arg in enumerate(schema.arguments):
        ai = arg.alias_info
        if ai is not None and ai.is_write:
            written.append(arg.name if arg.kwarg_only else i)
    tags = set(func.tags)
    info = OpInfo(name=name, packet=packet, kind=_COMPUTE, written=tuple(written))
    base = packet.rstrip("_") if packet.endswith("_") and not packet.startswith("_") else packet
    info.addsub = base in _ADDSUB
    info.multilinear = base in _MULTILINEAR
    if packet in _FACTORY_PACKETS:
        info.kind = _SKIP
        return info
    if packet in _META_MUTATIONS or torch.Tag.inplace_view in tags:
        info.kind = _OPAQUE
        return info
    if func is aten.native_dropout.default:
        info.kind = _DROPOUT
        return info
    if torch.Tag.nondeterministic_seeded in tags:
        info.kind = _RANDOM if not written else _OPAQUE
        return info
    if written:
        # in-place op: shadow it through its functional variant (same overload name)
        fn = None
        if (packet.endswith("_") and torch.Tag.inplace in tags) or packet == "copy_":
            packet_fn = getattr(aten, base, None)
            if packet_fn is not None:
                fn = getattr(packet_fn, func._overloadname, None)
                if fn is not None and len(fn._schema.arguments) != len(schema.arguments):
                    fn = None
        if fn is None:
            info.kind = _OPAQUE
            return info
        info.functional = fn
    elif getattr(func, "is_view", False):
        info.kind = _VIEWISH
        return info
    if base in _EXACT_PACKETS:
        info.kind = _EXACT
    if base in _INDEX_DECISIONS and not (base in ("max", "min", "median") and "dim" not in name):
        info.index_decision = _INDEX_DECISIONS[base]
    if packet in ("_softmax", "_log_softmax"):
        info.half_to_float = 2
    return info


# ---------------------------------------------------------------------------------------------
# source locations and modules

_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (torch, sys.modules[__name__.rsplit(".", 1)[0]])
)
_code_internal: dict[CodeType, bool] = {}


def _is_internal(code: CodeType) -> bool:
    v = _code_internal.get(code)
    if v is None:
        fn = code.co_filename
        v = fn.startswith(_INTERNAL_DIRS) or fn.startswith("<frozen")
        _code_internal[code] = v
    return v


def user_frame() -> tuple[CodeType, int] | None:
    """(code, line) of the innermost stack frame outside torch and mixprec. Cost: a few µs."""
    f = sys._getframe(1)
    while f is not None:
        if not _is_internal(f.f_code):
            return f.f_code, f.f_lineno
        f = f.f_back
    return None


def format_location(where: tuple[CodeType, int] | None) -> tuple[str | None, str | None]:
    """("file.py:LINE", full path) of a user frame."""
    if where is None:
        return None, None
    code, line = where
    return f"{os.path.basename(code.co_filename)}:{line}", code.co_filename


ModuleFilter = Callable[[torch.nn.Module, str], bool]


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
        if watch is None:
            pass
        elif isinstance(watch, torch.nn.Module):
            for fqn, m in watch.named_modules(remove_duplicate=False):
                self.names.setdefault(m, fqn)
            self.watch_ids = {id(watch)}
            self._keep = [watch]
        elif callable(watch):
            self.watch_fn = watch
        else:
            mods = list(watch)
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

    def _name_of(self, module: torch.nn.Module) -> str:
        if self.stack:
            parent, pfqn, _ = self.stack[-1]
            found = None
            for n, child in parent._modules.items():
                if child is module:
                    found = n
                    break
            if found is None:
                for n, child in parent.named_modules():
                    if child is module and n:
                        found = n
                        break
            if found is not None:
                name = f"{pfqn}.{found}" if pfqn else found
                self.names[module] = name
                return name
        self.names[module] = ""
        return ""

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self.seen_module = True
        if not self.stack and self.on_root is not None:
            self.on_root()
        fqn = self.names.get(module)
        if fqn is None:
            fqn = self._name_of(module)
        parent_watched = self.stack[-1][2] if self.stack else self.watch_all
        if parent_watched:
            watched = True
        elif self.watch_ids is not None:
            watched = id(module) in self.watch_ids
        elif self.watch_fn is not None:
            watched = bool(self.watch_fn(module, fqn))
        else:
            watched = True
        self.stack.append((module, fqn, watched))

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


# ---------------------------------------------------------------------------------------------
# findings accumulation


@dataclass
class Agg:
    """Mutable accumulator for one (kind, op, phase, module, location) key."""

    kind: str
    op: str
    phase: str
    module: str | None
    module_type: str | None
    location: str | None
    path: str | None
    dtype: str
    bits_lost: float | None = None
    rel_error: float | None = None
    count: int = 0
    occurrences: int = 0
    first_step: int = 0
    elements: int = 0
    propagated_bits: float | None = None
    bits_cancelled: float | None = None
    real_value: float | None = None
    shadow_value: float | None = None
    shape: tuple[int, ...] = ()


def _maxopt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


@dataclass
class Stats:
    ops: int = 0
    ops_shadowed: int = 0
    ops_slow_path: int = 0
    ops_unshadowed: dict[str, int] = field(default_factory=dict)
    internal_errors: dict[str, int] = field(default_factory=dict)
    last_internal_error: str | None = None
    steps: int = 0


class GradCollector:
    """log2-magnitude histograms of gradients (exact fp64 shadow values where available).

    Tensors above ``max_elems`` elements are binned on an evenly strided sample of about
    ``max_elems`` elements (the maximum is always exact); ``sampled`` counts how many were.
    """

    def __init__(self, max_elems: int = 1 << 16) -> None:
        self.max_elems = max_elems
        self.sampled: dict[str, int] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.zeros: dict[str, int] = {}
        self.nonfinite: dict[str, int] = {}
        self.max_abs: dict[str, float] = {}
        self.tensors: dict[str, int] = {}

    def add(self, kind: str, g: torch.Tensor, smax: float | None = None) -> None:
        """Bin ``g`` by its exponent field (bit ops and a bincount over a sample; one aminmax
        pass over ``g`` unless its max magnitude ``smax`` is already known).

        float64 (shadows) bins exactly; a float32 gradient's subnormals land in the zero count.
        """
        g = g.detach()
        if not g.is_floating_point() or g.numel() == 0:
            return
        if smax is None:
            lo, hi = torch.aminmax(g)
            mx = max(-float(lo), float(hi))
        else:
            mx = smax
        g = g.reshape(-1) if g.is_contiguous() else g.flatten()
        if not math.isfinite(mx):  # rare: max over the finite values only
            fin = g[torch.isfinite(g)]
            mx = float(fin.abs().max()) if fin.numel() else 0.0
        self.max_abs[kind] = max(self.max_abs.get(kind, 0.0), mx)
        if g.numel() > self.max_elems:  # the shape of the distribution, from a sample
            g = g[:: -(-g.numel() // self.max_elems)]
            self.sampled[kind] = self.sampled.get(kind, 0) + 1
        if g.dtype == torch.float64:
            bits, shift, mask, bias = g.view(torch.int64), 52, 0x7FF, 1023
        else:
            if g.dtype != torch.float32:
                g = g.float()
            bits, shift, mask, bias = g.view(torch.int32), 23, 0xFF, 127
        e = torch.bitwise_and(bits >> shift, mask)
        c = torch.bincount(e.cpu(), minlength=mask + 1)
        if kind not in self.counts:
            self.counts[kind] = torch.zeros(HIST_BINS, dtype=torch.int64)
        # biased exponent b in 1..mask-1 holds [2^(b-bias), 2^(b-bias+1))
        start = 1 - bias + HIST_OFFSET
        self.counts[kind][start : start + mask - 1] += c[1:mask]
        self.zeros[kind] = self.zeros.get(kind, 0) + int(c[0])
        self.nonfinite[kind] = self.nonfinite.get(kind, 0) + int(c[mask])
        self.tensors[kind] = self.tensors.get(kind, 0) + 1


# ---------------------------------------------------------------------------------------------
# the mode

# process-wide, not thread-local: on CUDA the autograd engine runs backward (and our gradient
# hooks) on its own device threads, which inherit the dispatch mode but not Python thread-locals
_ACTIVE: list[ShadowMode] = []


def active_engine() -> ShadowMode | None:
    """The running sanitizer, or None (for cooperating modules, e.g. an emulating autocast)."""
    return _ACTIVE[0] if _ACTIVE else None


def record_rounding(src: torch.Tensor, dst: torch.Tensor, fmt: Any, op: str = "mixprec.quantize"):
    """Tell a running sanitizer that ``dst`` is ``src`` rounded to ``fmt`` outside aten.

    For code that rounds tensors with non-aten kernels (``mixprec.quantize``'s C kernel under
    emulated autocast): ``dst`` inherits ``src``'s shadow and the rounding is checked against
    ``fmt``'s range and precision (underflow / overflow). No-op when no sanitizer is active.
    """
    eng = active_engine()
    if eng is not None:
        eng.note_rounding(src, dst, get_format(fmt), op)


class _RealOpError(Exception):
    """Carries an exception raised by the user's own op through our error handling."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc


def _f32(v: float) -> float:
    """``v`` rounded to float32 (Python scalars reach fp32/fp16/bf16 kernels as float32)."""
    return _struct_f.unpack(_struct_f.pack(v))[0] if math.isfinite(v) else v


_struct_f = struct.Struct("f")
_PRECISION = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}


def _flat(x: Any) -> list[Any]:
    if isinstance(x, (tuple, list)):
        return list(x)
    return [x]


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
    ) -> None:
        super().__init__()
        self.shadow_dtype = shadow_dtype
        self.threshold_bits = threshold_bits
        self.track_grads = track_grads
        self.tracker = tracker
        self.store = ShadowStore(shadow_dtype)
        self.decisions = ShadowStore(None)  # boolean outputs whose shadow differs (where masks)
        self.ops: dict[Any, OpInfo] = {}
        self.aggs: dict[tuple, Agg] = {}
        self.stats = Stats()
        self.grads = GradCollector()
        self.step = 0
        self.backward_passes = 0
        self._need_step = False
        self._last_backward = False
        self._pending: list[Any] = []
        self._pending_meta: Any = None
        self._internal = False
        self._hooked = WeakIdKeyDictionary()
        self._hook_handles: list[Any] = []
        self._fmts: dict[torch.dtype, FmtInfo] = {}
        for dt, name in (
            (torch.float32, "float32"),
            (torch.float16, "float16"),
            (torch.bfloat16, "bfloat16"),
        ):
            self._fmts[dt] = make_fmt_info(get_format(name), threshold_bits)
        if dtype_hint is not None:
            hinted = make_fmt_info(dtype_hint, threshold_bits)
            self._fmts[torch.float32] = FmtInfo(**{**hinted.__dict__, "fmt": dtype_hint})
        if shadow_dtype == torch.float32:  # fp32 shadows only make sense for 16-bit reals
            self._shadowable: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
        else:
            self._shadowable = _LOW
        tracker.on_output = self._on_module_output if track_grads else None
        tracker.on_root = self._on_root

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if active_engine() is not None:
            raise RuntimeError("mixprec.sanitize() contexts cannot be nested")
        _ACTIVE.append(self)
        try:
            self.tracker.install()
            self.__enter__()
            _mq._ROUNDING_OBSERVERS.append(self._observe_rounding)
        except BaseException:
            self.tracker.remove()
            _ACTIVE.clear()
            raise

    def _observe_rounding(self, src: torch.Tensor, dst: torch.Tensor, fmt: FloatFormat) -> None:
        """mixprec.quantize's callback: dst holds src rounded to fmt (e.g. emulated autocast)."""
        self.note_rounding(src, dst, fmt, "mixprec.quantize")

    def stop(self) -> None:
        try:
            if self._observe_rounding in _mq._ROUNDING_OBSERVERS:
                _mq._ROUNDING_OBSERVERS.remove(self._observe_rounding)
            self.__exit__(None, None, None)
        finally:
            self._flush_pending()
            self.tracker.remove()
            for h in self._hook_handles:
                h.remove()
            self._hook_handles.clear()
            self.store.clear()
            self.decisions.clear()
            _ACTIVE.clear()

    def mark_step(self) -> None:
        """Start a new step: live tensors are taken as exact from here on (tables cleared)."""
        self.step += 1
        self._need_step = False
        self.store.clear()
        self.decisions.clear()
        # forget hook handles of tensors that died (long runs would accumulate them)
        self._hook_handles = [h for h in self._hook_handles if h.hooks_dict_ref() is not None]

    # -- helpers -----------------------------------------------------------------------------
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
        for o in _flat(output):
            if (
                isinstance(o, torch.Tensor)
                and o.requires_grad
                and o.is_floating_point()
                and o not in self._hooked
            ):
                self._hooked[o] = True
                self._hook_handles.append(o.register_hook(self._grad_hook("activation")))

    def _grad_hook(self, kind: str) -> Callable[[torch.Tensor], None]:
        ref = weakref.ref(self)

        def hook(grad: torch.Tensor) -> None:
            eng = ref()
            if eng is None or active_engine() is not eng:
                return
            eng._internal = True
            try:
                ent = eng.store.get(grad)
                eng.grads.add(kind, grad if ent is None else ent[0], eng.store.smax(grad))
            finally:
                eng._internal = False

        return hook

    def _hook_leaf(self, t: torch.Tensor) -> None:
        if t not in self._hooked:
            self._hooked[t] = True
            self._hook_handles.append(t.register_hook(self._grad_hook("weight")))

    def _agg(
        self,
        kind: str,
        info: OpInfo,
        phase: str,
        ctx: tuple,
        dtype: str,
        *,
        count: int,
        elements: int,
        bits: float | None,
        rel: float | None,
        propagated: float | None = None,
        cancelled: float | None = None,
        example: tuple[float, float] | None = None,
        shape: tuple[int, ...] = (),
    ) -> None:
        module, module_type, where = ctx
        location, path = format_location(where)
        key = (kind, info.name, phase, module, location)
        a = self.aggs.get(key)
        if a is None:
            a = self.aggs[key] = Agg(
                kind=kind,
                op=info.name,
                phase=phase,
                module=module,
                module_type=module_type,
                location=location,
                path=path,
                dtype=dtype,
                first_step=self.step,
                shape=shape,
            )
        a.count += count
        a.elements += elements
        a.occurrences += 1
        if bits is not None and (a.bits_lost is None or bits > a.bits_lost):
            a.bits_lost, a.rel_error = bits, rel
            if example is not None:
                a.real_value, a.shadow_value = example
        elif a.rel_error is None:
            a.rel_error = rel
        a.propagated_bits = _maxopt(a.propagated_bits, propagated)
        a.bits_cancelled = _maxopt(a.bits_cancelled, cancelled)

    # -- the dispatch hook ---------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._internal:  # our own bookkeeping ops (gradient hooks, note_rounding)
            return func(*args, **kwargs)
        box: list[Any] = [None, False]  # [real output, real op has run]
        try:
            return self._dispatch(box, func, args, kwargs)
        except _RealOpError as wrapped:  # the user's op failed: their error, unchanged
            raise wrapped.exc.with_traceback(wrapped.exc.__traceback__) from None
        except Exception as exc:  # a sanitizer bug must never break the user's program
            name = str(func)
            errs = self.stats.internal_errors
            errs[name] = errs.get(name, 0) + 1
            self.stats.last_internal_error = f"{name}: {type(exc).__name__}: {exc}"
            if not box[1]:
                return func(*args, **kwargs)
            for o in _flat(box[0]):
                if isinstance(o, torch.Tensor):
                    self.store.invalidate(o)
            self._after_unshadowed(self.ops.get(func) or classify(func), args, kwargs)
            return box[0]

    @staticmethod
    def _run_real(box: list[Any], func: Any, args: Any, kwargs: Any) -> Any:
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            raise _RealOpError(exc) from exc
        box[0], box[1] = out, True
        return out

    def _dispatch(self, box: list[Any], func: Any, args: Any, kwargs: Any) -> Any:
        if self._pending:
            self._flush_pending()
        info = self.ops.get(func)
        if info is None:
            info = self.ops[func] = classify(func)
        backward = torch._C._current_graph_task_id() != -1
        if backward:
            if not self.track_grads:
                return self._run_real(box, func, args, kwargs)
            if not self._last_backward:
                self.backward_passes += 1
                self._need_step = True
            self._last_backward = True
            node = torch._C._current_autograd_node()
            meta = node.metadata.get(_META_KEY) if node is not None else None
            if meta is None:
                ctx = (None, None, user_frame())
                watched = self.tracker.watch_all
            else:
                ctx, watched = meta
            phase = "backward"
        else:
            self._last_backward = False
            if self._need_step and not self.tracker.seen_module:
                self.mark_step()
            module, module_type, watched = self.tracker.current()
            ctx = None  # computed lazily (stack walk)
            phase = "forward"
        self.stats.ops += 1

        if not watched or info.kind == _SKIP:
            out = self._run_real(box, func, args, kwargs)
            self._after_unshadowed(info, args, kwargs)
            if not backward and self.track_grads:
                self._pend(out, ((module, module_type, user_frame()), watched))
            return out

        if not backward:
            ctx = (module, module_type, user_frame())
            if self.track_grads and torch.is_grad_enabled():
                for a in args:
                    if (
                        isinstance(a, torch.Tensor)
                        and a.requires_grad
                        and a.grad_fn is None
                        and a.is_floating_point()
                    ):
                        self._hook_leaf(a)

        kind = info.kind
        if kind in (_RANDOM, _OPAQUE):
            out = self._run_real(box, func, args, kwargs)
            self._after_unshadowed(info, args, kwargs)
            if not backward and self.track_grads:
                self._pend(out, (ctx, watched))
            return out

        # shadow inputs (before the real op: in-place ops overwrite their inputs)
        shadowable = self._shadowable
        any_float = False
        has_shadow = False
        e_in = 0.0  # largest error bound among the inputs
        sargs: list[Any] = []
        lazy = kind in (_VIEWISH, _EXACT)
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.dtype in shadowable:
                    any_float = True
                    ent = self.store.get(a)
                    if ent is not None:
                        has_shadow = True
                        sargs.append(ent[0])
                        if not ent[1] <= e_in:
                            e_in = ent[1]
                    else:
                        sargs.append(None if lazy else a.to(self.shadow_dtype))
                    continue
                sargs.append(a)
            elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
                inner = []
                for b in a:
                    if isinstance(b, torch.Tensor) and b.dtype in shadowable:
                        any_float = True
                        ent = self.store.get(b)
                        if ent is not None:
                            has_shadow = True
                            inner.append(ent[0])
                            if not ent[1] <= e_in:
                                e_in = ent[1]
                        else:
                            inner.append(None if lazy else b.to(self.shadow_dtype))
                    else:
                        inner.append(b)
                sargs.append(inner)
            elif type(a) is float and kind == _COMPUTE:
                sargs.append(_f32(a))  # constants enter at the real precision (as in NSan)
            elif isinstance(a, torch.dtype) and a in shadowable:
                sargs.append(self.shadow_dtype)  # e.g. _softmax_backward_data's input_dtype
            else:
                sargs.append(a)

        if kind == _DROPOUT:
            out = self._run_real(box, func, args, kwargs)
            if has_shadow:
                p = args[1]
                mask = out[1]
                scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
                self.store.put(out[0], sargs[0] * mask * scale, e_in)
            if not backward and self.track_grads:
                self._pend(out, (ctx, watched))
            return out

        if not any_float or (lazy and not has_shadow):
            # nothing to shadow: all float inputs are exact and the op does not round
            out = self._run_real(box, func, args, kwargs)
            if info.written:
                self._after_unshadowed(info, args, kwargs)
            if lazy and func is aten.where.self:
                self._check_where(info, args, phase, ctx)
            if not backward and self.track_grads:
                self._pend(out, (ctx, watched))
            return out

        if kind == _VIEWISH:
            # outputs alias an input's storage: their shadows are views of its flat shadow,
            # derived on lookup; only a partially shadowed storage needs the op re-run
            out = self._run_real(box, func, args, kwargs)
            missing = [
                o
                for o in _flat(out)
                if isinstance(o, torch.Tensor)
                and o.dtype in shadowable
                and self.store.get(o) is None
            ]
            base = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if missing and base is not None and all(o.dtype == base.dtype for o in missing):
                # (a dtype-reinterpreting view, e.g. view(torch.float16), has no shadow)
                self._view_shadows(func, args, kwargs, sargs, out, e_in)
            if not backward and self.track_grads:
                self._pend(out, (ctx, watched))
            return out

        if lazy:  # fill in the upcasts we skipped
            sargs = [self._fill(a, s) for a, s in zip(args, sargs, strict=True)]
        skwargs = self._shadow_kwargs(kwargs)
        if info.half_to_float is not None and len(sargs) > info.half_to_float:
            sargs[info.half_to_float] = False

        out = self._run_real(box, func, args, kwargs)
        self.stats.ops_shadowed += 1
        sfunc = info.functional or func
        try:
            sout = sfunc(*sargs, **skwargs)
        except Exception:  # an op without a float64 kernel here: carry on unshadowed
            self.stats.ops_unshadowed[info.name] = self.stats.ops_unshadowed.get(info.name, 0) + 1
            self._after_unshadowed(info, args, kwargs)
            for o in _flat(out):
                if isinstance(o, torch.Tensor):
                    self.store.invalidate(o)
            if not backward and self.track_grads:
                self._pend(out, (ctx, watched))
            return out

        if info.written:
            # in-place: the real result lives in the first mutated argument; its new shadow is
            # written into its storage's shadow below (views of it stay consistent); any other
            # mutated argument is taken as exact from now on
            for w in info.written[1:]:
                t = args[w] if isinstance(w, int) else kwargs.get(w)
                if isinstance(t, torch.Tensor):
                    self.store.invalidate(t)
            reals = [args[w] if isinstance(w, int) else kwargs[w] for w in info.written[:1]]
            shadows = _flat(sout)[:1]
        else:
            reals = _flat(out)
            shadows = _flat(sout)

        if kind in (_VIEWISH, _EXACT):
            for r, s in zip(reals, shadows, strict=False):
                if (
                    isinstance(r, torch.Tensor)
                    and isinstance(s, torch.Tensor)
                    and r.dtype in shadowable
                ):
                    self.store.put(r, s, e_in)
            if func is aten.where.self:
                self._check_where(info, args, phase, ctx)
        else:
            self._measure(
                info,
                func,
                args,
                kwargs,
                sargs,
                skwargs,
                reals,
                shadows,
                has_shadow,
                e_in,
                phase,
                ctx,
            )

        if not backward and self.track_grads:
            self._pend(out, (ctx, watched))
        return out

    # -- pieces ----------------------------------------------------------------------------------
    def _view_shadows(self, func, args, kwargs, sargs, out, e_in: float) -> None:
        sargs = [self._fill(a, s) for a, s in zip(args, sargs, strict=True)]
        try:
            sout = func(*sargs, **self._shadow_kwargs(kwargs))
        except Exception:
            return
        for r, s in zip(_flat(out), _flat(sout), strict=False):
            if (
                isinstance(r, torch.Tensor)
                and isinstance(s, torch.Tensor)
                and r.dtype in self._shadowable
                and self.store.get(r) is None
            ):
                self.store.put(r, s, e_in)

    def _pend(self, out: Any, meta: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self._pending = [o for o in _flat(out) if isinstance(o, torch.Tensor)]
        self._pending_meta = meta

    def _fill(self, a: Any, s: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return a.to(self.shadow_dtype) if s is None else s
        if isinstance(a, (list, tuple)) and isinstance(s, list):
            return [b.to(self.shadow_dtype) if t is None else t for b, t in zip(a, s, strict=True)]
        return s

    def _shadow_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not kwargs:
            return kwargs
        out = {}
        for k, v in kwargs.items():
            if isinstance(v, torch.dtype) and v in self._shadowable:
                v = self.shadow_dtype
            elif type(v) is float:
                v = _f32(v)
            elif isinstance(v, torch.Tensor) and v.dtype in self._shadowable:
                ent = self.store.get(v)
                v = ent[0] if ent is not None else v.to(self.shadow_dtype)
            out[k] = v
        return out

    def _after_unshadowed(self, info: OpInfo, args: Any, kwargs: Any) -> None:
        """A mutation we did not shadow: the mutated tensors are exact from now on."""
        for w in info.written:
            t = args[w] if isinstance(w, int) and w < len(args) else kwargs.get(w)
            for x in _flat(t):
                if isinstance(x, torch.Tensor):
                    self.store.invalidate(x)
                    self.decisions.invalidate(x)

    def _check_where(self, info: OpInfo, args: Any, phase: str, ctx: tuple) -> None:
        cond = args[0]
        if not isinstance(cond, torch.Tensor):
            return
        ent = self.decisions.get(cond)
        if ent is None:
            return
        sc = ent[0]
        flips = int((sc != cond).sum())
        if flips:
            self._agg(
                "decision_flip",
                info,
                phase,
                ctx,
                str(cond.dtype).replace("torch.", ""),
                count=flips,
                elements=cond.numel(),
                bits=None,
                rel=None,
                shape=tuple(cond.shape),
            )

    def _round_local(self, a: Any, s: Any, out_dtype: torch.dtype) -> Any:
        """Shadow input rounded to the format the op's exact input would have.

        That is the input's own real format, or the output's where the output is finer (a
        widening or mixed-precision op must not be blamed for its inputs' coarser rounding).
        """
        if isinstance(a, torch.Tensor) and isinstance(s, torch.Tensor) and a.dtype in _LOW:
            dt = a.dtype
            if _PRECISION.get(out_dtype, 0) > _PRECISION[dt] and out_dtype in _LOW:
                dt = out_dtype
            fi = self._fmts[dt]
            if fi.fmt is not None:
                from mixprec.quantization.elementwise import quantize

                return quantize(s, fi.fmt).to(dt)
            return s.to(dt)
        if isinstance(a, (list, tuple)) and isinstance(s, list):
            return [self._round_local(b, t, out_dtype) for b, t in zip(a, s, strict=True)]
        return s

    def _inputs_nonfinite(self, args: Any, sargs: Any, info: OpInfo) -> tuple[bool, bool]:
        has_nan = has_inf = False
        written = {w for w in info.written if isinstance(w, int)}
        for i, a in enumerate(args):
            src = sargs[i] if i in written else a
            for t in _flat(src):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    if not has_nan and bool(torch.isnan(t).any()):
                        has_nan = True
                    if not has_inf and bool(torch.isinf(t).any()):
                        has_inf = True
        return has_nan, has_inf

    def _measure(
        self, info, func, args, kwargs, sargs, skwargs, reals, shadows, has_shadow, e_in, phase, ctx
    ) -> None:
        """Compare real and shadow outputs; store shadows; record findings (slow path)."""
        shadowable = self._shadowable
        slow: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for i, (r, s) in enumerate(zip(reals, shadows, strict=False)):
            if not isinstance(r, torch.Tensor) or not isinstance(s, torch.Tensor):
                continue
            if r.dtype in shadowable:
                if r.numel() == 0:
                    continue
                fi = self._fmts[r.dtype]
                if s.dtype != self.shadow_dtype:
                    s = s.to(self.shadow_dtype)
                suspicious, e_out, smax = self._suspicious(r, s, fi)
                self.store.put(r, s, e_out, smax)
                # the local re-run only where this op made the error worse: more than _AMP times
                # the error it inherited (non-finite inherited errors: nothing new to report)
                if suspicious and e_out > _AMP * e_in and math.isfinite(e_in):
                    slow.append((i, r, s))
            elif has_shadow and not r.is_floating_point() and not r.is_complex():
                self._decision(info, args, kwargs, sargs, i, r, s, phase, ctx)
        if not slow:
            return
        self.stats.ops_slow_path += 1
        if ctx[2] is None and phase == "forward":
            ctx = (ctx[0], ctx[1], user_frame())
        # local outputs: the op on shadow inputs rounded to the real formats
        if has_shadow:
            od = slow[0][1].dtype
            largs = [self._round_local(a, s, od) for a, s in zip(args, sargs, strict=False)]
            lkwargs = {
                k: (self._round_local(v, skwargs[k], od) if isinstance(v, torch.Tensor) else v)
                for k, v in kwargs.items()
            }
            try:
                lout = (info.functional or func)(*largs, **lkwargs)
            except Exception:
                lout = None
            locals_ = _flat(lout) if lout is not None else None
        else:
            locals_ = None
        nonfinite_in: tuple[bool, bool] | None = None
        abs_outs: list[Any] | None = None
        for i, r, s in slow:
            loc = locals_[i] if locals_ is not None and i < len(locals_) else r
            if not isinstance(loc, torch.Tensor) or loc.shape != r.shape:
                loc = r
            fi = self._fmts[r.dtype]
            dtype = fi.name
            fin_r = torch.isfinite(r)
            if not bool(fin_r.all()):
                if nonfinite_in is None:
                    nonfinite_in = self._inputs_nonfinite(args, sargs, info)
                in_nan, in_inf = nonfinite_in
                nan_r = torch.isnan(r)
                n_nan = int(nan_r.sum())
                if n_nan and not in_nan and not in_inf:
                    self._agg(
                        "nan",
                        info,
                        phase,
                        ctx,
                        dtype,
                        count=n_nan,
                        elements=r.numel(),
                        bits=float(fi.mantissa_bits + 1),
                        rel=math.inf,
                        example=self._example(r, s, nan_r),
                        shape=tuple(r.shape),
                    )
                inf_r = torch.isinf(r)
                if not in_inf and not in_nan and bool(inf_r.any()):
                    fin_s = torch.isfinite(s)
                    over = inf_r & fin_s
                    n_over = int(over.sum())
                    if n_over:
                        self._agg(
                            "overflow",
                            info,
                            phase,
                            ctx,
                            dtype,
                            count=n_over,
                            elements=r.numel(),
                            bits=float(fi.mantissa_bits + 1),
                            rel=math.inf,
                            example=self._example(r, s, over),
                            shape=tuple(r.shape),
                        )
                    n_inf = int((inf_r & ~fin_s).sum())
                    if n_inf:
                        self._agg(
                            "inf",
                            info,
                            phase,
                            ctx,
                            dtype,
                            count=n_inf,
                            elements=r.numel(),
                            bits=float(fi.mantissa_bits + 1),
                            rel=math.inf,
                            example=self._example(r, s, inf_r & ~fin_s),
                            shape=tuple(r.shape),
                        )
            # precision of the finite part, measured on the local result
            a = s.abs()
            valid = fin_r & torch.isfinite(s) & torch.isfinite(loc)
            amax = torch.where(valid, a, 0.0).amax()
            den = torch.maximum(a, (amax * fi.floor).clamp_(min=_TINY))
            lerr = torch.sub(loc, s).abs_().div_(den)
            flag = valid & (lerr > fi.tol)
            n_flag = int(flag.sum())
            if n_flag and info.multilinear:
                # a sum of products is judged against the sum of |products| (what a backward-
                # stable evaluation can err by), not against a result that cancelled to ~0
                if abs_outs is None:
                    abs_outs = self._abs_run(info, func, sargs, skwargs)
                terms = abs_outs[i] if abs_outs is not None and i < len(abs_outs) else None
                if isinstance(terms, torch.Tensor) and terms.shape == s.shape:
                    den = torch.maximum(den, terms.abs())
                    lerr = torch.sub(loc, s).abs_().div_(den)
                    flag = valid & (lerr > fi.tol)
                    n_flag = int(flag.sum())
            if not n_flag:
                continue
            terr = torch.sub(r, s).abs_().div_(den)
            small_l = loc.abs() < fi.min_normal
            under = flag & (a < fi.min_normal) & (a > 0) & small_l
            n_under = int(under.sum())
            if n_under:
                self._emit_precision(
                    "underflow", info, phase, ctx, dtype, fi, under, n_under, lerr, terr, r, s
                )
            rest = flag & ~under if n_under else flag
            n_rest = n_flag - n_under
            if n_rest:
                cancelled = None
                kind = "precision_loss"
                if info.addsub:
                    kind = "cancellation"
                    cancelled = self._cancelled_bits(info, args, sargs, kwargs, s, rest)
                self._emit_precision(
                    kind,
                    info,
                    phase,
                    ctx,
                    dtype,
                    fi,
                    rest,
                    n_rest,
                    lerr,
                    terr,
                    r,
                    s,
                    cancelled=cancelled,
                )

    @staticmethod
    def _suspicious(r: torch.Tensor, s: torch.Tensor, fi: FmtInfo) -> tuple[bool, float, float]:
        """Could any element of ``r`` be a finding? Cheap sufficient test first.

        Returns (suspicious, e, smax) with ``e = max|r - s| / (floor * max|s|)``, the error bound
        kept with the shadow (inf when non-finite values are involved), and an upper bound of
        ``max|s|`` (kept for the gradient histogram).

        Cheap (4 float32 passes, one sync): if ``max|r - s| <= tol * floor * max|s|`` then every
        element satisfies ``|r_i - s_i| <= tol * max(|s_i|, floor * max|s|)``, the flagging
        criterion, so nothing can be flagged. Computing the difference in float32 against the
        shadow rounded to float32 adds at most half a float32 ulp, far below any threshold.
        Otherwise the exact elementwise test in float64 decides. NaN/inf make both tests fail.
        """
        rf = r if r.dtype == torch.float32 else r.float()
        s32 = s.float()
        smin, smax = torch.aminmax(s32)
        dmin, dmax = torch.aminmax(s32.sub_(rf))  # s - r in place: one temporary, not two
        dn, dx, sn, sx = torch.stack((dmin, dmax, smin, smax)).tolist()
        dm, sm = max(-dn, dx), max(-sn, sx)
        smax = sm * (1.0 + 2.0**-23)  # s32 is s rounded to nearest: bound max|s| from above
        if sm > 0:
            e = dm / (fi.floor * sm)
            if e <= fi.tol:
                return False, e, smax
        else:
            e = 0.0 if dm == 0 else math.inf
        if not math.isfinite(e) or not math.isfinite(sm):
            e = math.inf
        if dm == 0 and sm == 0 and not bool(s.any()):
            return False, 0.0, 0.0  # exactly zero
        a = s.abs()
        floor = (a.amax() * fi.floor).clamp_(min=_TINY)
        rmax = float(torch.sub(r, s).abs_().div_(a.clamp_(min=floor)).amax())
        return not rmax <= fi.tol, e, smax  # NaN (non-finite somewhere) is suspicious

    @staticmethod
    def _abs_run(info: OpInfo, func: Any, sargs: Any, skwargs: Any) -> list[Any] | None:
        """The op on |shadow inputs| (|alpha|, |beta|): for a multilinear op, the sum of the
        absolute values of its terms, element by element."""

        def ab(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.abs()
            if isinstance(v, list):
                return [ab(x) for x in v]
            return v

        kw = {k: (abs(v) if k in ("alpha", "beta") else ab(v)) for k, v in skwargs.items()}
        try:
            return _flat((info.functional or func)(*[ab(a) for a in sargs], **kw))
        except Exception:
            return None

    @staticmethod
    def _example(r: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        idx = int(mask.reshape(-1).nonzero()[0, 0])
        return float(r.reshape(-1)[idx]), float(s.reshape(-1)[idx])

    def _emit_precision(
        self, kind, info, phase, ctx, dtype, fi, mask, n, lerr, terr, r, s, cancelled=None
    ) -> None:
        le = torch.where(mask, lerr, -1.0)
        idx = int(le.reshape(-1).argmax())
        rel = float(le.reshape(-1)[idx])
        prop = float(torch.where(mask, terr, -1.0).amax())
        self._agg(
            kind,
            info,
            phase,
            ctx,
            dtype,
            count=n,
            elements=r.numel(),
            bits=bits_lost(rel, fi),
            rel=rel,
            propagated=bits_lost(prop, fi),
            cancelled=cancelled,
            example=(float(r.reshape(-1)[idx]), float(s.reshape(-1)[idx])),
            shape=tuple(r.shape),
        )

    def _cancelled_bits(self, info, args, sargs, kwargs, s, mask) -> float | None:
        """log2(max |operand| / |result|) at the flagged elements, on shadow values."""
        try:
            x, y = sargs[0], sargs[1] if len(sargs) > 1 else None
            alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
            ops = []
            for v, scale in ((x, 1.0), (y, float(alpha))):
                if isinstance(v, torch.Tensor):
                    ops.append((v * scale).abs() if scale != 1.0 else v.abs())
                elif isinstance(v, (int, float)):
                    ops.append(torch.tensor(abs(float(v) * scale), dtype=s.dtype, device=s.device))
            big = torch.maximum(*ops) if len(ops) == 2 else ops[0]
            big = big.expand_as(s)
            ratio = big / s.abs()
            v = float(torch.where(mask, ratio, 0.0).amax())
            if v <= 1.0:
                return 0.0
            return math.log2(v) if math.isfinite(v) else float("inf")
        except Exception:
            return None

    def _decision(self, info, args, kwargs, sargs, i, r, s, phase, ctx) -> None:
        """Integer / boolean results of float inputs: do they match the shadow's?"""
        if r.shape != s.shape:
            flips = max(r.numel(), s.numel())
        elif info.index_decision is not None and r.dtype == torch.int64:
            pos, dpos, ddef = info.index_decision
            x = sargs[pos]
            if not isinstance(x, torch.Tensor):
                return
            dim = kwargs.get("dim", args[dpos] if len(args) > dpos else ddef)
            if dim is None or isinstance(dim, bool):
                diff = r != s
                if not bool(diff.any()):
                    return
                xf = x.reshape(-1)
                vr, vs = xf[r.reshape(-1)], xf[s.reshape(-1)]
                flips = int((vr != vs).sum())
            else:
                if not bool((r != s).any()):
                    return
                keep = r.dim() == x.dim()
                ri, si = (r, s) if keep else (r.unsqueeze(dim), s.unsqueeze(dim))
                flips = int((x.gather(dim, ri) != x.gather(dim, si)).sum())
        else:
            flips = int((r != s).sum())
            if flips and r.dtype == torch.bool:
                self.decisions.put(r, s)
        if flips:
            if ctx[2] is None:
                ctx = (ctx[0], ctx[1], user_frame())
            self._agg(
                "decision_flip",
                info,
                phase,
                ctx,
                str(r.dtype).replace("torch.", ""),
                count=flips,
                elements=r.numel(),
                bits=None,
                rel=None,
                shape=tuple(r.shape),
            )

    # -- cooperation with non-aten rounding (mixprec.quantize) -----------------------------------
    def note_rounding(self, src: torch.Tensor, dst: torch.Tensor, fmt: FloatFormat, op: str):
        ent = self.store.get(src)
        s = src.detach().to(self.shadow_dtype) if ent is None else ent[0]
        if dst.dtype in self._shadowable:
            self.store.put(dst, s)
        info = self.ops.get(op)
        if info is None:
            info = self.ops[op] = OpInfo(name=op, packet=op, kind=_COMPUTE)
        self._internal = True
        try:
            self._note_rounding(s, dst, fmt, info)
        finally:
            self._internal = False

    def _note_rounding(self, s, dst, fmt, info) -> None:
        fi = make_fmt_info(fmt, self.threshold_bits)
        backward = torch._C._current_graph_task_id() != -1
        module, module_type, _ = self.tracker.current()
        ctx = (module, module_type, user_frame())
        with torch.no_grad():
            r = dst.detach().to(self.shadow_dtype)
            a = s.abs()
            inf_r = torch.isinf(r) & torch.isfinite(s)
            n = int(inf_r.sum())
            phase = "backward" if backward else "forward"
            if n:
                self._agg(
                    "overflow",
                    info,
                    phase,
                    ctx,
                    fi.name,
                    count=n,
                    elements=r.numel(),
                    bits=float(fi.mantissa_bits + 1),
                    rel=math.inf,
                    example=self._example(r, s, inf_r),
                    shape=tuple(r.shape),
                )
            err = (r - s).abs() / torch.maximum(a, (a.amax() * fi.floor).clamp_(min=_TINY))
            under = (err > fi.tol) & (a < fi.min_normal) & (a > 0) & (r.abs() < fi.min_normal)
            n = int(under.sum())
            if n:
                self._emit_precision(
                    "underflow", info, phase, ctx, fi.name, fi, under, n, err, err, r, s
                )
