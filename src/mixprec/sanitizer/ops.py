"""What the sanitizer knows about an aten op: its classification, and one real call (private).

Classification is by overload packet name and schema (mutated arguments, tags), cached per
``OpOverload`` by the mode: it decides whether an op is shadowed, measured, or only tracked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mixprec.sanitizer.kernels import SHADOW_KERNELS

aten = torch.ops.aten

VIEWISH = "view"  # output aliases input: shadow = same op on the shadow
EXACT = "exact"  # data movement / selection: no rounding, nothing to measure
COMPUTE = "compute"  # rounds: measure
RANDOM = "random"  # RNG: never re-run (it would change the user's random stream)
DROPOUT = "dropout"
OPAQUE = "opaque"  # mutates something we cannot shadow: invalidate, move on
SKIP = "skip"  # no float data involved (metadata, integer ops, factories)

_EXACT_PACKETS = {
    "clone", "contiguous", "cat", "stack", "index_select", "gather", "scatter", "index",
    "index_put", "embedding", "masked_fill", "where", "constant_pad_nd", "flip", "roll", "repeat",
    "select_backward", "slice_backward", "narrow_copy", "fill", "zero",
    "neg", "abs", "relu", "threshold_backward", "amax", "amin", "maximum", "minimum", "clamp",
    "clamp_min", "clamp_max", "hardtanh", "lift_fresh_copy", "alias_copy", "expand_copy",
    "permute_copy", "transpose_copy", "view_copy", "t_copy", "unsqueeze_copy", "squeeze_copy",
    "slice_copy", "select_copy", "detach_copy", "split_with_sizes_copy",
    "unbind_copy", "sign", "sgn", "max_pool2d_with_indices", "masked_scatter", "diag_embed",
    "tril", "triu", "unfold_copy",
}  # fmt: skip
# outputs independent of the inputs' values (empty_*: undefined values; factories from Python
# numbers, whose outputs are taken as exact like any constant) or not tensors: skip
_FACTORY_PACKETS = {
    "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_empty",
    "new_full", "new_empty_strided", "empty_strided", "scalar_tensor", "empty_permuted",
    "_local_scalar_dense", "equal", "is_nonzero", "_assert_async", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "empty", "zeros", "ones", "full", "arange", "linspace",
    "logspace", "eye", "tril_indices", "triu_indices",
}  # fmt: skip
# not marked as views, but their outputs alias their input's storage like a view's
_ALIASING = {"_unsafe_view"}
# exact copies: the output's shadow is the input's shadow, shared (the store copies on write)
_COPIES = {"clone", "alias_copy", "detach_copy", "lift_fresh_copy"}
# views whose backward is again a view or an exact copy (never a rounding op): they need no
# source line, no autograd label and no measurement, only the shadow of a partial storage
_PLAIN_VIEWS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "select", "slice",
    "squeeze", "unsqueeze", "split", "split_with_sizes", "unbind", "chunk", "narrow", "alias",
    "detach", "view_as", "movedim", "swapaxes", "swapdims", "unflatten", "flatten", "diagonal",
}  # fmt: skip
# fused ops tagged random only for their dropout: with dropout_p = 0 (inference, and every
# model trained without attention dropout) they are deterministic and are shadowed like any
# compute op; packet -> position of dropout_p. (Only the CPU kernel: the CUDA ones also return
# RNG state tensors, and have no float64 kernel.)
_DROPOUT_ARG = {"_scaled_dot_product_flash_attention_for_cpu": 3}
_ADDSUB = {"add", "sub", "rsub"}
# sums of products of the tensor inputs (linear in each): f(|inputs|) = sum of |terms|
_MULTILINEAR = {
    "sum", "mean", "nansum", "cumsum", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv",
    "mv", "dot", "vdot", "convolution", "convolution_backward", "_convolution",
    "embedding_dense_backward", "trace", "_trilinear", "addr", "outer",
}  # fmt: skip
# ops with some results that are sums (means) of their inputs: those results are judged like a
# multilinear op's (a norm's saved mean: a mean that cancels to ~0 is no finding; a norm's
# gradients, which subtract means: sums of |terms| written out in .terms)
_SUM_RESULTS = {
    "native_layer_norm": (1,), "native_group_norm": (1,), "native_batch_norm": (1,),
    "_native_batch_norm_legit": (1,), "_native_batch_norm_legit_functional": (1,),
    "native_layer_norm_backward": (0, 1, 2), "native_group_norm_backward": (0, 1, 2),
    "native_batch_norm_backward": (0, 1, 2), "_softmax_backward_data": (0,),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (0, 1, 2),
}  # fmt: skip
# results that are the op's own state for its backward, which the program never reads: their
# shadows are carried to the backward op, they are not judged. CTC's log_alpha holds log 0 =
# -inf for every alignment state no path reaches (on every step: not news), and its rows
# beyond a shorter target's states are never written (torch.empty: whatever memory held)
_INTERNAL_RESULTS = {"_ctc_loss": (1,)}
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
    """What the mode needs to know about one aten overload (computed once, by :func:`classify`)."""

    name: str
    packet: str
    kind: str
    written: tuple[int | str, ...] = ()  # positions / kwarg names of mutated tensor args
    functional: Any = None  # out-of-place variant for in-place ops
    addsub: bool = False
    multilinear: bool = False  # a sum of products of its tensor inputs (see .terms.abs_terms)
    sum_results: tuple[int, ...] = ()  # results that are sums of the inputs, if not multilinear
    internal_results: tuple[int, ...] = ()  # state kept for its backward (_INTERNAL_RESULTS)
    index_decision: tuple[int, int, int | None] | None = None
    half_to_float: int | None = None  # position of _softmax's half_to_float flag
    plain_view: bool = False  # a view whose backward cannot round (see _PLAIN_VIEWS)
    dropout_at: int | None = None  # a compute op that is random when this argument is non-zero
    copy: bool = False  # an exact copy of its first argument (see _COPIES)
    op: Any = None  # what runs the op: its C++ entry point (see _entry)
    shadow_op: Any = None  # what runs it on shadows: the functional variant's entry, or op


def _entry(func: Any) -> Any:
    """The C++ callable behind a plain ``OpOverload`` (its ``__call__`` is a Python frame
    that only forwards to it: ~0.3 us per call, twice per shadowed op); other callables as
    they are (a ``TorchBindOpOverload`` must dispatch in Python)."""
    return func._op if type(func) is torch._ops.OpOverload else func


def _written(schema: Any) -> tuple[int | str, ...]:
    """Positions (kwarg-only: names) of the arguments the op writes to."""
    written: list[int | str] = []
    for i, arg in enumerate(schema.arguments):
        ai = arg.alias_info
        if ai is not None and ai.is_write:
            written.append(arg.name if arg.kwarg_only else i)
    return tuple(written)


def _functional_variant(func: Any, packet: str, base: str, tags: set[Any]) -> Any:
    """The out-of-place overload of an in-place op (same overload name and arity), or None."""
    if not ((packet.endswith("_") and torch.Tag.inplace in tags) or packet == "copy_"):
        return None
    packet_fn = getattr(aten, base, None)
    fn = None if packet_fn is None else getattr(packet_fn, func._overloadname, None)
    if fn is not None and len(fn._schema.arguments) != len(func._schema.arguments):
        return None
    return fn


def _kind(func: Any, info: OpInfo, base: str, tags: set[Any]) -> str:
    """The routing kind; sets ``info.functional`` for in-place ops that can be shadowed."""
    if info.packet in _FACTORY_PACKETS:
        return SKIP
    if info.packet in _META_MUTATIONS or torch.Tag.inplace_view in tags:
        return OPAQUE
    if func is aten.native_dropout.default:
        return DROPOUT
    if torch.Tag.nondeterministic_seeded in tags and not info.written:
        info.dropout_at = _DROPOUT_ARG.get(info.packet)
        return RANDOM if info.dropout_at is None else COMPUTE
    if torch.Tag.nondeterministic_seeded in tags:
        return OPAQUE
    if info.written:
        # in-place op: shadow it through its functional variant (same overload name)
        info.functional = _functional_variant(func, info.packet, base, tags)
        if info.functional is None:
            return OPAQUE
    elif getattr(func, "is_view", False) or info.packet in _ALIASING:
        return VIEWISH
    return EXACT if base in _EXACT_PACKETS else COMPUTE


def classify(func: Any) -> OpInfo:
    """The routing kind and properties of an ``OpOverload`` (by packet name, schema, tags)."""
    name = str(func)  # "aten.sub.Tensor"
    packet = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else name
    tags = set(func.tags)
    info = OpInfo(name=name, packet=packet, kind=COMPUTE, written=_written(func._schema))
    base = packet.rstrip("_") if packet.endswith("_") and not packet.startswith("_") else packet
    info.addsub = base in _ADDSUB
    info.multilinear = base in _MULTILINEAR
    info.sum_results = _SUM_RESULTS.get(base, ())
    info.internal_results = _INTERNAL_RESULTS.get(base, ())
    info.kind = _kind(func, info, base, tags)
    info.op = _entry(func)
    # float64 kernels of our own where torch's are slow or missing (see .kernels)
    info.shadow_op = SHADOW_KERNELS.get(func) or _entry(info.functional or func)
    info.plain_view = info.kind == VIEWISH and packet in _PLAIN_VIEWS
    info.copy = info.kind == EXACT and packet in _COPIES and not info.written
    if info.kind not in (EXACT, COMPUTE):
        return info
    if base in _INDEX_DECISIONS and not (base in ("max", "min", "median") and "dim" not in name):
        info.index_decision = _INDEX_DECISIONS[base]
    if packet in ("_softmax", "_log_softmax"):
        info.half_to_float = 2
    return info


class RealOpError(Exception):
    """Carries an exception raised by the user's own op through our error handling."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc


class RealCall:
    """One call of an aten op by the user's program; runs it at most once."""

    __slots__ = ("args", "func", "kwargs", "op", "out", "ran")

    def __init__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs
        self.op = func  # the callable that runs it (the mode sets OpInfo.op: the same op)
        self.out: Any = None
        self.ran = False

    def run(self) -> Any:
        """The real op, unchanged; its own exception leaves wrapped in :class:`RealOpError`."""
        try:
            out = self.op(*self.args, **self.kwargs)
        except Exception as exc:
            raise RealOpError(exc) from exc
        self.out, self.ran = out, True
        return out

    def arg(self, w: int | str) -> Any:
        """A positional (int) or keyword (str) argument; None when not passed."""
        if isinstance(w, int):
            return self.args[w] if w < len(self.args) else None
        return self.kwargs.get(w)
