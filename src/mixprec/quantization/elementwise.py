"""Rounding tensors into floating-point formats: ``quantize``, ``encode``, ``decode``.

Semantics (docs/design.md, "Quantize"): the result has the input's dtype and shape and every
value is exactly representable in the target format. Six rounding modes, IEEE 754 overflow rules
for directed modes, OCP rules for saturation, NaN propagation, ``fnuz`` zero rules, and the e8m0
scale format.

Fast paths: on CPU a C kernel (``mixprec.quantization._kernels``, built at install time from
the Python headers only) does one read and one write per element and splits large tensors over
``torch.get_num_threads()`` threads. Elsewhere (CUDA, or no C compiler at install) a torch
integer-op kernel with identical results runs instead (``quantize_backend("torch")``, or
``MIXPREC_BACKEND=torch`` at import, forces it; ``"torch-compiled"`` selects its
torch.compile'd variant). float16/bfloat16 inputs are widened to float32 (exact), rounded, and
narrowed back (a second rounding only where the target format is not a subset of the input
dtype).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any

import torch

from mixprec.formats.float_format import (
    FloatFormat,
    check_flag,
    check_rounding,
    get_format,
)
from mixprec.machine import run_parallel
from mixprec.quantization import ops, torch_kernel
from mixprec.quantization.autograd_rounding import straight_through
from mixprec.quantization.observers import has_rounding_observers, notify_rounding
from mixprec.quantization.params import ROUNDING_CODES, KernelParams, kernel_params

try:  # the optional C kernel
    from mixprec.quantization import _kernels  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised only where the build failed
    _kernels = None


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_PARALLEL_MIN = 1 << 18  # below this, one thread: dispatch would cost more than it saves
# the same for the fused kernels (MX blocks, current scaling: see _mx_floor_c)
_FUSED_PARALLEL_MIN = 1 << 20
_is_compiling = torch.compiler.is_compiling  # bound once: checked on every eager call
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
QUANTIZE_BACKENDS = ("auto", "torch", "torch-compiled")
# the backend in use, read on every rounding (a global costs nothing, an os.environ lookup
# ~0.6 us); unknown values of the variable have always meant the default
_BACKEND = os.environ.get("MIXPREC_BACKEND", "auto")
if _BACKEND not in QUANTIZE_BACKENDS:
    _BACKEND = "auto"


def quantize_backend(name: str | None = None) -> str:
    """The kernel the roundings run; with ``name``, selects it for the whole process.

    ``"auto"`` (the default): the C kernel on the CPU where it was built, the torch kernel
    elsewhere. ``"torch"``: the eager torch kernel everywhere (tests, debugging; the same bits).
    ``"torch-compiled"``: its torch.compile'd variant (opt in: the first call compiles for
    seconds). The ``MIXPREC_BACKEND`` environment variable sets the backend when mixprec is
    imported (an unknown value means ``"auto"``); later changes go through this function.
    Returns the backend in use. Raises ``TypeError`` for a non-string, ``ValueError`` for an
    unknown name.
    """
    global _BACKEND
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(f"backend must be a string or None, got {type(name).__name__}")
        if name not in QUANTIZE_BACKENDS:
            valid = ", ".join(map(repr, QUANTIZE_BACKENDS))
            raise ValueError(f"unknown quantize backend {name!r}; valid: {valid}")
        _BACKEND = name
    return _BACKEND


def has_c_kernel() -> bool:
    """True when the compiled CPU kernel is available and the backend is ``"auto"``
    (:func:`quantize_backend`)."""
    return _kernels is not None and _BACKEND == "auto"


#: Operands from this many elements up are rounded in compiled CPU graphs by the C kernels (an
#: extern call, ~4 us of dispatch), smaller ones by the traced torch ops, which inductor fuses
#: into the kernel that makes the operand. Benchmarked for MX blocks, alone: at 32k elements the
#: extern call costs 0.8x the fused ops for blocks along the last axis, 0.4x along other axes;
#: at 512k, 0.15-0.4x; at 8k, 1.3x and about even, and inside a graph the fused ops also save
#: the operand a pass. fp8 current scaling: 0.3x at 32k and 128k; model steps at 32x the corpus
#: batch gained 4-8% from it at this threshold (and lost at 4k).
EXTERN_MIN = 1 << 15


def extern_when_compiled(x: torch.Tensor) -> bool:
    """Does a compiled graph round ``x`` by a C kernel (an extern op) rather than by traced
    torch ops? On the CPU, with the kernel built, for operands of :data:`EXTERN_MIN` elements
    or more (a guard on ``x``'s size)."""
    return x.is_cpu and has_c_kernel() and x.numel() >= EXTERN_MIN


KERNEL_ISAS = ("portable", "avx2", "avx512")


def kernel_isa(isa: str | None = None) -> str | None:
    """The instruction set the C kernel's loops run, or None where the kernel was not built.

    ``"avx512"`` (x86-64-v4), ``"avx2"`` (x86-64-v3, FMA) or ``"portable"`` (the baseline
    build, and every non-x86 CPU): the best this CPU runs is chosen at import. With ``isa``,
    selects that level for the whole process, any level up to the CPU's best, e.g. to time or
    test the AVX2 code on an AVX-512 machine; every level gives the same bits. Returns the
    level in use. Raises ``TypeError`` for a non-string, ``ValueError`` for an unknown level,
    one the CPU lacks, or any level without the C kernel.
    """
    if isa is not None and not isinstance(isa, str):
        raise TypeError(f"isa must be a string or None, got {type(isa).__name__}")
    if isa is not None and isa not in KERNEL_ISAS:
        raise ValueError(f"unknown isa {isa!r}; valid: {', '.join(map(repr, KERNEL_ISAS))}")
    if _kernels is None:
        if isa is not None:
            raise ValueError(f"isa={isa!r}: the C kernel is not built on this install")
        return None
    return _kernels.simd() if isa is None else _kernels.simd(isa)


def _torch_rounding() -> Callable[
    [torch.Tensor, KernelParams, str, torch.Generator | None], torch.Tensor
]:
    """The torch kernel the backend selects: eager, or compiled with ``"torch-compiled"``."""
    if _BACKEND == "torch-compiled":
        return torch_kernel.quantize_bits_compiled
    return torch_kernel.quantize_bits


# ----------------------------------------------------------------------------------------------
# argument checks (messages name the bad value and the valid choices)
# ----------------------------------------------------------------------------------------------

# torch's own wording for what its in-place and out= ops refuse, so that code (and people)
# handling torch's errors recognise them
_LEAF_MSG = "a leaf Variable that requires grad is being used in an in-place operation."
_OUT_GRAD_MSG = (
    "{op}(): functions with out=... arguments don't support automatic differentiation, but one "
    "of the arguments requires grad."
)
_PARTIAL_OVERLAP_MSG = (
    "unsupported operation: some elements of the input tensor and the written-to tensor refer "
    "to a single memory location. Please clone() the tensor before performing the operation."
)
_INTERNAL_OVERLAP_MSG = (
    "unsupported operation: more than one element of the written-to tensor refers to a single "
    "memory location. Please clone() the tensor before performing the operation."
)
_INFERENCE_MSG = (
    "Inplace update to inference tensor outside InferenceMode is not allowed.You can make a "
    "clone to get a normal tensor before doing inplace update.See "
    "https://github.com/pytorch/rfcs/pull/17 for more details."
)


def _check_tensor(x: object, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{what} has dtype {x.dtype}; quantize takes float32, float64, float16 or bfloat16 "
            "tensors"
        )
    if x.layout != torch.strided:
        raise TypeError(f"{what} has layout {x.layout}; quantize takes dense (strided) tensors")
    if type(x).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
        # a wrapper subclass (DTensor, ...): its data_ptr is not its data, so the kernels would
        # read and write the wrong memory
        raise TypeError(
            f"{what} is a {type(x).__name__}, a tensor subclass with its own dispatch; round the "
            f"plain tensor it holds (for a DTensor: its local shard, x.to_local())"
        )
    return x


def _check_generator(generator: object, x: torch.Tensor) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}: "
            f"{generator!r}"
        )
    g, d = generator.device, x.device
    if g.type != d.type or (g.index is not None and d.index is not None and g.index != d.index):
        raise ValueError(
            f"generator is on device {g} but x is on {d}; pass a generator of x's device, "
            f"e.g. torch.Generator(device={str(d)!r})"
        )


def _check_args(
    x: object, fmt: str | FloatFormat | torch.dtype, rounding: object, saturate: object,
    subnormals: object, generator: object,
) -> FloatFormat:  # fmt: skip
    """Validate every argument of quantize-like calls; returns the format."""
    _check_tensor(x)
    f = get_format(fmt)
    check_rounding(rounding)
    check_flag(saturate, "saturate")
    check_flag(subnormals, "subnormals")
    _check_generator(generator, x)  # type: ignore[arg-type]
    return f


def _dims(t: torch.Tensor) -> list[tuple[int, int]]:
    """(size, stride) per dimension."""
    return list(zip(t.shape, t.stride(), strict=True))


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some order of the dimensions is contiguous."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in _dims(t) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses of a non-empty strided tensor."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    extent = 1 + sum((sz - 1) * st for sz, st in _dims(t))
    return start, start + extent * t.element_size()


def _check_writable(t: torch.Tensor) -> None:
    """What torch checks before any in-place write: no self-overlap, no inference tensor."""
    if not t.is_contiguous() and any(st == 0 and sz > 1 for sz, st in _dims(t)):
        raise RuntimeError(_INTERNAL_OVERLAP_MSG)
    # (dynamo traces no inference tensors, and refuses the question)
    if not _is_compiling() and t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(_INFERENCE_MSG)


def _check_no_partial_overlap(x: torch.Tensor, out: torch.Tensor) -> None:
    """Refuse ``out`` sharing some but not all of ``x``'s memory (torch's out= rule).

    Only decidable cheaply when both are dense (as in torch); otherwise one of them is not
    contiguous and the kernels read a private copy of ``x`` (see :func:`_round`), so the result
    is right whatever the overlap.
    """
    if x.numel() == 0 or x.device.type == "meta":
        return
    (a0, a1), (b0, b1) = _span(x), _span(out)
    if a1 <= b0 or b1 <= a0 or (a0, x.stride()) == (b0, out.stride()):
        return  # disjoint, or the same elements (in place)
    if _is_dense(x) and _is_dense(out):
        raise RuntimeError(_PARTIAL_OVERLAP_MSG)


def _check_out(x: torch.Tensor, out: object, op: str) -> torch.Tensor:
    out = _check_tensor(out, "out")
    if out.dtype != x.dtype:
        raise ValueError(f"out has dtype {out.dtype}; it must match x's dtype {x.dtype}")
    if out.shape != x.shape:
        raise ValueError(
            f"out has shape {tuple(out.shape)}; it must match x's shape {tuple(x.shape)}"
        )
    if out.device != x.device:
        raise ValueError(f"out is on device {out.device}; it must be on x's device {x.device}")
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        raise RuntimeError(_OUT_GRAD_MSG.format(op=op))
    _check_writable(out)
    if out is not x:
        _check_no_partial_overlap(x, out)
    return out


def _check_inplace_autograd(x: torch.Tensor) -> None:
    """Grad mode and ``x.requires_grad``: torch refuses in-place ops on leaves.

    Views are left to ``x.copy_`` itself, which raises torch's own message for each case (view
    of a leaf, view made under no_grad, one of several views of a multi-output op).
    """
    if x._base is None and x.is_leaf:
        raise RuntimeError(_LEAF_MSG)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


def _seed(generator: torch.Generator | None) -> int:
    """Draw a 62-bit seed from a CPU generator (or torch's default one): reproducible streams."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator).item())


def _ranges(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``range(n)`` in at most ``parts`` pieces, every one but
    the last a multiple of ``align`` long (the threaded kernels' split)."""
    step = -(-n // (parts * align)) * align
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _run_c(src: torch.Tensor, dst: torch.Tensor, p: KernelParams, mode: int, seed: int) -> None:
    """Run the C kernel over contiguous CPU buffers src -> dst (which may alias)."""
    n = src.numel()
    in_ptr, out_ptr = src.data_ptr(), dst.data_ptr()
    if n < 2 * _PARALLEL_MIN or torch.get_num_threads() <= 1:
        # one call, no closure: most roundings (per-op, in an emulated region) are small
        _kernels.quantize(
            p.width, in_ptr, out_ptr, n, mode, p.mantissa_bits, p.emin, p.max_bits, p.ovf_bits,
            p.minnorm_bits, p.zero_bits, p.flags, seed, 0, p.fast_lo,
        )  # fmt: skip
        return
    item = src.element_size()

    def run(start: int, stop: int) -> None:
        _kernels.quantize(
            p.width, in_ptr + start * item, out_ptr + start * item, stop - start, mode,
            p.mantissa_bits, p.emin, p.max_bits, p.ovf_bits, p.minnorm_bits, p.zero_bits,
            p.flags, seed, start, p.fast_lo,
        )  # fmt: skip

    threads = min(torch.get_num_threads(), n // _PARALLEL_MIN)
    bounds = _ranges(n, threads, 64)  # cache-line aligned chunks
    run_parallel([partial(run, start, stop) for start, stop in bounds])


def _c_serves(x: torch.Tensor) -> bool:
    """Do C calls serve ``x``? Not under torch.compile, with no C kernel or a torch backend,
    off the CPU, for a torch.func transform's wrapper (``grad``, ``vmap``: no memory of its
    own to hand to C), or with a rounding observer (it must see every element rounding).
    Compiling is asked first: dynamo then adds no guard on ``x``."""
    return (
        not _is_compiling()
        and x.is_cpu
        and not _is_functorch_wrapped(x)
        and has_c_kernel()
        and not has_rounding_observers()
    )


def _one_c_call(x: torch.Tensor) -> bool:
    """Does one single-threaded C call serve ``x``? Where C calls serve it (:func:`_c_serves`),
    except for a large tensor with several threads (those take the threaded paths)."""
    if not _c_serves(x):
        return False
    return x.numel() < 2 * _PARALLEL_MIN or torch.get_num_threads() <= 1


def _nearest_lane(x: torch.Tensor) -> bool:
    """Does the eager lane of :func:`round_to` and :func:`round_data_` take ``x``: served by one
    C call (:func:`_one_c_call`), float32, non-empty, and runnable over as one flat buffer
    (contiguous or a permutation of a contiguous layout, :func:`_gap_free`)? The lane makes that
    call directly (:func:`_nearest_c`), skipping the general path's ~3 us of Python (a third to
    a half of a rounding's cost at the sizes of an emulated op)."""
    return _one_c_call(x) and x.dtype == torch.float32 and x.numel() > 0 and _gap_free(x)


def _gap_free(x: torch.Tensor) -> bool:
    """Do ``x``'s elements fill the span of ``numel`` elements from ``x.data_ptr()`` (contiguous,
    or a permutation of a contiguous layout: a transpose, attention heads split by a view and a
    transpose)? Then an in-place elementwise pass can run over the span as one flat buffer."""
    if x.is_contiguous():
        return True
    dims = sorted((st, sz) for st, sz in zip(x.stride(), x.shape, strict=True) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


@lru_cache(maxsize=1024)
def _element_args(fmt: FloatFormat, saturate: bool = True) -> tuple[int, ...]:
    """The kernels' parameters of ``fmt`` for float32 and nearest (saturating by default: an
    fp8 or MX operand's rounding), in the order the fused kernels take them. Cached: every
    fused rounding passes them."""
    p = kernel_params(fmt, 32, saturate, True, "nearest")
    return (
        p.mantissa_bits, p.emin, p.max_bits, p.ovf_bits, p.minnorm_bits, p.zero_bits, p.flags,
        p.fast_lo,
    )  # fmt: skip


@lru_cache(maxsize=1024)
def _nearest_args(fmt: FloatFormat, saturate: bool) -> tuple[int, ...]:
    """The C kernel's arguments after the element count for float32 round-to-nearest into
    ``fmt``: what :func:`_run_c` passes (seed and offset 0)."""
    *head, fast_lo = _element_args(fmt, saturate)
    return (ROUNDING_CODES["nearest"], *head, 0, 0, fast_lo)


def _nearest_c(src: torch.Tensor, dst: torch.Tensor, fmt: FloatFormat, saturate: bool) -> None:
    """One C call rounding ``src``'s span to nearest ``fmt`` into ``dst``'s (the lane's call;
    both spans of ``src.numel()`` float32 elements, possibly the same)."""
    args = _nearest_args(fmt, bool(saturate))
    _kernels.quantize(32, src.data_ptr(), dst.data_ptr(), src.numel(), *args)


def fused_mx_floor(
    x: torch.Tensor,
    element: FloatFormat,
    block: int,
    axis: int,
    down: float,
    smallest: float,
    *,
    keep_layout: bool = False,
) -> torch.Tensor | None:
    """The MX blocks of float32 ``x`` along ``axis`` (normalised) under the "floor" scale rule
    (``2^-emax_elem`` = ``down``, E8M0's smallest scale ``smallest``), nearest and saturating,
    in one C call: :mod:`~mixprec.quantization.blocks`' view path, the same bits. A fresh
    contiguous tensor; with ``keep_layout``, a fresh tensor in ``x``'s layout where ``x`` is a
    permutation of a contiguous one (:func:`_memory_order`: a transposed GEMM operand is
    blocked in memory order, with no transposing copy). None where the kernel does not serve
    (:func:`_c_serves`). Cost: one read and one write of ``x`` (plus a copy of a strided
    ``x`` it cannot run over), the blocks in cache in between; a tensor of 2M elements or more
    with several torch threads is split among the shared pool's threads (:func:`_mx_floor_c`).
    """
    if not _c_serves(x):
        return None
    # a contiguous x (most operands) is its own memory order: no permutation to work out
    order = _memory_order(x) if keep_layout and not x.is_contiguous() else None
    if order is None:
        src = x.contiguous()
        out = dst = torch.empty_like(src)
    else:
        out = torch.empty_like(x)  # x's strides: dense and non-overlapping
        src, dst = x.permute(order), out.permute(order)
        axis = order.index(axis)
    shape = src.shape
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    rest = (down, smallest, *_element_args(element))
    _mx_floor_c(src.data_ptr(), dst.data_ptr(), outer, shape[axis], inner, block, rest)
    return out


def _mx_floor_c(
    in_ptr: int, out_ptr: int, outer: int, n: int, inner: int, block: int, rest: tuple[Any, ...]
) -> None:
    """The kernel's MX blocks of a contiguous float32 ``(outer, n, inner)`` buffer (``rest``:
    the kernel's arguments after the block size), one call or, for 2M elements or more with
    several torch threads, a call per thread on the shared pool, 1M elements or more each:
    whole slabs of ``outer`` each, or, for a single slab, whole blocks along ``n`` (blocks never
    straddle two calls, so the bits are one call's). Below that, waking the pool (~0.1 ms here)
    costs more than the split saves (the kernel takes ~0.25 ns an element)."""
    threads = min(torch.get_num_threads(), outer * n * inner // _FUSED_PARALLEL_MIN)
    if threads <= 1 or (outer == 1 and n <= block):
        _kernels.mx_floor(in_ptr, out_ptr, outer, n, inner, block, *rest)
        return
    if outer > 1:  # slabs [o0, o1) of outer
        slab = n * inner * 4
        parts = [(o0 * slab, o1 - o0, n) for o0, o1 in _ranges(outer, threads)]
    else:  # one slab: whole blocks [j0, j1) along n
        parts = [(j0 * inner * 4, 1, j1 - j0) for j0, j1 in _ranges(n, threads, block)]
    run_parallel(
        [
            partial(_kernels.mx_floor, in_ptr + at, out_ptr + at, k, m, inner, block, *rest)
            for at, k, m in parts
        ]
    )


def _memory_order(x: torch.Tensor) -> list[int] | None:
    """The permutation of ``x``'s dimensions into memory order (``x.permute(order)`` and a
    tensor allocated like ``x`` permuted alike are contiguous), or None where ``x`` is not a
    permutation of a contiguous layout (an overlapping or gapped ``x`` permutes to no
    contiguous tensor). Size-1 dimensions go last, in their order."""
    strides = x.stride()
    order = sorted(range(x.dim()), key=lambda d: (-strides[d] if x.shape[d] != 1 else 0, d))
    if not x.permute(order).is_contiguous():
        return None
    return order


def fused_current_scaled_round(
    x: torch.Tensor, fmax: float, fmt: FloatFormat
) -> tuple[torch.Tensor, float] | None:
    """fp8 current scaling of float32 ``x`` in one C call: ``s = fmax / max|x|`` as torch
    computes it in float32 (1.0 where that is not a positive finite number: zeros, inf or NaN
    in ``x``), then ``round(x * s) / s`` in ``fmt`` (nearest, saturating): the float32 product,
    ``round_to`` and the float32 quotient, the same bits as those torch ops. Returns the
    rounded tensor (fresh, in ``x``'s layout where that is a permutation of a contiguous one,
    as the torch ops give; else contiguous) and ``s``; None where the kernel does not serve
    (:func:`_c_serves`). Cost: two reads of ``x`` (the maximum, then the rounding) and one
    write, no temporaries (plus a copy of a strided ``x`` it cannot run over); a tensor of 2M
    elements or more with several torch threads is split among the shared pool's threads
    (:func:`_current_scaled_round_c`)."""
    if not _c_serves(x):
        return None
    src = x if _gap_free(x) else x.contiguous()
    out = torch.empty_like(src)  # src's strides: elementwise over the span in memory order
    scale = _current_scaled_round_c(
        src.data_ptr(), out.data_ptr(), src.numel(), fmax, _element_args(fmt)
    )
    return out, scale


def _current_scaled_round_c(
    in_ptr: int, out_ptr: int, n: int, fmax: float, args: tuple[Any, ...]
) -> float:
    """The kernel's current scaling of ``n`` contiguous float32 values (``args``: the element
    format's kernel arguments); returns the scale. One call or, for 2M elements or more with
    several torch threads, two rounds on the shared pool, a part of 1M elements or more per
    thread: each part's largest magnitude pattern, then each part rounded with the scale of
    the largest (NaN patterns lie above inf's, so it is the whole tensor's: the bits of one
    call)."""
    threads = min(torch.get_num_threads(), n // _FUSED_PARALLEL_MIN)
    if threads <= 1:
        return _kernels.current_scaled_round(in_ptr, out_ptr, n, fmax, *args)
    bounds = _ranges(n, threads, 16)  # 64-byte aligned parts
    parts = [(i, 4 * start, stop - start) for i, (start, stop) in enumerate(bounds)]
    maxima = [0] * len(parts)
    scales = [1.0] * len(parts)

    def amax(i: int, at: int, m: int) -> None:
        maxima[i] = _kernels.absmax32(in_ptr + at, m)

    def rounded(top: int, i: int, at: int, m: int) -> None:
        scales[i] = _kernels.scaled_round_amax(in_ptr + at, out_ptr + at, m, fmax, top, *args)

    run_parallel([partial(amax, *part) for part in parts])
    run_parallel([partial(rounded, max(maxima), *part) for part in parts])
    return scales[0]


def _quantize_work(
    work: torch.Tensor,
    p: KernelParams,
    rounding: str,
    generator: torch.Generator | None,
    dst: torch.Tensor | None,
) -> torch.Tensor:
    """Round a float32/float64 tensor ``work``; write into dst (same dtype) when given."""
    use_c = (
        work.is_cpu
        and not _is_functorch_wrapped(work)
        and has_c_kernel()
        and (dst is None or (dst.is_contiguous() and not _is_functorch_wrapped(dst)))
    )
    if use_c:
        src = work if dst is None and _in_own_layout(work, rounding) else work.contiguous()
        # a strided ``work`` was just copied: round that fresh copy in place (no second buffer)
        target = dst if dst is not None else src if src is not work else torch.empty_like(src)
        seed = _seed(generator) if rounding == "stochastic" else 0
        if src.numel():
            _run_c(src, target, p, ROUNDING_CODES[rounding], seed)
        if dst is not None:
            # the kernel wrote raw memory: tell autograd, as torch's in-place ops do
            torch.autograd.graph.increment_version(dst)
        return target
    permuted = dst is None and not work.is_contiguous() and _in_own_layout(work, rounding)
    order = _memory_order(work) if permuted else None
    if order is not None:  # over the contiguous permutation, returned in work's layout
        res = _torch_rounding()(work.permute(order), p, rounding, generator)
        return res.permute(sorted(range(len(order)), key=order.__getitem__))
    res = _torch_rounding()(work, p, rounding, generator)
    if dst is not None:
        dst.copy_(res)
        return dst
    return res


def _in_own_layout(work: torch.Tensor, rounding: str) -> bool:
    """Is ``work`` rounded over its memory span into a tensor of its own layout, as torch's
    elementwise ops (and the torch backend) keep a permutation of a contiguous layout? Not for
    stochastic rounding, whose draws follow the elements' logical order (the same bits as
    before for a given seed, whatever the layout)."""
    return rounding != "stochastic" and _gap_free(work)


def _round_compiled(
    x: torch.Tensor, f: FloatFormat, rounding: str, saturate: bool, subnormals: bool,
    generator: torch.Generator | None, out: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """:func:`_round` while torch.compile traces: the custom op ``mixprec::round``.

    Dynamo cannot trace the kernels (raw pointers, a seed ``.item()``); the op is opaque to it
    and carries its own (zero) gradient.
    """
    if generator is not None:
        raise ValueError(
            "generator is not supported under torch.compile (a torch.Generator cannot be an "
            "input of the mixprec::round op); pass generator=None: stochastic rounding then "
            "draws from torch's default generator (seed it with torch.manual_seed)"
        )
    res = ops.round_op(x, f, rounding, saturate, subnormals)
    return res if out is None else out.copy_(res)


def _round(
    x: torch.Tensor, f: FloatFormat, rounding: str, saturate: bool, subnormals: bool,
    generator: torch.Generator | None, out: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """Round ``x`` (into ``out`` when given): the kernels, no checks, no autograd."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()  # exact widening
    width = 64 if work.dtype == torch.float64 else 32
    p = kernel_params(f, width, bool(saturate), bool(subnormals), rounding)
    dst = out if out is not None and work is x and out.is_contiguous() else None
    res = _quantize_work(work, p, rounding, generator, dst)
    if out is None:
        return res if res.dtype == x.dtype else res.to(x.dtype)
    if res is not out:
        out.copy_(res)  # a fresh result: right whatever the overlap of x and out
    return out


def quantize(
    x: torch.Tensor,
    fmt: str | FloatFormat | torch.dtype,
    *,
    rounding: str = "nearest",
    saturate: bool = False,
    subnormals: bool = True,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round every element of ``x`` to the nearest value (per ``rounding``) of format ``fmt``.

    Args:
        x: float32, float64, float16 or bfloat16 tensor, any shape, any device.
        fmt: a format name or alias (``"bf16"``, ``"e4m3"``, ``"e6m9"``, ...), a
            :class:`FloatFormat` or a floating ``torch.dtype``.
        rounding: ``"nearest"`` (ties to even), ``"stochastic"``, ``"toward_zero"``, ``"up"``
            (toward +inf), ``"down"`` (toward -inf) or ``"odd"`` (round to odd).
        saturate: clamp finite overflow and ±inf to ±max (NaN stays NaN). Otherwise overflow
            gives ±inf where the format has it, else NaN; directed modes never overflow away
            from their direction (IEEE 754). Formats with neither inf nor NaN always saturate.
        subnormals: if False, results below the smallest normal flush to signed zero.
        generator: source of randomness for stochastic rounding (reproducible streams); a
            ``torch.Generator`` on ``x``'s device. Not under torch.compile (it cannot be an
            input of the ``mixprec::round`` op: ``ValueError``, a graph break without
            ``fullgraph``): there stochastic rounding draws from torch's default generator.
        out: optional tensor of ``x``'s dtype, shape and device to write into. As torch's
            out= ops: ``out`` may be ``x`` itself but may not partially overlap it, and
            neither may require grad while grad mode is on (``RuntimeError``, torch's wording).

    Returns a tensor of ``x``'s dtype and shape (``out`` if given), in ``x``'s layout where that
    is a permutation of a contiguous one (a transpose, as torch's elementwise ops keep it) and
    the rounding is deterministic, else contiguous. Cost: one read and one write of ``x`` on
    the CPU fast path (plus a copy of other strided inputs); float16/bfloat16 inputs add a
    widening copy.
    Stochastic rounding draws one seed from ``generator`` (a device sync on CUDA).

    Autograd: rounding is piecewise constant, so, like ``torch.round``, ``quantize`` is
    differentiable with gradient zero: for an ``x`` that requires grad the result is part of
    the graph (not silently detached) and passes zeros back. For a straight-through gradient
    (quantization-aware training) use :func:`fake_quantize`.

    torch.compile: traced without graph breaks; the rounding is then the custom op
    ``mixprec::round`` (:mod:`mixprec.quantization.ops`), bit-exact with eager calls.

    Raises ``TypeError`` for arguments of the wrong type and ``ValueError`` for bad values
    (unknown format or rounding names, with the closest valid names).
    """
    f = _check_args(x, fmt, rounding, saturate, subnormals, generator)
    if out is not None:
        out = _check_out(x, out, "quantize")
    return round_to(
        x, f, rounding=rounding, saturate=saturate, subnormals=subnormals, generator=generator,
        out=out,
    )  # fmt: skip


def round_to(
    x: torch.Tensor,
    fmt: FloatFormat,
    *,
    rounding: str = "nearest",
    saturate: bool = False,
    subnormals: bool = True,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`quantize` with no argument checks: for callers that validated once.

    The same rounding, autograd behaviour and observer notification as :func:`quantize`, but
    nothing is checked: ``fmt`` must be a resolved :class:`FloatFormat`, ``rounding`` one of
    :data:`ROUNDING_MODES`, the flags bools, ``x`` a dense float32/float64/float16/bfloat16
    tensor, ``generator`` None or on ``x``'s device, and ``out`` (optional) a writable tensor
    of ``x``'s dtype, shape and device not partially overlapping it. Bad values give wrong
    results or low-level errors instead of ``quantize``'s messages.

    Why: ``quantize``'s checks cost 15-30% of a call on small tensors (256 elements, CPU),
    which per-op roundings (the emulated precision regions, fp8 recipes, blocked accumulation)
    pay on every op for arguments that never change. Cost otherwise as :func:`quantize`.
    """
    if (
        out is None
        and rounding == "nearest"
        and subnormals
        and not (x.requires_grad and torch.is_grad_enabled())
        and _nearest_lane(x)
    ):
        res = torch.empty_like(x)  # x's strides (dense, non-overlapping): the same span order
        _nearest_c(x, res, fmt, saturate)
        return res  # (no observer to notify: the lane runs only when none is registered)
    if _is_compiling():  # eager calls skip the op: its dispatcher costs ~12 us a call
        res = _round_compiled(x, fmt, rounding, saturate, subnormals, generator, out)
    elif out is not None:
        res = _round(x, fmt, rounding, saturate, subnormals, generator, out)
    elif torch.is_grad_enabled() and x.requires_grad:

        def q(t: torch.Tensor) -> torch.Tensor:
            return _round(t, fmt, rounding, saturate, subnormals, generator, None)

        res = straight_through(x, q, torch.zeros_like)
    else:
        res = _round(x, fmt, rounding, saturate, subnormals, generator, None)
    notify_rounding(x, res, fmt)  # e.g. the sanitizer: the C kernel is invisible to it
    return res


def round_data_(x: torch.Tensor, fmt: FloatFormat, *, saturate: bool = False) -> None:
    """Round ``x``'s values to ``fmt`` (nearest) in place, unseen by autograd: what
    ``round_to(x.data, fmt, saturate=saturate, out=x.data)`` does, a straight-through rounding
    of ``x``'s storage (its version counter is not bumped). Unchecked as :func:`round_to`.

    The emulated regions round every fresh op result this way. Cost: one pass over ``x`` (one
    C call on the CPU where ``x`` is contiguous or a permutation of a contiguous layout); a
    temporary for other strided tensors.
    """
    if _nearest_lane(x):
        _nearest_c(x, x, fmt, saturate)
        return
    d = x.data
    if d.is_contiguous():
        round_to(d, fmt, saturate=saturate, out=d)
    else:
        d.copy_(round_to(d, fmt, saturate=saturate))


def quantize_(
    x: torch.Tensor,
    fmt: str | FloatFormat | torch.dtype,
    *,
    rounding: str = "nearest",
    saturate: bool = False,
    subnormals: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """In-place :func:`quantize`: rounds ``x``'s own storage and returns ``x``.

    No allocation on the CPU fast path for contiguous float32/float64 tensors (one read and one
    write per element), which is what a training loop wants: a fresh out-of-place result costs
    page faults that exceed the rounding itself.

    Behaves as torch's in-place ops (``round_``): the autograd version counter is bumped, so
    a backward that needs the old values raises; with grad mode on, a leaf that requires grad
    (or a view of one) is refused, and a non-leaf gets gradient zero (through ``x.copy_``: one
    extra pass, only on this path); tensors with self-overlapping memory (``expand``) are
    refused. Use ``torch.no_grad()`` to round parameters in place.
    """
    f = _check_args(x, fmt, rounding, saturate, subnormals, generator)
    _check_writable(x)
    if torch.is_grad_enabled() and x.requires_grad:
        _check_inplace_autograd(x)
        x.copy_(_round(x.detach(), f, rounding, saturate, subnormals, generator, None))
    elif _is_compiling():  # the custom op, its result copied back
        _round_compiled(x, f, rounding, saturate, subnormals, generator, x)
    else:
        _round(x, f, rounding, saturate, subnormals, generator, x)
    notify_rounding(x, x, f)
    return x


# ----------------------------------------------------------------------------------------------
# encode / decode
# ----------------------------------------------------------------------------------------------


def code_dtype(fmt: str | FloatFormat) -> torch.dtype:
    """Integer dtype that holds ``fmt``'s codes: uint8 up to 8 bits, then int16/int32/int64."""
    bits = get_format(fmt).bits
    if bits <= 8:
        return torch.uint8
    if bits <= 16:
        return torch.int16
    if bits <= 32:
        return torch.int32
    return torch.int64


def _codes_from_values(q: torch.Tensor, f: FloatFormat) -> torch.Tensor:
    """Codes of values already exactly representable in f (float64 tensor)."""
    u = q.view(torch.int64)
    neg = u < 0
    a = u & ((1 << 63) - 1)
    e64 = a >> 52
    m64 = torch.where(e64 > 0, (a & ((1 << 52) - 1)) | (1 << 52), a & ((1 << 52) - 1))
    ulp_in = e64.clamp(min=1) - 1075
    e_true = torch_kernel.ilog2(m64.clamp(min=1)) + ulp_in
    M = f.mantissa_bits
    if f.encoding == "e8m0":
        return (e_true + f.bias).clamp(0, 254)
    normal = e_true >= f.emin
    exp_field = torch.where(normal, e_true + f.bias, torch.zeros_like(e_true))
    # mantissa field: significand in units of the format's quantum at this exponent
    qe = e_true.clamp(min=f.emin) - M
    shift = qe - ulp_in
    mant = torch.where(shift >= 0, m64 >> shift.clamp(0, 63), m64 << (-shift).clamp(0, 63))
    mant = mant & ((1 << M) - 1)
    code = (exp_field << M) | mant
    code = torch.where(a == 0, torch.zeros_like(code), code)
    inf = a == 0x7FF0000000000000
    if f.has_infinity:
        code = torch.where(inf, torch.full_like(code, ((1 << f.exponent_bits) - 1) << M), code)
    sign_allowed = neg & ((a != 0) | f.has_negative_zero)
    return code | (sign_allowed.to(torch.int64) << (f.exponent_bits + M))


def encode(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    *,
    rounding: str = "nearest",
    saturate: bool = False,
    subnormals: bool = True,
    generator: torch.Generator | None = None,
    pack: bool = False,
) -> torch.Tensor:
    """Quantize ``x`` to ``fmt`` and return the bit patterns (see :func:`code_dtype`).

    NaN encodes to the format's canonical NaN; a format without NaN (fp6, fp4) cannot encode
    it and raises ``ValueError`` (checking costs one device sync). ``pack=True`` (formats of at
    most 4 bits) stores two codes per byte along the last dimension, the first element in the
    low nibble (the OCP MX / ``torch.float4_e2m1fn_x2`` order); the last dimension must be even.
    """
    f = get_format(fmt)
    x = _check_tensor(x).detach()  # codes are integers: no gradient to track
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # exact widening
    q = quantize(
        wide, f, rounding=rounding, saturate=saturate, subnormals=subnormals, generator=generator
    )
    nan = torch.isnan(q)
    if not f.has_nan and bool(nan.any()):
        raise ValueError(f"x contains NaN, which {f.name} cannot encode (it has no NaN code)")
    dt = code_dtype(f)
    if f.torch_dtype is not None:
        # q holds values of f only, so torch's cast is exact here: one fast pass
        codes = q.to(f.torch_dtype).view(dt)
    else:
        codes = _codes_from_values(torch.where(nan, 0.0, q).to(torch.float64), f)
        if dt == torch.uint8:
            codes = codes.to(torch.uint8)
        elif dt != torch.int64:
            bits = torch.iinfo(dt).bits
            codes = torch.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes).to(dt)
    if f.has_nan:  # one canonical NaN code, whatever the sign or payload
        nan_code = f.nan_code
        if dt != torch.uint8 and nan_code >= 1 << (torch.iinfo(dt).bits - 1):
            nan_code -= 1 << torch.iinfo(dt).bits
        codes = torch.where(nan, torch.tensor(nan_code, dtype=dt, device=codes.device), codes)
    if check_flag(pack, "pack"):
        codes = _pack_nibbles(codes, f)
    return codes


def _pack_nibbles(codes: torch.Tensor, f: FloatFormat) -> torch.Tensor:
    if f.bits > 4:
        raise ValueError(f"pack=True needs a format of at most 4 bits; {f.name} has {f.bits}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack=True needs an even last dimension, got shape {tuple(codes.shape)}")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@lru_cache(maxsize=64)
def _decode_table(f: FloatFormat) -> torch.Tensor:
    """float64 value of every code of a format of at most 16 bits (CPU)."""
    codes = torch.arange(1 << f.bits, dtype=torch.int64)
    return _values_from_codes(codes, f)


def _values_from_codes(codes: torch.Tensor, f: FloatFormat) -> torch.Tensor:
    M, E = f.mantissa_bits, f.exponent_bits
    codes = codes & ((1 << f.bits) - 1)
    mag_bits = E + M
    neg = ((codes >> mag_bits) & 1) == 1 if f.is_signed else torch.zeros_like(codes, dtype=bool)
    ef = (codes >> M) & ((1 << E) - 1)
    mant = codes & ((1 << M) - 1)
    if f.encoding == "e8m0":
        mag = torch.ldexp(torch.ones_like(codes, dtype=torch.float64), (ef - f.bias).double())
    else:
        sig = torch.where(ef > 0, mant + (1 << M), mant).to(torch.float64)
        exp = ef.clamp(min=1) - f.bias - M
        mag = sig * torch.exp2((exp // 2).double()) * torch.exp2((exp - exp // 2).double())
    val = torch.where(neg, -mag, mag)
    if f.encoding == "ieee":
        top = ef == (1 << E) - 1
        val = torch.where(top & (mant == 0), torch.where(neg, -math.inf, math.inf), val)
        val = torch.where(top & (mant != 0), math.nan, val)  # every payload, not just nan_code
    elif f.nan_code is not None:
        # one NaN code (fnuz, e8m0), or one per sign for fn: compare the code without its sign
        c = codes & ((1 << mag_bits) - 1) if f.encoding == "fn" else codes
        val = torch.where(c == f.nan_code, math.nan, val)
    return val


def _code_range(bits: int) -> tuple[int, int]:
    """Valid integer values for ``bits``-bit codes.

    ``0 .. 2^bits - 1``; where a code fills its storage type (8-bit formats in (u)int8, 16-bit
    formats in int16, ...) its two's-complement reading ``-2^(bits-1) .. -1`` too, as a
    ``.view(torch.int8)`` of fp8 data or a sign-extending ``.long()`` of int16 codes gives.
    """
    full = bits in (8, 16, 32, 64)
    return (-(1 << (bits - 1)) if full else 0), (1 << bits) - 1


def _check_code_range(codes: torch.Tensor, bits: int, name: str, what: str) -> None:
    """ValueError naming the first code outside :func:`_code_range` (one min/max host sync).

    Free (no sync) when the integer dtype cannot hold a bad value (uint8 codes of 8-bit formats,
    int16 codes of 16-bit formats, ...).
    """
    lo, hi = _code_range(bits)
    info = torch.iinfo(codes.dtype)
    if codes.numel() == 0 or (info.min >= lo and info.max <= hi):
        return
    c = codes if codes.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32) else None
    c = codes.to(torch.int64) if c is None else c  # aminmax lacks the uint16/32/64 kernels
    cmin, cmax = torch.stack(torch.aminmax(c)).tolist()  # one sync
    if cmin >= lo and cmax <= hi:
        return
    first = torch.nonzero((c < lo) | (c > hi))[0].tolist()
    where = f"{what}[{', '.join(map(str, first))}]" if first else what  # 0-d: no index
    raise ValueError(
        f"{where} = {int(c[tuple(first)])} is out of range for {name} (valid: {lo}..{hi})"
    )


def _check_codes_tensor(codes: object, what: str) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(codes).__name__}")
    dt = codes.dtype
    if dt.is_floating_point or dt.is_complex or dt == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got {dt}")
    if codes.layout != torch.strided:
        raise TypeError(f"{what} has layout {codes.layout}; decode takes dense tensors")
    return codes


def _check_float_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype (float32, float64, float16, bfloat16, ...), "
            f"got {dtype!r}"
        )
    return dtype


def decode(
    codes: torch.Tensor,
    fmt: str | FloatFormat,
    *,
    dtype: torch.dtype = torch.float32,
    packed: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`encode`: bit patterns of ``fmt`` to values of ``dtype``.

    ``decode(encode(x, f), f) == quantize(x, f)`` for every ``x`` (NaN for NaN), when ``dtype``
    holds the format's values (float64 always does).

    ``codes`` may have any integer dtype. Valid values are ``0 .. 2^bits - 1`` and, for codes
    that fill their storage type (8-, 16-, 32-, 64-bit formats), their two's-complement
    negatives (an ``int8`` view of fp8 data). With ``packed=True`` (formats of at most 4 bits)
    each byte holds two codes, the first in the low nibble, as ``encode(..., pack=True)`` writes
    them; valid bytes are ``-128 .. 255``. Out-of-range values raise ``ValueError`` naming the
    first one: that check costs a min/max reduction and one host sync, skipped when the dtype
    cannot hold a bad value (``uint8`` codes of an 8-bit format, ``int16`` of a 16-bit one).
    """
    f = get_format(fmt)
    codes = _check_codes_tensor(codes, "codes")
    _check_float_dtype(dtype)
    if check_flag(packed, "packed"):
        if f.bits > 4:
            raise ValueError(f"packed=True needs a format of at most 4 bits; {f.name} has {f.bits}")
        if codes.dim() == 0:
            raise ValueError(
                "packed=True needs codes with at least one dimension, got a 0-d tensor"
            )
        _check_code_range(codes, 8, f"packed {f.name} bytes", "codes")
        codes = _unpack_nibbles(codes.to(torch.uint8))
        if f.bits < 4:
            _check_code_range(codes, f.bits, f"{f.name} codes", "unpacked codes")
    else:
        _check_code_range(codes, f.bits, f"{f.name} codes", "codes")
    c64 = codes.to(torch.int64) & ((1 << f.bits) - 1)
    if f.bits <= 16:
        table = _decode_table(f).to(codes.device)
        return table[c64].to(dtype)
    return _values_from_codes(c64, f).to(dtype)


# ----------------------------------------------------------------------------------------------
# straight-through rounding (quantization-aware training)
# ----------------------------------------------------------------------------------------------


def fake_quantize(
    x: torch.Tensor,
    fmt: str | FloatFormat | torch.dtype,
    *,
    rounding: str = "nearest",
    saturate: bool = False,
    subnormals: bool = True,
    generator: torch.Generator | None = None,
    grad_format: str | FloatFormat | torch.dtype | None = None,
    grad_rounding: str = "nearest",
) -> torch.Tensor:
    """:func:`quantize` in the forward pass, identity (straight-through) in the backward pass.

    With ``grad_format`` the incoming gradient is itself quantized to that format (with
    ``grad_rounding``), which is how gradient underflow in fp16/fp8 backward passes is emulated.
    """
    f = _check_args(x, fmt, rounding, saturate, subnormals, generator)
    gf = None if grad_format is None else get_format(grad_format)
    check_rounding(grad_rounding, "grad_rounding")

    # arguments checked above: the closures round unchecked
    def q(t: torch.Tensor) -> torch.Tensor:
        return round_to(
            t, f, rounding=rounding, saturate=saturate, subnormals=subnormals, generator=generator
        )

    grad_q = None
    if gf is not None:

        def grad_q(g: torch.Tensor) -> torch.Tensor:
            return round_to(g, gf, rounding=grad_rounding)

    return straight_through(x, q, grad_q)
