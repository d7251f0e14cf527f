"""What ``mixprec.initialize`` accepts and what it set up: the opt levels, the typed argument
aliases (:data:`LossScaleSpec`, :class:`KeepFp32`) and :class:`AmpConfig`.

Opt levels (the mixed-precision paper's recipe, apex's names):

* ``O0``: float32 everywhere (the baseline; the loss scaler still detects divergence).
* ``O1``: float32 weights; the op policy (:func:`mixprec.apply_policy`) runs the low-precision
  ops (matmul, linear, conv, attention) in ``compute`` and the fp32-list ops in float32.
* ``O2``: model weights stored in ``compute`` (norm layers kept float32), float32 *master*
  weights held by the optimizer and copied back (rounded) after each step; same op policy.
* ``O3``: everything in ``compute`` (weights, norm layers, all ops, optimizer state), no master
  weights: the paper's ablation that shows why master weights matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias

import torch

from mixprec.amp import opt_levels as _levels
from mixprec.amp.scaling import LossScaler
from mixprec.formats import FloatFormat

OptLevel = Literal["O0", "O1", "O2", "O3"]
OPT_LEVELS: tuple[OptLevel, ...] = ("O0", "O1", "O2", "O3")

#: ``loss_scale`` of :func:`mixprec.initialize`: ``"dynamic"`` (a DynamicLossScaler per loss),
#: a number > 0 (a StaticLossScaler), ``"none"``/None (a NoOpLossScaler: no scaling, no
#: checks), one mixprec scaler instance (``num_losses=1``) or a list of ``num_losses`` of them.
LossScaleSpec: TypeAlias = (
    Literal["dynamic", "none"] | float | LossScaler | Sequence[LossScaler] | None
)
LOSS_SCALE_CHOICES = (
    "'dynamic', 'none'/None, a finite number > 0, a mixprec loss scaler (NoOpLossScaler, "
    "StaticLossScaler, DynamicLossScaler) or a list of num_losses of them"
)

#: ``compute`` of :func:`mixprec.initialize`: a format name, a FloatFormat or a torch dtype.
ComputeSpec: TypeAlias = str | FloatFormat | torch.dtype

#: ``optimizer_state`` of :func:`mixprec.initialize`: where O3 keeps the optimizer's state
#: (moments etc.): ``"compute"`` (the paper's O3: rounded like the weights) or ``"float32"``
#: (emulated O3 only: the state is never rounded, so an ``eps`` below the format's range works).
OptimizerStateSpec = Literal["compute", "float32"]
OPTIMIZER_STATES: tuple[OptimizerStateSpec, ...] = ("compute", "float32")


class OptimizerPrecisionWarning(UserWarning):
    """An optimizer hyperparameter the update divides by (``eps``) that the compute format
    cannot represent while the optimizer state lives in that format (O3)."""


class KeepFp32(Protocol):
    """``keep_fp32`` of :func:`mixprec.initialize`: True for the modules whose parameters stay
    float32 (and that run under a float32 policy of their own); ``fqn`` is the qualified name."""

    def __call__(self, module: torch.nn.Module, fqn: str, /) -> bool: ...


@dataclass(frozen=True)
class AmpConfig:
    """What :func:`initialize` set up (read it back with :func:`get_config`).

    Attributes:
        opt_level: ``"O0"``..``"O3"``.
        compute: the compute format (float32 for O0).
        emulate: weights/ops emulated (float32 storage, rounded values) rather than native.
        master_weights: the optimizer holds float32 masters (O2).
        num_losses: number of loss scalers (``loss_id`` in ``0..num_losses-1``).
        optimizer_state: ``"compute"`` or ``"float32"``: where O3 keeps the optimizer state
            (other levels keep it in float32 anyway).
        mx_format: the MX format of the ops (O1 with ``compute="mxfp8"`` etc.); ``compute`` is
            then its element format. None otherwise.
        device_type: where the models' parameters live (``"cpu"``, ``"cuda"``, ...).
    """

    opt_level: OptLevel
    compute: FloatFormat
    emulate: bool
    master_weights: bool
    num_losses: int
    optimizer_state: OptimizerStateSpec = "compute"
    mx_format: str | None = None
    device_type: str = "cpu"

    @property
    def policy_compute(self) -> str:
        """The compute format as the op policy names it (the MX name where there is one)."""
        return self.mx_format or self.compute.name

    def __repr__(self) -> str:
        extra = "" if self.optimizer_state == "compute" else ", optimizer_state='float32'"
        return (
            f"AmpConfig(opt_level={self.opt_level!r}, compute={self.policy_compute!r}, "
            f"emulate={self.emulate}, master_weights={self.master_weights}, "
            f"num_losses={self.num_losses}{extra})"
        )

    @property
    def rounds_optimizer_state(self) -> bool:
        """O3 with the optimizer state in ``compute``."""
        return self.opt_level == "O3" and self.optimizer_state == "compute"

    @property
    def lowers_weights(self) -> bool:
        """The model's parameters are stored in ``compute`` (O2, O3)."""
        return self.opt_level in ("O2", "O3")

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype of lowered weights: the native dtype, or float32 when emulated."""
        if self.emulate or not self.lowers_weights:
            return torch.float32
        dt = _levels.native_dtype(self.compute)
        return dt if dt is not None else torch.float32


def is_norm(module: torch.nn.Module, fqn: str = "") -> bool:
    """Default ``keep_fp32`` of O2: batch/instance/layer/group/RMS norm layers."""
    norms: tuple[type, ...] = (
        torch.nn.modules.batchnorm._NormBase,
        torch.nn.LayerNorm,
        torch.nn.GroupNorm,
        torch.nn.LocalResponseNorm,
    )
    rms = getattr(torch.nn, "RMSNorm", None)
    if rms is not None:
        norms = (*norms, rms)
    return isinstance(module, norms)


def keep_nothing(module: torch.nn.Module, fqn: str) -> bool:
    """Default ``keep_fp32`` of O3: every parameter is lowered, norms too."""
    return False
