"""Native execution of a precision policy: ``torch.autocast`` plus the policy's own op lists.

``torch.autocast`` does the low-precision casts of its own list in C++ (fast, with a cast cache
for parameters). A thin ``TorchFunctionMode`` handler (this executor, driven by
:mod:`mixprec.precision.region`) makes the result follow :class:`~mixprec.precision.OpLists`
instead of torch's built-in lists:

* ``low`` ops: floating arguments are cast to the compute dtype (``.to``, differentiable) - this
  covers ops torch.autocast does not list (e.g. ``einsum`` on CPU);
* ``fp32`` ops: low-dtype arguments are cast to float32 and the op runs with torch.autocast
  switched off (torch's CPU list, for one, leaves softmax and layer_norm in bf16);
* inside a block of the region where code switched torch.autocast off (``torch.autocast(
  device, enabled=False)``: HF's "force float32" blocks), every op runs as written;
* other ops: unchanged, except ops torch.autocast would cast to low precision although the
  policy does not call them low (the user moved them): those run with torch.autocast off, and
  the ops of :data:`PROMOTE`, which demand one dtype of their floating operands: where those
  mix (a low op's low result meets float32: spectral_norm's ``vdot(u, mv(W, v))``), they are
  cast to the widest, as type promotion and emulation's "widest input wins" would have it.

Also here: :func:`cpu_has_fast_bf16` / :func:`native_is_fast`, the rule ``emulate=None`` uses.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

from mixprec.formats.float_format import FloatFormat
from mixprec.machine import cpu_flags
from mixprec.precision.accumulate import Accumulate
from mixprec.precision.fp8 import Fp8Recipe
from mixprec.precision.ops import op_category
from mixprec.precision.policy import (
    TORCH_AUTOCAST_LOW,
    FormatSpec,
    OpLists,
    Policy,
    resolve_format,
)
from mixprec.trees import iter_tensors, map_args

_LOW_DTYPES = (torch.float16, torch.bfloat16)
#: Follow ops whose kernels refuse floating operands of different dtypes instead of promoting
#: them (torch.autocast's "promote" lists, CUDA and CPU, and the like). In a native region a
#: low op's result is low while other tensors stay float32, so these would fail where the same
#: code runs under emulation (float32 containers throughout); the region promotes their
#: operands to the widest dtype among them first (exact: a widening cast).
PROMOTE: frozenset[str] = frozenset({
    "dot", "vdot", "inner", "cross", "linalg_cross", "tensordot", "linalg_vecdot", "lerp",
    "index_put", "index_add", "index_copy", "scatter", "scatter_add", "scatter_reduce",
    "masked_scatter", "grid_sample", "prelu", "polar", "complex",
})  # fmt: skip
_NATIVE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 dot-product units (AVX512-BF16 or AMX-BF16).

    ``torch.backends.cpu.get_cpu_capability()`` names only the vector ISA torch's own kernels
    use ("AVX512" on an AVX512-BF16 machine, "AMX" where torch detects AMX); oneDNN, which runs
    torch.autocast's bf16 matmuls and convolutions on CPU, uses avx512_bf16/amx_bf16 whenever
    the CPU has them, so the flags are read too.
    """
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in cap or "BF16" in cap:
        return True
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _dtype_of(fmt: FloatFormat | FormatSpec | torch.dtype | str | None) -> torch.dtype | None:
    if fmt is None or isinstance(fmt, torch.dtype):
        return fmt
    if isinstance(fmt, FloatFormat):
        return fmt.torch_dtype
    return resolve_format(fmt).torch_dtype  # names and FormatSpecs (MX formats: None)


def native_is_fast(
    fmt: FloatFormat | FormatSpec | torch.dtype | str | None, device_type: str
) -> bool:
    """Whether torch runs ``fmt`` natively at least as fast as fp32 emulation on ``device_type``.

    ``fmt`` is a format (name, :class:`~mixprec.formats.FloatFormat`, FormatSpec) or a torch
    dtype. float32 and float64 are trivially native (nothing narrower to emulate). CUDA: fp16
    always, bf16 where ``torch.cuda.is_bf16_supported()``. CPU: bf16 only with AVX512-BF16/AMX;
    fp16 never (no AVX512-FP16/AMX-FP16 kernels are used; torch.autocast fp16 on CPU is tens of
    times slower than fp32 here). Every other format (fp8, MX, customs; None) is False.
    """
    dtype = _dtype_of(fmt)
    if dtype in (torch.float32, torch.float64):
        return True
    if dtype not in _LOW_DTYPES:
        return False
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return dtype == torch.bfloat16 and cpu_has_fast_bf16()
    return False


def native_unsupported_reason(
    policy: Policy, *, accumulate: Accumulate | None, recipe: Fp8Recipe | None
) -> str | None:
    """Why ``policy`` cannot run natively (None if it can)."""
    if accumulate is not None:
        return "accumulate= is emulated only (hardware accumulators are fixed)"
    # the format first: an fp8 compute format brings its default recipe, and the format is the
    # cause to name
    c = policy.compute_format
    if c.torch_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"compute format {c.name} is not a dtype torch.autocast runs (bfloat16, float16)"
    if recipe is not None:
        return "fp8 scaling recipes are emulated only (no fp8 GEMMs through torch.autocast)"
    for what in ("params", "output"):
        spec = getattr(policy, f"{what}_format")
        if spec.torch_dtype not in _NATIVE_DTYPES:
            return f"{what} format {spec.name} has no torch dtype"
    if policy.grads is not None and policy.grads != policy.compute:
        return (
            "a grads format other than compute needs emulation (native backward GEMMs read "
            "the forward dtype)"
        )
    return None


class NativeExecutor:
    """torch.autocast with the policy's op lists (see the module docstring).

    Cost: one Python call per torch function call inside the region (a few microseconds), plus
    torch.autocast's own casts.
    """

    emulated = False

    def __init__(self, policy: Policy, op_lists: OpLists, *, device_type: str, scope: str) -> None:
        self.policy = policy
        self.op_lists = op_lists
        self.device_type = device_type
        self.scope = scope
        self.dtype: torch.dtype = policy.compute_format.torch_dtype  # type: ignore[assignment]
        pd = policy.params_format.torch_dtype
        self.params_dtype = None if pd == torch.float32 else pd
        self._stack = contextlib.ExitStack()

    # context of the region: torch.autocast on (low dtype) or off (fp32 compute)
    def enter(self) -> None:
        if self.dtype in _LOW_DTYPES:
            self._stack.enter_context(torch.autocast(self.device_type, dtype=self.dtype))
        else:
            self._stack.enter_context(_autocast_off(self.device_type))

    def exit(self) -> None:
        self._stack.close()

    def _cast_low(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dtype != self.dtype:
            return t.to(self.dtype)
        return t

    @staticmethod
    def _cast_fp32(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.dtype in _LOW_DTYPES else t

    def _read_param(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.nn.Parameter) and t.is_floating_point():
            return t.to(self.params_dtype)
        return t

    def handle(self, func: Callable[..., Any], name: str, args: tuple, kwargs: dict) -> Any:
        if self.dtype in _LOW_DTYPES and not torch.is_autocast_enabled(self.device_type):
            # code inside the region switched torch.autocast off (``torch.autocast(device,
            # enabled=False)``: HF's "force float32" blocks, GPT-2's upcast attention, MoE
            # routers): ops run as written, as under plain torch.autocast
            return func(*args, **kwargs)
        if self.params_dtype is not None:
            args, kwargs = map_args(self._read_param, args, kwargs)
        # in-place ops ("inplace") keep their tensor's dtype: they run as they are, below
        cat = op_category(self.op_lists, name)
        if cat == "low":
            args, kwargs = map_args(self._cast_low, args, kwargs)
            if self.dtype in _LOW_DTYPES:
                return func(*args, **kwargs)
            with _autocast_off(self.device_type):
                return func(*args, **kwargs)
        if cat == "fp32":
            args, kwargs = map_args(self._cast_fp32, args, kwargs)
            with _autocast_off(self.device_type):
                return func(*args, **kwargs)
        if name in PROMOTE:
            args, kwargs = _promote(args, kwargs)
        if name in TORCH_AUTOCAST_LOW and self.dtype in _LOW_DTYPES:
            with _autocast_off(self.device_type):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _promote(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with floating tensors cast to the widest floating dtype among
    them (torch's promotion: bfloat16 with float16 gives float32). Unchanged where they agree."""
    dtypes = {t.dtype for t in iter_tensors(args, kwargs) if t.is_floating_point()}
    if len(dtypes) < 2:
        return args, kwargs
    wide = functools.reduce(torch.promote_types, dtypes)

    def widen(t: torch.Tensor) -> torch.Tensor:
        return t.to(wide) if t.is_floating_point() else t

    return map_args(widen, args, kwargs)


def cast_output(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A module output cast to the policy's output dtype (:func:`mixprec.apply_policy`, native)."""
    if t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device_type, enabled=False)
