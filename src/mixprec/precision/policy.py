"""Precision policies: which format parameters, computations, outputs and gradients use.

Two frozen configs live here, independent of how a policy is executed (that is
:mod:`mixprec.precision.region`):

* :class:`Policy` - the four formats (``params``, ``compute``, ``output``, ``grads``) with
  jmp's string grammar: ``Policy.from_string("params=float32,compute=bfloat16,output=float32")``
  (short keys ``p``/``c``/``o``/``g``, any format alias), and ``str(policy)`` round-trips.
* :class:`OpLists` - the op categories ``low`` / ``fp32`` / ``follow`` as plain sets of op names,
  with the reason for every default (:data:`REASONS`).

Format names are everything :func:`mixprec.formats.get_format` accepts plus the OCP MX block
formats of :func:`mixprec.formats.get_mx_format` (``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp6_e3m2``,
``mxfp6_e2m3``, ``mxfp4_e2m1`` and the short ``mxfp8``, ``mxfp6``, ``mxfp4``);
:func:`resolve_format` turns either kind into a :class:`FormatSpec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mixprec.formats.float_format import FloatFormat, format_names, get_format
from mixprec.formats.mx_format import (
    MXFormat,
    check_scale_rounding,
    get_element_or_mx_format,
    mx_format_names,
)
from mixprec.precision._tracing import trace_cache

if TYPE_CHECKING:
    import torch


# ----------------------------------------------------------------------------------------------
# formats (element formats and MX block formats)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatSpec:
    """A resolved policy format: an element format, optionally block-scaled (MX).

    Attributes:
        name: canonical name (``"bfloat16"``, ``"float8_e4m3fn"``, ``"e6m9"``, ``"mxfp4_e2m1"``).
        element: the element :class:`~mixprec.formats.FloatFormat`.
        block_size: MX block size (32) or ``None`` for a plain element-wise format.
        scale_rounding: how MX blocks choose their shared exponent (``"floor"``, ``"rceil"``,
            ``"ceil"``, ``"even"``: see :func:`mixprec.mx_quantize`); unused by element formats.
    """

    name: str
    element: FloatFormat
    block_size: int | None = None
    scale_rounding: str = "floor"

    @property
    def is_mx(self) -> bool:
        return self.block_size is not None

    @property
    def is_float32(self) -> bool:
        """True for float32 itself: rounding to it is the identity on float32 tensors."""
        return not self.is_mx and self.element.name == "float32"

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype that holds this format natively (never for MX formats)."""
        return None if self.is_mx else self.element.torch_dtype

    @property
    def operand_only(self) -> bool:
        """True for formats hardware only *reads* as GEMM operands and never writes results in.

        tf32, formats of 8 bits or fewer (fp8/fp6/fp4) and MX formats: tensor cores read them
        and accumulate/write in fp32 (or a 16-bit activation format). Results of low ops are
        therefore not rounded to them; results of 16-bit compute formats (bf16, fp16, ``e6m9``)
        are, as torch.autocast does.
        """
        return self.is_mx or self.element.bits <= 8 or self.element.name == "tfloat32"

    def __str__(self) -> str:
        return self.name


def policy_format_names() -> list[str]:
    """Every format name a :class:`Policy` accepts (canonical, aliases, MX), ``eXmY`` aside."""
    return [*format_names(), *mx_format_names()]


@trace_cache(maxsize=256)
def _resolve_name(name: str) -> FormatSpec:
    fmt = get_element_or_mx_format(name)
    if isinstance(fmt, MXFormat):
        return FormatSpec(fmt.name, fmt.element, fmt.block_size)
    return FormatSpec(fmt.name, fmt, None)


def resolve_format(fmt: str | FloatFormat | FormatSpec | torch.dtype) -> FormatSpec:
    """Resolve a format name, alias, ``eXmY``, MX name, FloatFormat or torch dtype.

    MX names and aliases (``"mxfp8"`` is ``mxfp8_e4m3``) come from the one registry in
    :mod:`mixprec.formats`. Raises a short ``ValueError`` naming the bad value with the closest
    valid names, ``TypeError`` for non-format objects.
    """
    if isinstance(fmt, FormatSpec):
        return fmt
    if isinstance(fmt, FloatFormat):
        return FormatSpec(fmt.name, fmt, None)
    if isinstance(fmt, str):
        return _resolve_name(fmt)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(fmt, torch.dtype):
        f = get_format(fmt)
        return FormatSpec(f.name, f, None)
    raise TypeError(
        f"expected a format name, FloatFormat, FormatSpec or torch.dtype, got "
        f"{type(fmt).__name__}: {fmt!r}"
    )


# ----------------------------------------------------------------------------------------------
# Policy
# ----------------------------------------------------------------------------------------------

_KEYS: dict[str, str] = {
    "params": "params", "p": "params", "param": "params",
    "compute": "compute", "c": "compute",
    "output": "output", "o": "output", "out": "output",
    "grads": "grads", "g": "grads", "grad": "grads",
    "scale_rounding": "scale_rounding",
}  # fmt: skip
_VALID_KEYS_TEXT = "params (p), compute (c), output (o), grads (g), scale_rounding"
_FORMAT_FIELDS = ("params", "compute", "output", "grads")


@dataclass(frozen=True)
class Policy:
    """Which format each kind of tensor uses (jmp-style mixed-precision policy).

    Attributes (canonical format names after construction; any alias, ``eXmY``, MX name,
    :class:`~mixprec.formats.FloatFormat` or ``torch.dtype`` is accepted):
        params: format parameters are *read* in inside a policy region (every ``nn.Parameter``
            argument of an op is rounded/cast to it; the stored parameter is untouched).
        compute: operand format of the low-precision ops (matmul, linear, conv, attention).
        output: format the outputs of a module wrapped by :func:`mixprec.apply_policy` are
            cast to (``autocast()`` alone does not touch a region's outputs).
        grads: operand format of incoming gradients in the backward GEMMs of low ops (e.g.
            ``float8_e5m2`` for fp8 HYBRID); ``None`` means "same as compute".
        scale_rounding: how the MX formats of the policy choose a block's shared exponent:
            ``"floor"`` (OCP MX v1.0), ``"rceil"`` (NVIDIA's MXFP8 recipe), ``"ceil"`` or
            ``"even"`` (see :func:`mixprec.mx_quantize`). Anything but ``"floor"`` needs an MX
            format in the policy (``ValueError`` otherwise: it would change nothing).

    ``str(policy)`` gives ``"params=float32,compute=bfloat16,output=float32"`` (plus
    ``",grads=..."`` and ``",scale_rounding=..."`` when set) and :meth:`from_string` parses
    it back.
    """

    params: str = "float32"
    compute: str = "float32"
    output: str = "float32"
    grads: str | None = None
    scale_rounding: str = "floor"

    def __post_init__(self) -> None:
        for name in _FORMAT_FIELDS:
            value = getattr(self, name)
            if value is None and name == "grads":
                continue
            try:
                spec = resolve_format(value)
            except (ValueError, TypeError) as err:
                raise type(err)(f"Policy.{name}: {err}") from None
            object.__setattr__(self, name, spec.name)
        try:
            check_scale_rounding(self.scale_rounding)
        except (ValueError, TypeError) as err:
            raise type(err)(f"Policy.{err}") from None
        if self.scale_rounding != "floor" and not self._has_mx():
            raise ValueError(
                f"Policy.scale_rounding={self.scale_rounding!r} applies to MX formats only, and "
                f"the policy {self} has none (use an MX format such as 'mxfp8')"
            )

    def _has_mx(self) -> bool:
        names = (self.params, self.compute, self.output, self.grads)
        return any(n is not None and _resolve_name(n).is_mx for n in names)

    # -- resolved formats -------------------------------------------------------------------
    def _spec(self, name: str) -> FormatSpec:
        spec = _resolve_name(name)
        if spec.is_mx and self.scale_rounding != spec.scale_rounding:
            return dataclasses.replace(spec, scale_rounding=self.scale_rounding)
        return spec

    @property
    def params_format(self) -> FormatSpec:
        return self._spec(self.params)

    @property
    def compute_format(self) -> FormatSpec:
        return self._spec(self.compute)

    @property
    def output_format(self) -> FormatSpec:
        return self._spec(self.output)

    @property
    def grads_format(self) -> FormatSpec:
        """The gradient operand format (``compute`` when ``grads`` is None)."""
        return self._spec(self.grads if self.grads is not None else self.compute)

    def replace(self, **changes: object) -> Policy:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    # -- string grammar ---------------------------------------------------------------------
    def __str__(self) -> str:
        s = f"params={self.params},compute={self.compute},output={self.output}"
        if self.grads is not None:
            s += f",grads={self.grads}"
        if self.scale_rounding != "floor":
            s += f",scale_rounding={self.scale_rounding}"
        return s

    @classmethod
    def from_string(cls, text: str) -> Policy:
        """Parse ``"params=float32,compute=bfloat16,output=float32"`` (jmp's grammar).

        Comma-separated ``key=value`` tokens; keys ``params``/``p``, ``compute``/``c``,
        ``output``/``o``, ``grads``/``g`` (each at most once, any order, whitespace ignored);
        values are any format name or alias (``scale_rounding``: one of its rules). Missing keys
        take the defaults (float32, grads unset, floor). Raises ``ValueError`` naming the bad
        token and the valid keys / formats.
        """
        if not isinstance(text, str):
            raise TypeError(f"policy string must be a str, got {type(text).__name__}: {text!r}")
        if not text.strip():
            raise ValueError(
                f"empty policy string; expected comma-separated key=value tokens with keys "
                f"{_VALID_KEYS_TEXT}, e.g. 'params=float32,compute=bfloat16,output=float32'"
            )
        fields: dict[str, str] = {}
        for token in text.split(","):
            token_s = token.strip()
            key, sep, value = token_s.partition("=")
            if not sep:
                raise ValueError(
                    f"policy string {text!r}: token {token_s!r} is not key=value; valid keys "
                    f"are {_VALID_KEYS_TEXT}"
                )
            key = key.strip().lower()
            value = value.strip()
            if key not in _KEYS:
                raise ValueError(
                    f"policy string {text!r}: unknown key {key!r} in token {token_s!r}; valid "
                    f"keys are {_VALID_KEYS_TEXT}"
                )
            field_name = _KEYS[key]
            if field_name in fields:
                raise ValueError(
                    f"policy string {text!r}: key {field_name!r} given twice (token {token_s!r})"
                )
            try:
                fields[field_name] = _parse_value(field_name, value)
            except ValueError as err:
                raise ValueError(f"policy string {text!r}, token {token_s!r}: {err}") from None
        return cls(**fields)

    @classmethod
    def coerce(cls, value: Policy | str | FloatFormat | FormatSpec | torch.dtype) -> Policy:
        """A Policy from a Policy, a policy string, or a single format.

        A single format (``"bf16"``, ``torch.float16``, ``"mxfp4_e2m1"``) means
        ``Policy(compute=format)``: params and output stay float32.
        """
        if isinstance(value, Policy):
            return value
        if isinstance(value, str) and "=" in value:
            return cls.from_string(value)
        try:
            spec = resolve_format(value)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"expected a Policy, a policy string ('params=...,compute=...,output=...') or a "
                f"format, got {type(value).__name__}: {value!r}"
            ) from None
        return cls(compute=spec.name)


def _parse_value(field_name: str, value: str) -> str:
    if field_name == "scale_rounding":
        return check_scale_rounding(value)
    return _resolve_name(value).name


# ----------------------------------------------------------------------------------------------
# op categories
# ----------------------------------------------------------------------------------------------

Category = Literal["low", "fp32", "follow"]

#: Ops whose work is a dot product: they gain the most from low precision (tensor cores, 2-4x
#: fewer bytes) and lose the least, because hardware accumulates their products in fp32
#: (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.2; torch.amp's CUDA and CPU
#: "lower_precision_fp" lists).
DEFAULT_LOW: frozenset[str] = frozenset({
    "matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "addr", "mv",
    "chain_matmul", "linalg_multi_dot", "einsum",
    "linear", "bilinear",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "conv_tbc",
    "scaled_dot_product_attention", "multi_head_attention_forward",
})  # fmt: skip

#: Ops that need fp32: large reductions (the paper's sec. 3.2: "reductions ... should be carried
#: out in fp32"; sums of many low-precision terms lose their small addends), softmax/norm
#: statistics (mean and variance over a row), losses (a reduction plus log/exp), and point-wise
#: functions whose output range or sensitivity exceeds fp16's (exp, log, pow, ...: torch.amp's
#: CUDA "fp32" list). torch.amp's CPU list is shorter (softmax and layer_norm run in bf16 there);
#: :meth:`OpLists.torch_amp` reproduces it.
DEFAULT_FP32: frozenset[str] = frozenset({
    # reductions that accumulate
    "sum", "mean", "nansum", "nanmean", "prod", "cumsum", "cumprod", "logcumsumexp", "var",
    "std", "var_mean", "std_mean", "norm", "linalg_norm", "linalg_vector_norm", "renorm",
    "dist", "cdist", "pdist", "cosine_similarity", "logsumexp", "trace",
    # normalisation (mean/variance statistics) and softmax (exp plus a row sum)
    "softmax", "log_softmax", "softmin", "layer_norm", "group_norm", "batch_norm",
    "instance_norm", "rms_norm", "local_response_norm", "normalize",
    # losses: a reduction over the batch plus log/exp
    "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "kl_div", "binary_cross_entropy", "binary_cross_entropy_with_logits", "poisson_nll_loss",
    "gaussian_nll_loss", "cosine_embedding_loss", "hinge_embedding_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "multilabel_soft_margin_loss", "multi_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "triplet_margin_with_distance_loss", "ctc_loss",
    # point-wise functions with a wide output range or large relative error amplification
    "exp", "expm1", "exp2", "log", "log2", "log10", "log1p", "pow", "float_power",
    "reciprocal", "rsqrt", "sinh", "cosh", "tan", "acos", "asin", "erfinv", "softplus",
})  # fmt: skip

#: Ops that keep their inputs' format (documentation of "everything else"): point-wise arithmetic
#: and activations, whose error is one rounding of the result, and data movement, which is
#: exact. Unlisted ops follow too. Where inputs mix formats the widest wins (torch promotion).
DEFAULT_FOLLOW: frozenset[str] = frozenset({
    "add", "sub", "mul", "div", "neg", "abs", "relu", "relu6", "leaky_relu", "gelu", "silu",
    "mish", "elu", "selu", "celu", "hardtanh", "hardswish", "hardsigmoid", "tanh", "sigmoid",
    "dropout", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
    "adaptive_avg_pool2d", "interpolate", "pad", "embedding", "where", "clamp", "maximum",
    "minimum", "cat", "stack", "view", "reshape", "permute", "transpose", "flatten", "squeeze",
    "unsqueeze", "expand", "contiguous", "clone", "split", "chunk", "__getitem__",
})  # fmt: skip

#: Why each default category holds what it holds (printed by :meth:`OpLists.explain`).
REASONS: dict[str, str] = {
    "low": (
        "dot-product op: hardware reads low-precision operands and accumulates in fp32, so "
        "rounding the operands costs one rounding per operand (mixed-precision paper sec. 3.2; "
        "torch.amp lower_precision_fp lists)"
    ),
    "fp32": (
        "accumulating or range-sensitive op (reduction, softmax, norm statistics, loss, "
        "exp/log/pow): run in fp32 (mixed-precision paper sec. 3.2; torch.amp CUDA fp32 list)"
    ),
    "follow": (
        "point-wise or data-movement op: keeps its inputs' format (widest input wins), one "
        "rounding of the result at most"
    ),
}

# torch.autocast's lists (torch/csrc/autograd/autocast_mode.cpp / aten/src/ATen/autocast_mode.cpp,
# torch 2.x), restricted to names a TorchFunctionMode can see.
_TORCH_CUDA_LOW = frozenset({
    "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
    "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "scaled_dot_product_attention",
})  # fmt: skip
_TORCH_CUDA_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "group_norm",
    "norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
    "logsumexp", "softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum",
    "cross_entropy", "rms_norm",
})  # fmt: skip
_TORCH_CPU_LOW = frozenset({
    "conv1d", "conv2d", "conv3d", "bmm", "mm", "linalg_vecdot", "baddbmm", "addmm", "addbmm",
    "linear", "matmul", "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "prelu", "scaled_dot_product_attention",
})  # fmt: skip
_TORCH_CPU_FP32 = frozenset({
    "avg_pool3d", "binary_cross_entropy", "grid_sampler", "polar", "prod", "quantile",
    "nanquantile", "stft", "cdist", "trace", "view_as_complex", "cholesky", "cholesky_inverse",
    "cholesky_solve", "inverse", "lu_solve", "orgqr", "ormqr", "pinverse", "max_pool3d",
    "max_unpool2d", "max_unpool3d", "adaptive_avg_pool3d", "reflection_pad1d",
    "reflection_pad2d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
    "mse_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss",
    "poisson_nll_loss", "smooth_l1_loss", "cross_entropy", "cross_entropy_loss", "l1_loss",
    "huber_loss", "margin_ranking_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "ctc_loss", "kl_div", "multilabel_margin_loss",
    "binary_cross_entropy_with_logits", "fft_fft", "fft_ifft", "fft_fft2", "fft_ifft2",
    "fft_fftn", "fft_ifftn", "fft_rfft", "fft_irfft", "fft_rfft2", "fft_irfft2", "fft_rfftn",
    "fft_irfftn", "fft_hfft", "fft_ihfft", "linalg_cond", "linalg_matrix_rank", "linalg_solve",
    "linalg_cholesky", "linalg_svdvals", "linalg_eigvals", "linalg_eigvalsh", "linalg_inv",
    "linalg_householder_product", "linalg_tensorinv", "linalg_tensorsolve",
    "fake_quantize_per_tensor_affine", "geqrf", "linalg_lu_solve", "linalg_qr", "linalg_svd",
    "linalg_eig", "linalg_eigh", "linalg_lstsq", "linalg_inv_ex",
})  # fmt: skip

#: Names torch.autocast casts to the low dtype on any device (the native executor switches
#: torch.autocast off around these where the active OpLists does not call them low).
TORCH_AUTOCAST_LOW: frozenset[str] = _TORCH_CUDA_LOW | _TORCH_CPU_LOW


def _op_name(op: str | Callable[..., object]) -> str:
    if isinstance(op, str):
        name = op.strip()
        if not name:
            raise ValueError("op names must be non-empty strings")
        return name
    name = getattr(op, "__name__", None)
    if not isinstance(name, str):
        raise TypeError(
            f"an op is given by its name (str) or a function with a __name__, got "
            f"{type(op).__name__}: {op!r}"
        )
    return name


def _names(ops: Iterable[str | Callable[..., object]], what: str) -> frozenset[str]:
    if isinstance(ops, str):
        raise TypeError(f"OpLists.{what} must be a collection of op names, not the string {ops!r}")
    return frozenset(_op_name(o) for o in ops)


@dataclass(frozen=True)
class OpLists:
    """Op categories as data: ``low``, ``fp32`` and ``follow`` sets of op names.

    Names are the ``__name__`` a ``TorchFunctionMode`` sees: ``torch.nn.functional`` and
    ``torch`` function names and Tensor method names (``"linear"``, ``"conv2d"``, ``"matmul"``
    (also ``@``), ``"softmax"``, ``"layer_norm"``, ``"sum"``, ...). An op in no set follows its
    inputs. The sets must be disjoint. Defaults: :data:`DEFAULT_LOW`, :data:`DEFAULT_FP32`,
    :data:`DEFAULT_FOLLOW`, reasons in :data:`REASONS`.

    Derive variants with :meth:`with_low`, :meth:`with_fp32`, :meth:`with_follow` (move names
    into that category) and :meth:`without` (drop names from every list: they then follow).
    """

    low: frozenset[str] = DEFAULT_LOW
    fp32: frozenset[str] = DEFAULT_FP32
    follow: frozenset[str] = DEFAULT_FOLLOW

    def __post_init__(self) -> None:
        for what in ("low", "fp32", "follow"):
            object.__setattr__(self, what, _names(getattr(self, what), what))
        for a, b in (("low", "fp32"), ("low", "follow"), ("fp32", "follow")):
            both = getattr(self, a) & getattr(self, b)
            if both:
                raise ValueError(
                    f"OpLists: {sorted(both)} are in both {a!r} and {b!r}; an op has one "
                    "category (use with_low/with_fp32/with_follow to move it)"
                )

    @classmethod
    def default(cls) -> OpLists:
        """The documented defaults (mixed-precision paper categories, torch.amp CUDA lists)."""
        return cls()

    @classmethod
    def torch_amp(cls, device_type: str = "cpu") -> OpLists:
        """torch.autocast's own lists for ``"cpu"`` or ``"cuda"`` (as far as visible by name).

        Useful to compare emulation against ``torch.autocast`` op for op: on CPU, softmax and
        layer_norm then follow their inputs (bf16) instead of running in fp32.
        """
        if device_type == "cpu":
            return cls(low=_TORCH_CPU_LOW, fp32=_TORCH_CPU_FP32, follow=frozenset())
        if device_type == "cuda":
            return cls(low=_TORCH_CUDA_LOW, fp32=_TORCH_CUDA_FP32, follow=frozenset())
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")

    def _moved(self, target: str | None, ops: tuple[str | Callable[..., object], ...]) -> OpLists:
        names = frozenset(_op_name(o) for o in ops)
        sets = {k: getattr(self, k) - names for k in ("low", "fp32", "follow")}
        if target is not None:
            sets[target] = sets[target] | names
        return OpLists(**sets)

    def with_low(self, *ops: str | Callable[..., object]) -> OpLists:
        """A copy where ``ops`` run in the compute format (removed from the other lists)."""
        return self._moved("low", ops)

    def with_fp32(self, *ops: str | Callable[..., object]) -> OpLists:
        """A copy where ``ops`` run in fp32 (removed from the other lists)."""
        return self._moved("fp32", ops)

    def with_follow(self, *ops: str | Callable[..., object]) -> OpLists:
        """A copy where ``ops`` follow their inputs' format (removed from the other lists)."""
        return self._moved("follow", ops)

    def without(self, *ops: str | Callable[..., object]) -> OpLists:
        """A copy with ``ops`` removed from every list (unlisted ops follow their inputs)."""
        return self._moved(None, ops)

    def category(self, op: str | Callable[..., object]) -> Category:
        """``"low"``, ``"fp32"`` or ``"follow"`` for an op name or function.

        In-place Tensor methods (``add_``) are looked up without the trailing underscore but
        always keep their tensor's format (an in-place op cannot change a dtype).
        """
        name = _op_name(op)
        if name in self.low:
            return "low"
        if name in self.fp32:
            return "fp32"
        return "follow"

    def explain(self, op: str | Callable[..., object]) -> str:
        """One line: the op's category and the reason for the default category."""
        cat = self.category(op)
        return f"{_op_name(op)}: {cat} - {REASONS[cat]}"
