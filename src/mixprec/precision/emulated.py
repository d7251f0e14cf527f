"""Emulated execution of a precision policy (the engine behind ``mixprec.autocast(emulate=True)``).

Level: ``torch.nn.functional`` / ``torch`` function level, through a ``TorchFunctionMode``
(see :mod:`mixprec.precision.region`). Every rounding is autograd-visible: an input rounding is
a straight-through function (:func:`mixprec.quantization.straight_through`) whose backward
rounds the incoming gradient, and a freshly computed result is rounded in place with a
gradient-rounding tensor hook (:func:`round_result`). So the backward pass follows the policy
*wherever* ``backward()`` is called (inside or outside the region) - the autograd graph carries
the roundings, as it carries torch.autocast's casts.

Emulation of one low-precision op ``y = f(a, b, bias)`` (matmul, linear, conv, attention):

    forward:  a_r = round(a, compute)   b_r = round(b, compute)   (operands; MX: blocked along
              the reduction axis; fp8 recipes: per-tensor scaled)
              y   = round(f(a_r, b_r, bias_r), result)            (fp32 accumulation inside f)
    backward: g_r = round(dL/dy, grads)                           (gradient operand)
              dL/da = round(f_a'(g_r, b_r), result), dL/db = round(f_b'(g_r, a_r), result)

``result`` is the compute format when it is a 16-bit storage format (bf16, fp16, ``e6m9``, ...)
and "no rounding" for operand-only formats (tf32, fp8, fp6, fp4, MX), whose GEMMs write fp32.

Format tracking: a tensor produced inside the region carries a tag (its logical format and the
``_version`` it was tagged at). ``follow`` ops whose inputs all carry the same tag round their
result to it (skipped for exact ops: views, copies, relu, max, ...); mixed inputs promote to
fp32 like torch's type promotion. Operands already tagged with the compute format are not
rounded again. All tensors stay float32 containers: every op runs at fp32 speed.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.compiler import is_compiling

from mixprec.formats.float_format import FloatFormat
from mixprec.precision._tracing import trace_cache
from mixprec.precision.accumulate import Accumulate, accumulated
from mixprec.precision.fp8 import Fp8Recipe
from mixprec.precision.ops import op_category
from mixprec.precision.policy import FormatSpec, OpLists, Policy, resolve_format
from mixprec.quantization.autograd_rounding import (
    GradientRounding,
    Rounder,
    forward_mode,
    straight_through,
)
from mixprec.quantization.blocks import mx_round_to
from mixprec.quantization.elementwise import round_data_, round_to
from mixprec.trees import iter_tensors, map_args, map_outputs

TAG = "_mixprec_fmt"

# ----------------------------------------------------------------------------------------------
# op categories of emulation
# ----------------------------------------------------------------------------------------------

#: follow ops whose result is exactly representable in their input's format (no rounding)
EXACT = frozenset({
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "T", "mT", "H",
    "mH", "data", "real", "contiguous", "clone", "detach", "expand", "expand_as", "squeeze",
    "unsqueeze", "flatten", "unflatten", "split", "split_with_sizes", "chunk", "tensor_split",
    "unbind", "narrow", "select", "__getitem__", "index_select", "gather", "take",
    "take_along_dim", "masked_select", "cat", "concat", "concatenate", "stack", "hstack",
    "vstack", "dstack", "flip", "fliplr", "flipud", "roll", "repeat", "repeat_interleave",
    "tile", "movedim", "moveaxis", "swapaxes", "swapdims", "relu", "neg", "abs", "max", "min",
    "amax", "amin", "maximum", "minimum", "fmax", "fmin", "sort", "topk", "msort", "cummax",
    "cummin", "kthvalue", "median", "nanmedian", "mode", "max_pool1d", "max_pool2d",
    "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices", "unfold",
    "diagonal", "diag", "tril", "triu", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "embedding", "sign", "as_strided", "to", "type", "cpu", "cuda",  # device moves (not casts)
})  # fmt: skip

#: casts: the result is logically in the target dtype (fp32 for .float() of a tagged tensor)
_CASTS = frozenset({"float", "to", "type", "double", "type_as"})


def _is_dtype_cast(name: str, args: tuple, kwargs: dict) -> bool:
    """``.float()``/``.double()``/``.type_as()`` or a ``.to``/``.type`` naming a dtype."""
    if name in ("float", "double", "type_as"):
        return True
    vals = (*args[1:], *kwargs.values())
    return any(isinstance(v, (torch.dtype, str)) and not _is_device(v) for v in vals) or any(
        isinstance(v, torch.Tensor) for v in args[1:]
    )


def _is_device(v: object) -> bool:
    if isinstance(v, str):
        try:
            torch.device(v)
        except RuntimeError:
            return False
        return True
    return False


# ----------------------------------------------------------------------------------------------
# tags
# ----------------------------------------------------------------------------------------------


def _version_of(t: torch.Tensor) -> int | None:
    """``t._version``, or None for an inference tensor (torch.inference_mode), which has no
    version counter (reading it raises). torch.compile traces no inference tensors (and
    refuses ``is_inference``)."""
    if is_compiling():
        return None  # a traced graph: versions are symbolic; tags are trusted (see _inplace)
    return None if t.is_inference() else t._version


def get_tag(t: torch.Tensor) -> str | None:
    """The logical format a tensor was tagged with, if its storage is unchanged since."""
    tag = getattr(t, TAG, None)
    if tag is None and _MIRROR.depth:
        tag = _mirrored(t)
    if tag is None:
        return None
    version = _version_of(t)
    if version is not None and tag[1] != version:  # no version: the tag is trusted
        return None
    return tag[0]


def set_tag(t: torch.Tensor, fmt_name: str | None) -> None:
    if _MIRROR.depth and not is_compiling():
        _mirror(t, fmt_name)
    if fmt_name is None:
        if getattr(t, TAG, None) is not None:
            setattr(t, TAG, None)
        return
    setattr(t, TAG, (fmt_name, _version_of(t)))


# Inside activation checkpointing a tag also lives on the tensor's storage. torch's checkpoint
# hands the recomputation tensors it saved through saved-tensor hooks (a nested checkpoint's
# inputs, saved by the outer one): each unpacked tensor is a new Python object over the same
# storage and version counter, without the attribute, so the recomputed ops would take it for
# float32 and round differently from the forward. The storage's Python object is kept as long
# as the storage lives; its table is keyed by the view's geometry (offset, shape, strides) and
# checked against the version like the attribute. Only while a checkpointed segment runs
# (:func:`mirrored_tags`, entered by ``checkpoint_context``): elsewhere no cost.


class _Mirroring(threading.local):
    def __init__(self) -> None:
        self.depth = 0


_MIRROR = _Mirroring()
_STORAGE_TAGS = "_mixprec_fmts"


@contextlib.contextmanager
def mirrored_tags() -> Iterator[None]:
    """Tags set inside also live on their tensors' storages (see above); restored on exit."""
    _MIRROR.depth += 1
    try:
        yield
    finally:
        _MIRROR.depth -= 1


def tags_mirrored() -> bool:
    """Is a checkpointed segment made with ``checkpoint_context`` running (its forward or its
    recomputation)?"""
    return _MIRROR.depth > 0


def _geometry(t: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return t.storage_offset(), tuple(t.shape), t.stride()


def _mirror(t: torch.Tensor, fmt_name: str | None) -> None:
    storage = t.untyped_storage()
    table = getattr(storage, _STORAGE_TAGS, None)
    if fmt_name is None:
        if table:
            table.pop(_geometry(t), None)
        return
    if table is None:
        table = {}
        setattr(storage, _STORAGE_TAGS, table)
    table[_geometry(t)] = (fmt_name, _version_of(t))


def untagged_view(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` that reads as float32 (untagged): what a cast to float32 of a tagged
    float32 tensor returns (torch returns ``t`` itself). Where tags are mirrored, the view has
    ``t``'s storage and geometry, so the storage table would answer with ``t``'s tag: an
    explicit ``(None, version)`` attribute stops that lookup."""
    v = t.view_as(t)
    if _MIRROR.depth and not is_compiling():
        setattr(v, TAG, (None, _version_of(v)))
    return v


def _mirrored(t: torch.Tensor) -> tuple[str | None, int | None] | None:
    """The tag kept on ``t``'s storage for its geometry (None: none), unchecked."""
    if is_compiling() or not t.is_floating_point():
        return None
    table = getattr(t.untyped_storage(), _STORAGE_TAGS, None)
    return None if not table else table.get(_geometry(t))


# ----------------------------------------------------------------------------------------------
# roundings (autograd-visible through the one straight-through Function of quantization)
# ----------------------------------------------------------------------------------------------


def ste(t: torch.Tensor, fwd: Rounder | None, bwd: Rounder | None) -> torch.Tensor:
    """``fwd(t)`` whose gradient is rounded by ``bwd``; autograd only when needed.

    With ``fwd=None`` nothing is created: ``t`` itself is returned (its producer rounds its
    gradient, see :func:`round_result`).
    """
    if fwd is None:
        return t
    if (t.requires_grad and torch.is_grad_enabled()) or forward_mode():
        return straight_through(t, fwd, bwd)  # (forward mode: the Function carries tangents)
    return fwd(t)


def ste_in_handler(
    t: torch.Tensor, fwd: Rounder | None, bwd: Rounder | None, *, visible: bool = False
) -> torch.Tensor:
    """:func:`ste` for the executor's own calls (the mode is off while it handles an op).

    A rounding of a tensor that needs a gradient becomes an autograd-visible tensor holding the
    rounded values, its gradient rounded on the way back: the same values forward and backward
    as the straight-through Function, without its Python ``apply`` and ``backward`` (~10 us and
    ~15 us per use).

    For an operand only the op being handled sees, that tensor is ``t.view_as(t)`` whose data
    is the rounding's fresh result: one rounding pass, no copy, and an identity view for
    autograd, its gradient rounded by a pre-hook of the view's node (~1.5 us to register). The
    view shares ``t``'s version counter, so changing ``t`` in place after the op saved it fails
    in backward exactly where fp32 fails. The rounded tensor has ``t``'s layout where ``t`` is a
    permutation of a contiguous one (a transpose: GEMMs sum in a layout-dependent order), and
    is contiguous where ``t`` is not dense (what a clone of ``t`` would be).

    A tensor the caller returns to user code (``visible``) is always a clone: user code may
    change it in place, which must not reach ``t`` through a view. Its gradient rounding is a
    tensor hook (~3 us), which runs before the user's own hooks and ``retain_grad``, so those
    see the rounded gradient.
    """
    if fwd is None or not (t.requires_grad and torch.is_grad_enabled()) or _functional():
        return ste(t, fwd, bwd)  # compiled: the Function traces; hooks on intermediates do not
    if not t.is_floating_point():
        return t
    if isinstance(fwd, ElementRounder) and visible:
        out = t.clone()
        round_data_(out, fwd.fmt, saturate=fwd.saturate)
    else:
        q = fwd(t.detach())  # a fresh tensor
        if q.dtype != t.dtype or q.shape != t.shape:
            return ste(t, fwd, bwd)  # (defensive) not a rounding of t's values: the Function
        out = t.clone() if visible else t.view_as(t)
        out.data = q
    if bwd is not None:
        if visible:
            out.register_hook(GradientRounding(bwd))
        else:
            out.grad_fn.register_prehook(GradientRounding(bwd, node=True))
    return out


def _functional() -> bool:
    """Must roundings be functional (out of place, through the autograd Function, no
    ``.data`` writes or hooks)? While torch.compile traces, and where forward mode may be on
    (:func:`~mixprec.quantization.autograd_rounding.forward_mode`: functorch forbids
    ``.data`` writes in its transforms, even to plain tensors; a ``.data`` write or a plain
    rounding would drop a dual tensor's tangent)."""
    return is_compiling() or forward_mode()


def round_result(
    y: torch.Tensor,
    fmt: FloatFormat | None,
    bwd: Rounder | None,
    inputs: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Round a freshly computed op result to ``fmt`` in place and its gradient with ``bwd``.

    In place through ``y.data`` (autograd does not version-count it): no allocation, and an
    output the op saved for its backward (attention, tanh, ...) then holds the rounded values,
    as a low-precision kernel's saved output would. The gradient rounding is a tensor hook (no
    extra graph node, no view). Results that alias an input are rounded out of place instead
    (:func:`_fresh`).
    """
    if not y.is_floating_point():
        return y
    if _functional():
        return _round_result_traced(y, fmt, bwd)
    if not _fresh(y, inputs):
        r = element_rounder(fmt) if fmt is not None else None
        out = ste_in_handler(y, r, bwd, visible=True) if r is not None else y.view_as(y)
        if bwd is not None and r is None and out.requires_grad:
            out.register_hook(GradientRounding(bwd))
        return out
    if fmt is not None:
        round_data_(y, fmt)
    if bwd is not None and y.requires_grad:
        y.register_hook(GradientRounding(bwd))
    return y


def _fresh(y: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    """Is ``y``'s memory the op's own? Not when ``y`` is an input or a view into an input's
    storage; yes for a view of a temporary the op made (``F.linear``'s result for a 3-d input
    views its 2-d ``addmm`` result), which nothing else can reach."""
    if y._base is None:
        return not any(y is t for t in inputs)
    ptr = y.untyped_storage().data_ptr()
    return ptr != 0 and all(t.untyped_storage().data_ptr() != ptr for t in inputs)


def _round_result_traced(
    y: torch.Tensor, fmt: FloatFormat | None, bwd: Rounder | None
) -> torch.Tensor:
    """:func:`round_result` while torch.compile traces: out of place, the gradient rounded by
    the straight-through Function (dynamo refuses in-place writes through ``.data`` and hooks
    on intermediate tensors; inductor fuses the copy the identity forward makes)."""
    if fmt is not None:
        return ste(y, element_rounder(fmt), bwd)
    if bwd is not None and y.requires_grad and torch.is_grad_enabled():
        return straight_through(y, torch.clone, bwd)
    return y


def round_output(t: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """A module output in a policy's output format (:func:`mixprec.apply_policy`, emulated).

    Rounded forward and backward (the gradient entering the module is in that format too),
    unless it is tagged with the format already. For a float32 output the values are already
    held exactly: a tagged tensor becomes an untagged view, whose gradient its producer rounds.
    """
    if not t.is_floating_point():
        return t
    tag = get_tag(t)
    if spec.is_float32:
        return t if tag is None else t.view_as(t)
    if tag == spec.name:
        return t
    rounder = spec_rounder(spec)
    r = ste(t, rounder, rounder)
    if not spec.is_mx:
        set_tag(r, spec.name)
    return r


# Roundings below use the unchecked round_to: formats are resolved once per policy, and every
# op pays for the rounding call (round_to documents the preconditions).


class ElementRounder:
    """Rounder into element format ``fmt`` (non-float tensors pass); a callable whose format
    :func:`ste_in_handler` reads to round a clone in place."""

    __slots__ = ("fmt", "saturate")

    def __init__(self, fmt: FloatFormat, saturate: bool) -> None:
        self.fmt = fmt
        self.saturate = saturate

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return round_to(t, self.fmt, saturate=self.saturate)


@trace_cache(maxsize=256)
def element_rounder(f: FloatFormat, saturate: bool = False) -> ElementRounder:
    """Rounder into element format ``f``. Cached: one object per format, shared by every op
    and region (it holds no state)."""
    return ElementRounder(f, saturate)


def mx_rounder(spec: FormatSpec, axis: int) -> Rounder:
    """Rounder into MX format ``spec`` with blocks along ``axis``
    (:func:`mixprec.quantization.mx_round_to`: mx_quantize's values, unchecked)."""
    element, block, rule = spec.element, spec.block_size or 32, spec.scale_rounding

    def r(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            return round_to(t, element, saturate=True)
        return mx_round_to(t, element, block, axis, rule)

    return r


def spec_rounder(spec: FormatSpec, axis: int = -1) -> Rounder | None:
    """Rounder for a policy format (None for float32: identity on fp32 containers)."""
    if spec.is_float32:
        return None
    if spec.is_mx:
        return mx_rounder(spec, axis)
    return element_rounder(spec.element)


# ----------------------------------------------------------------------------------------------
# the emulating executor
# ----------------------------------------------------------------------------------------------

_CONV = frozenset({"conv1d", "conv2d", "conv3d", "conv_tbc"})
_CONV_T = frozenset({"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
_MM_LIKE = frozenset({"matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm"})
#: positional arguments of low ops that are added, not multiplied (bias, masks)
_ADDITIVE_POS: dict[str, frozenset[int]] = {
    "addmm": frozenset({0}), "baddbmm": frozenset({0}), "addbmm": frozenset({0}),
    "addmv": frozenset({0}), "addr": frozenset({0}), "linear": frozenset({2}),
    "bilinear": frozenset({3}), "conv1d": frozenset({2}), "conv2d": frozenset({2}),
    "conv3d": frozenset({2}), "conv_tbc": frozenset({2}), "conv_transpose1d": frozenset({2}),
    "conv_transpose2d": frozenset({2}), "conv_transpose3d": frozenset({2}),
    "scaled_dot_product_attention": frozenset({3}),
    "multi_head_attention_forward": frozenset({6, 7, 8, 12, 14, 16}),
}  # fmt: skip
_ADDITIVE_KW = frozenset({
    "bias", "input", "attn_mask", "key_padding_mask", "in_proj_bias", "bias_k", "bias_v",
    "out_proj_bias",
})  # fmt: skip
_MASKS_POS: dict[str, frozenset[int]] = {
    "scaled_dot_product_attention": frozenset({3}),
    "multi_head_attention_forward": frozenset({14, 16}),
}
_MASK_KW = frozenset({"attn_mask", "key_padding_mask"})


def reduction_axis(name: str, k: int, t: torch.Tensor) -> int:
    """Axis of operand ``k`` of op ``name`` that the op reduces over (MX blocks run along it)."""
    if name in _CONV:
        return 1
    if name in _CONV_T:
        return 1 if k == 0 else 0
    if name in _MM_LIKE:
        return -1 if k == 0 or t.dim() == 1 else -2
    if name == "scaled_dot_product_attention":
        return -2 if k == 2 else -1
    return -1


def _common_tag(tensors: list[torch.Tensor]) -> tuple[bool, str | None]:
    """(any floating tensor is tagged, the one tag they share or None when formats mix).

    An untagged floating tensor of one or more dimensions mixes (fp32 wins, as in torch's
    promotion); 0-dim tensors do not promote (torch's rule), and neither do empty ones: they
    hold no value, and one made with an emulated tensor's dtype (float32) stands for that
    tensor's format (HF's caches start from ``torch.tensor([], dtype=key.dtype)`` and grow by
    ``cat``; natively in bf16). Runs on every op: tags are read inline (:func:`get_tag`'s
    rule).
    """
    target: str | None = None
    tagged = mixed = False
    for t in tensors:
        if not t.is_floating_point():
            continue
        tag = getattr(t, TAG, None)
        if tag is None and _MIRROR.depth:
            tag = _mirrored(t)
        if tag is not None and (tag[0] is None or tag[1] != _version_of(t)):
            tag = None  # written to since it was tagged, or marked float32 (untagged_view)
        if tag is None:
            mixed = mixed or (t.dim() > 0 and t.numel() > 0)
        elif target is None:
            tagged, target = True, tag[0]
        elif tag[0] != target:
            mixed = True
    return tagged, None if mixed else target


class EmulatedExecutor:
    """Executes ops of one autocast region by rounding fp32 values (see the module docstring).

    Cost per low op: one rounding pass per operand not already in the compute format, one over
    the result, and in backward one over the incoming gradient and one per produced gradient.
    No device syncs (fp8 amaxes and scales stay tensors).
    """

    emulated = True

    def __init__(
        self,
        policy: Policy,
        op_lists: OpLists,
        *,
        accumulate: Accumulate | None,
        recipe: Fp8Recipe | None,
        scope: str,
    ) -> None:
        self.policy = policy
        self.op_lists = op_lists
        self.accumulate = accumulate
        self.recipe = recipe
        self.scope = scope
        self.counter = 0
        compute = policy.compute_format
        self.compute = compute
        # result format of low ops: the compute format if it is a storage format
        self.result: FormatSpec | None = (
            None if (compute.operand_only or compute.is_float32) else compute
        )
        self.result_name = None if self.result is None else self.result.name
        self.result_round = None if self.result is None else spec_rounder(self.result)
        self.grads = policy.grads_format
        # gradient rounder of low ops without an fp8 recipe: the same for every op
        self._grads_round = None if recipe is not None else spec_rounder(self.grads, -1)
        params = policy.params_format
        self.params = None if params.is_float32 else params
        # rounded leaves (parameters, operands) of this region, valid while t._version holds
        self._operand_cache: dict[tuple[int, object, bool], tuple[Any, int, torch.Tensor]] = {}
        self._stack = contextlib.ExitStack()
        # op name -> the method that runs it (the op lists' category, looked up once)
        self._routes: dict[str, Callable[[Callable[..., Any], str, tuple, dict], Any]] = {}

    # -- the Executor protocol --------------------------------------------------------------
    def enter(self) -> None:
        if is_compiling():
            return  # dynamo cannot enter torch.autocast by hand; see docs/autocast.md
        # a native region outside must not cast underneath the emulation
        self._stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            self._stack.enter_context(torch.autocast("cuda", enabled=False))

    def exit(self) -> None:
        self._stack.close()

    def handle(self, func: Callable[..., Any], name: str, args: tuple, kwargs: dict) -> Any:
        if self.params is not None:
            args, kwargs = map_args(self._read_param, args, kwargs)
        if is_compiling():  # traced once per graph: no cache for dynamo to guard on
            return self._route(name)(func, name, args, kwargs)
        route = self._routes.get(name)
        if route is None:  # once per op name and region entry
            route = self._routes[name] = self._route(name)
        return route(func, name, args, kwargs)

    def _route(self, name: str) -> Callable[[Callable[..., Any], str, tuple, dict], Any]:
        cat = op_category(self.op_lists, name)
        if cat == "low":
            return self._low
        if cat == "fp32":
            return self._fp32
        if cat == "inplace":
            return self._inplace
        return self._follow

    # -- parameters -------------------------------------------------------------------------
    def _read_param(self, t: torch.Tensor) -> torch.Tensor:
        params = self.params
        if params is None or not isinstance(t, torch.nn.Parameter) or not t.is_floating_point():
            return t

        def make() -> torch.Tensor:
            r = ste_in_handler(t, spec_rounder(params), None)  # gradients reach it as-is
            if not params.is_mx:
                set_tag(r, params.name)
            return r

        return self._cached(t, "param", make)

    # -- low-precision ops ------------------------------------------------------------------
    def _operand_rounder(self, name: str, k: int, t: torch.Tensor, slot: Any) -> Rounder | None:
        if self.recipe is not None:
            fmt = self.recipe.forward_format
            recipe = self.recipe
            return lambda x: recipe.quantize(x, fmt, slot)
        if get_tag(t) == self.compute.name and not self.compute.is_mx:
            return None  # already in the compute format
        return spec_rounder(self.compute, reduction_axis(name, k, t))

    def _grad_rounder(self, slot: Any) -> Rounder | None:
        if self.recipe is None:
            return self._grads_round
        fmt = self.recipe.backward_format
        recipe = self.recipe
        return lambda g: recipe.quantize(g, fmt, slot)  # per slot: the recipe keeps its state

    def _cached(
        self, t: torch.Tensor, kind: object, make: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """``make()`` for t, reused while t (a leaf: parameter, weight, bias, input) keeps its
        version. Not cached: non-leaves, and inference tensors (no version to validate by)."""
        version = _version_of(t)
        if not t.is_leaf or version is None or is_compiling():  # a graph rounds every use
            return make()
        key = (id(t), kind, torch.is_grad_enabled() and t.requires_grad)
        hit = self._operand_cache.get(key)
        if hit is not None and hit[0]() is t and hit[1] == version:
            return hit[2]
        r = make()
        self._operand_cache[key] = (weakref.ref(t), version, r)
        return r

    def _operand(self, name: str, k: int, t: torch.Tensor, slot: Any) -> torch.Tensor:
        def make() -> torch.Tensor:
            return ste_in_handler(t, self._operand_rounder(name, k, t, slot), self.result_round)

        if self.recipe is not None:  # scaled: every use updates the recipe's amax state
            return make()
        # element rounding is axis-free; MX blocks depend on the reduction axis
        return self._cached(t, reduction_axis(name, k, t) if self.compute.is_mx else 0, make)

    def _additive(self, t: torch.Tensor) -> torch.Tensor:
        if self.result is None or get_tag(t) == self.result_name:
            return t

        def make() -> torch.Tensor:
            r = ste_in_handler(t, self.result_round, self.result_round)
            set_tag(r, self.result_name)
            return r

        return self._cached(t, "additive", make)

    def _low(self, func: Callable[..., Any], name: str, args: tuple, kwargs: dict) -> Any:
        idx = self.counter
        self.counter += 1
        args, kwargs = self._round_operands(name, idx, args, kwargs)
        out = None
        if self.accumulate is not None:
            with torch.no_grad():
                out_acc = accumulated(name, args, kwargs, self.accumulate)
            if out_acc is not None:
                ref = func(*args, **kwargs)  # fp32-accumulated: carries the gradient
                out = ref + (out_acc - ref).detach() if ref.requires_grad else out_acc
        if out is None:
            out = func(*args, **kwargs)
        ins = iter_tensors(args, kwargs)
        return map_outputs(lambda y: self._result(y, (self.scope, idx, "grad"), ins), out)

    def _round_operands(self, name: str, idx: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A low op's arguments with operands and additive terms rounded (masks untouched).

        Operands are numbered in order (positional, then keyword): the k-th is fp8 slot
        ``(scope, idx, k)`` and decides the MX reduction axis.
        """
        additive = _ADDITIVE_POS.get(name, frozenset())
        masks = _MASKS_POS.get(name, frozenset())
        count = itertools.count()  # operand numbers, in order

        def operand(t: torch.Tensor) -> torch.Tensor:
            k = next(count)
            return self._operand(name, k, t, (self.scope, idx, k))

        new_args = list(args)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if a.is_floating_point() and i not in masks:
                    new_args[i] = self._additive(a) if i in additive else operand(a)
            elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
                new_args[i] = type(a)(
                    operand(b) if isinstance(b, torch.Tensor) and b.is_floating_point() else b
                    for b in a
                )
        new_kwargs = dict(kwargs)
        for key, a in kwargs.items():
            if isinstance(a, torch.Tensor) and a.is_floating_point() and key not in _MASK_KW:
                new_kwargs[key] = self._additive(a) if key in _ADDITIVE_KW else operand(a)
        return tuple(new_args), new_kwargs

    def _result(self, y: torch.Tensor, slot: Any, inputs: list[torch.Tensor]) -> torch.Tensor:
        if not y.is_floating_point():
            return y
        fmt = None if self.result is None else self.result.element
        r = round_result(y, fmt, self._grad_rounder(slot), inputs)
        if self.result_name is not None:
            set_tag(r, self.result_name)
        return r

    # -- fp32 ops ---------------------------------------------------------------------------
    @staticmethod
    def _fp32(func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        # fp32 containers: the op runs in fp32 on the (exactly widened) values; the result is
        # untagged. The gradient reaching a tagged input is rounded by its producer's hook.
        return func(*args, **kwargs)

    # -- follow ops -------------------------------------------------------------------------
    def _follow(self, func: Callable[..., Any], name: str, args: tuple, kwargs: dict) -> Any:
        ins = iter_tensors(args, kwargs)  # one walk of the arguments per op
        tagged, target = _common_tag(ins)
        if not tagged:
            return func(*args, **kwargs)
        if name in _CASTS and _is_dtype_cast(name, args, kwargs):
            out = func(*args, **kwargs)
            # the result is whatever dtype was asked for: logically that dtype, untagged
            if isinstance(out, torch.Tensor) and any(out is t for t in ins):
                out = untagged_view(out)
            return out
        if target is None:  # mixed formats: fp32, as torch's type promotion
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if name in EXACT:
            return map_outputs(lambda y: self._tag_exact(y, target), out)
        spec = resolve_format(target)
        return map_outputs(lambda y: self._round_follow(y, spec, ins), out)

    @staticmethod
    def _tag_exact(y: torch.Tensor, target: str) -> torch.Tensor:
        if y.is_floating_point() and is_compiling():
            # dynamo cannot set attributes on outputs of multi-output ops (split, chunk, ...)
            # but can on a view of them, which inductor drops again
            y = y.view_as(y)
        if y.is_floating_point():
            set_tag(y, target)
        return y

    @staticmethod
    def _round_follow(
        y: torch.Tensor, spec: FormatSpec, inputs: list[torch.Tensor]
    ) -> torch.Tensor:
        if not y.is_floating_point() or y.dtype == torch.float64 or spec.is_mx:
            return y
        r = round_result(y, spec.element, element_rounder(spec.element), inputs)  # cached
        set_tag(r, spec.name)
        return r

    # -- in-place ops -----------------------------------------------------------------------
    def _inplace(self, func: Callable[..., Any], name: str, args: tuple, kwargs: dict) -> Any:
        self_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        tag = None if self_t is None else get_tag(self_t)
        out = func(*args, **kwargs)
        if tag is not None and self_t is not None:
            spec = resolve_format(tag)
            if spec.is_mx:
                pass
            elif forward_mode():  # no .data under vmap: an in-place copy, straight through
                self_t.copy_(ste(self_t, element_rounder(spec.element), None))
            else:  # an in-place op keeps its tensor's format
                round_data_(self_t, spec.element)
            set_tag(self_t, tag)
        return out
