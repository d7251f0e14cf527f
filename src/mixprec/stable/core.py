"""Evaluation engine behind :mod:`mixprec.stable`: dtype handling and cache-sized chunking.

Every stable function evaluates its formula in a *wide* dtype (float64) and rounds the result
once to the input's dtype. For float32, float16 and bfloat16 inputs that makes the formula's own
rounding errors (a few float64 ulps, 2^-29 of a float32 ulp) invisible, so the result is within
half an ulp (plus a hair) of the correctly rounded value. float64 inputs get the same careful
formulas without a wider type underneath.

Speed: converting a 16M-element float32 tensor to float64 and running five or six ops on it is
three times slower than the naive float32 expression when every op streams through main memory.
On CPU we therefore cut the work into chunks of ``CHUNK`` elements: each chunk's float64
temporaries stay in L2 cache, and each chunk's result is written straight into the output. The
chunks are shared out to a few Python threads (torch releases the GIL inside its kernels) rather
than relying on torch's per-op parallelism, whose barrier after every op costs dearly when the
machine is busy; each thread takes the next chunk when it is done with its last. Every torch
call in a worker thread releases and retakes the GIL, which costs when the threads contend for
it, so kernels keep their calls per chunk few: results go straight into the output with ``out=``
arguments, and rare-case checks run once per call on per-row or per-segment statistics that
the kernels hand back (:func:`map_rows_multi`, :func:`map_elementwise_stats`) rather than as a
few small ops per chunk. A chunked float64 softplus runs about as fast as the naive unchunked
float32 ``log(1 + exp(x))``. On other devices (CUDA) a kernel runs once on the whole tensor.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from functools import partial
from numbers import Real

import torch
from torch import Tensor

from mixprec.machine import run_parallel

__all__ = [
    "CHUNK",
    "FLOAT_DTYPES",
    "WIDE",
    "Workspace",
    "as_float",
    "check_dim",
    "float_pair",
    "map_elementwise",
    "map_elementwise_stats",
    "map_rows",
    "map_rows_multi",
]

#: The dtype formulas are evaluated in.
WIDE = torch.float64
#: Elements per chunk on CPU: 31 Ki float64 = 248 KiB, a few such buffers fit in L2, and it is
#: just below torch's intra-op grain size (32 Ki), so one chunk's ops -- reductions included,
#: which torch parallelises from 32 Ki elements on at a cost of ~70 us per call -- run serially
#: in the thread that calls them.
CHUNK = (1 << 15) - 1024
#: The dtypes the stable functions accept (anything else is promoted or rejected).
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

Kernel = Callable[..., Tensor]


def as_float(x: object, name: str, dtype: torch.dtype | None = None) -> Tensor:
    """Return ``x`` as a floating-point tensor (no copy when it already is one).

    Python numbers become tensors of ``dtype`` (default: torch's default dtype); integer and
    bool tensors are promoted to the default float dtype as torch's unary float ops do.
    Complex tensors and other objects raise ``TypeError``.
    """
    if isinstance(x, Tensor):
        if x.is_complex():
            raise TypeError(f"{name} has complex dtype {x.dtype}; expected one of {FLOAT_DTYPES}")
        if x.dtype in FLOAT_DTYPES:
            return x
        if x.is_floating_point():
            raise TypeError(
                f"{name} has dtype {x.dtype}; expected one of {FLOAT_DTYPES} "
                "(convert float8 and other storage formats first)"
            )
        return x.to(torch.get_default_dtype())
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a tensor or a real number, got {type(x).__name__}")
    return torch.tensor(float(x), dtype=dtype or torch.get_default_dtype())


def float_pair(x: object, y: object, names: tuple[str, str] = ("x", "y")) -> tuple[Tensor, Tensor]:
    """Two operands as tensors of one floating dtype (torch's type promotion).

    A Python number takes the other operand's dtype; integer results promote to the default
    float dtype. The tensors are not broadcast (autograd's backward reduces each gradient to its
    operand's shape).
    """
    if not isinstance(x, Tensor) and isinstance(y, Tensor):
        x = as_float(x, names[0], y.dtype if y.dtype in FLOAT_DTYPES else None)
    if not isinstance(y, Tensor) and isinstance(x, Tensor):
        y = as_float(y, names[1], x.dtype if x.dtype in FLOAT_DTYPES else None)
    xt, yt = as_float(x, names[0]), as_float(y, names[1])  # type checks, numbers -> tensors
    dtype = torch.result_type(
        x if isinstance(x, Tensor) else xt, y if isinstance(y, Tensor) else yt
    )
    if dtype not in FLOAT_DTYPES:
        dtype = torch.get_default_dtype()
    if xt.device != yt.device and xt.dim() and yt.dim():
        raise ValueError(f"{names[0]} is on {xt.device} but {names[1]} is on {yt.device}")
    device = xt.device if xt.dim() or not yt.dim() else yt.device
    return xt.to(device=device, dtype=dtype), yt.to(device=device, dtype=dtype)


def _workers() -> int:
    # torch's intra-op thread count, capped: every op holds the GIL for a few microseconds of
    # dispatch, so more than ~8 Python threads would queue on it
    return max(1, min(torch.get_num_threads(), 8))


def _chunked(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() > CHUNK


def _run_ranges(total: int, step: int, work: Callable[[int, int], None]) -> None:
    """Call ``work(start, stop)`` for consecutive ranges of ``step`` covering ``range(total)``.

    ``_workers()`` threads take the ranges from one shared queue, each the next one when it is
    done with its last: on a loaded machine a thread that gets less CPU time does fewer ranges
    instead of holding the others up (a fixed share per thread finishes only when the slowest
    thread does). Each range is small enough (at most ``CHUNK`` elements) that torch runs its
    ops serially inside the calling thread, so the threads never wait on each other: this stays
    fast on a loaded machine, where torch's own per-op parallelism stalls at every op's barrier.
    The result does not depend on which thread did which range.
    """
    workers = min(_workers(), -(-total // step))
    starts = iter(range(0, total, step))  # next() on it is atomic (one C call under the GIL)

    def lane() -> None:
        with torch.no_grad():  # grad mode is thread-local: worker threads start with it on
            for start in starts:
                work(start, min(start + step, total))

    run_parallel([lane] * workers)


class Workspace:
    """Reusable float64 (and bool) buffers for one thread's chunks.

    Kernels write their temporaries into ``ws.f(i)`` / ``ws.b(i)`` with ``out=`` arguments
    instead of allocating: a fresh 256 KiB tensor per op is served by ``mmap`` and costs its
    page faults on every chunk (glibc hands such blocks back to the OS when freed), which made
    the allocation, not the arithmetic, the larger part of a cheap op. Buffers hold ``capacity``
    elements; ``resize(n)`` makes ``f``/``b`` return the first ``n`` (the last, shorter chunk).
    """

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.device = device
        self.n = capacity
        self._f: list[Tensor] = []
        self._b: list[Tensor] = []

    def resize(self, n: int) -> None:
        self.n = n

    def f(self, i: int) -> Tensor:
        while len(self._f) <= i:
            self._f.append(torch.empty(self.capacity, dtype=WIDE, device=self.device))
        # (a slice is a torch op of its own: skip it for the full-size chunks)
        return self._f[i] if self.n == self.capacity else self._f[i][: self.n]

    def b(self, i: int) -> Tensor:
        while len(self._b) <= i:
            self._b.append(torch.empty(self.capacity, dtype=torch.bool, device=self.device))
        return self._b[i] if self.n == self.capacity else self._b[i][: self.n]


def map_elementwise(kernel: Kernel, inputs: Sequence[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``kernel(ws, *wide_inputs)`` rounded to ``out_dtype``, without autograd.

    The kernel gets a :class:`Workspace` and float64 copies of the inputs in its buffers
    ``f(0), f(1), ...`` (flat, so it may overwrite them; it uses ``f(len(inputs))`` and up for
    temporaries) and returns a flat float64 tensor. Inputs broadcast against each other. On
    CPU, contiguous same-shape inputs larger than one chunk are processed ``CHUNK`` elements at
    a time by a few threads, each with its own workspace (see the module docstring); otherwise
    the kernel runs once on whole-size buffers. Cost: one read of each input, one write of the
    output, float64 buffers of ``CHUNK`` elements per thread (of the whole size when not
    chunked). No device synchronisation.
    """
    return _map_flat(partial(_copy_result, kernel), inputs, out_dtype, 0)[0]


def _copy_result(kernel: Kernel, ws: Workspace, out: Tensor, stats: Tensor, *wide: Tensor) -> None:
    out.copy_(kernel(ws, *wide))


def map_elementwise_stats(
    kernel: Callable[..., None], inputs: Sequence[Tensor], out_dtype: torch.dtype, segment: int
) -> tuple[Tensor, Tensor]:
    """:func:`map_elementwise` for a kernel that writes its result itself, together with one
    float64 statistic per ``segment`` consecutive (flat) elements, e.g. each one's minimum.

    ``kernel(ws, out, stats, *wide)`` writes its range's result into ``out`` (flat, of
    ``out_dtype``: the last op can round straight into it) and ``ceil(n / segment)`` statistics
    for its ``n`` elements into ``stats`` (the last segment may be short); ``CHUNK`` must be a
    multiple of ``segment``. Returns the output and the statistics of all segments, which the
    caller checks once per call rather than the kernel once per chunk: a rare fix-up then costs
    no op per chunk beyond the reduction that computes the statistic.
    """
    if segment <= 0 or CHUNK % segment:
        raise ValueError(f"segment must be a positive divisor of CHUNK={CHUNK}, got {segment}")
    return _map_flat(kernel, inputs, out_dtype, segment)


def _map_flat(
    kernel: Callable[..., None], inputs: Sequence[Tensor], out_dtype: torch.dtype, segment: int
) -> tuple[Tensor, Tensor]:
    shape = torch.broadcast_shapes(*(t.shape for t in inputs))
    device = inputs[0].device
    with torch.no_grad():
        out = torch.empty(shape, dtype=out_dtype, device=device)
        flat_out = out.view(-1)
        total = flat_out.numel()
        stats = torch.empty(-(-total // segment) if segment else 0, dtype=WIDE, device=device)
        same = all(t.shape == shape and t.is_contiguous() for t in inputs)
        if not (same and _chunked(inputs[0])):
            ws = Workspace(max(total, 1), device)
            ws.resize(total)
            wide = [
                ws.f(i).view(shape).copy_(t.expand(shape)).view(-1) for i, t in enumerate(inputs)
            ]
            kernel(ws, flat_out, stats, *wide)
            return out, stats
        flats = [t.view(-1) for t in inputs]
        spaces = threading.local()

        def work(start: int, stop: int) -> None:
            ws = getattr(spaces, "ws", None)
            if ws is None:
                ws = spaces.ws = Workspace(CHUNK, device)
            ws.resize(stop - start)
            wide = [ws.f(i).copy_(f[start:stop]) for i, f in enumerate(flats)]
            part = stats[start // segment : -(-stop // segment)] if segment else stats
            kernel(ws, flat_out[start:stop], part, *wide)

        _run_ranges(total, CHUNK, work)
        return out, stats


def rows_view(x: Tensor, dim: int) -> tuple[Tensor, list[int]]:
    """``x`` with ``dim`` moved last and flattened to 2-D ``(rows, n)``; also the moved shape."""
    moved = x.movedim(dim, -1)
    moved_shape = list(moved.shape)
    n = moved_shape[-1] if moved_shape else 1
    return moved.reshape(-1, n), moved_shape


def map_rows(kernel: Kernel, x2d: Tensor, out_cols: int, out_dtype: torch.dtype) -> Tensor:
    """Apply a row-wise ``kernel(ws, block)`` (float64 ``(r, n)`` -> ``(r, out_cols)``).

    ``block`` is a float64 copy of the rows in the workspace buffer ``f(0)`` (the kernel may
    overwrite it). Rows are processed in blocks of about ``CHUNK`` elements on CPU (at least one
    row per block) by a few threads with their own workspaces; cost as for
    :func:`map_elementwise`.
    """
    return map_rows_multi(partial(_copy_rows, kernel), x2d, ((out_cols, out_dtype),))[0]


def _copy_rows(kernel: Kernel, ws: Workspace, block: Tensor, dst: Tensor) -> None:
    dst.copy_(kernel(ws, block))


def map_rows_multi(
    kernel: Callable[..., None], x2d: Tensor, outs: Sequence[tuple[int, torch.dtype]]
) -> tuple[Tensor, ...]:
    """:func:`map_rows` for a kernel that writes several per-row results itself.

    ``kernel(ws, block, *dsts)`` writes, for each entry ``(cols, dtype)`` of ``outs``, its
    block's rows of that result into the ``(r, cols)`` tensor ``dsts[i]`` (with ``out=``
    arguments: no copy, and no extra op that the thread would release and retake the GIL for).
    A kernel can so hand back a per-row statistic (a maximum, a sum) next to, or instead of, its
    output, which the caller checks for all rows at once rather than per block.
    """
    rows, n = x2d.shape
    device = x2d.device
    with torch.no_grad():
        results = tuple(torch.empty((rows, c), dtype=dt, device=device) for c, dt in outs)
        if not _chunked(x2d) or rows == 1:
            ws = Workspace(max(x2d.numel(), 1), device)
            ws.resize(x2d.numel())
            kernel(ws, ws.f(0).view(rows, n).copy_(x2d), *results)
            return results
        step = max(1, CHUNK // max(n, 1))
        spaces = threading.local()

        def work(start: int, stop: int) -> None:
            ws = getattr(spaces, "ws", None)
            if ws is None:
                ws = spaces.ws = Workspace(step * n, device)
            ws.resize((stop - start) * n)
            block = ws.f(0).view(stop - start, n).copy_(x2d[start:stop])
            kernel(ws, block, *(r[start:stop] for r in results))

        _run_ranges(rows, step, work)
        return results


def check_dim(dim: int, ndim: int) -> int:
    """Normalise a dimension index, raising ``ValueError`` (naming the valid range) if bad."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    lo, hi = -max(ndim, 1), max(ndim, 1) - 1
    if not lo <= dim <= hi:
        raise ValueError(f"dim={dim} is out of range for a {ndim}-d tensor (valid: {lo}..{hi})")
    return dim % max(ndim, 1)


LN2 = math.log(2.0)
