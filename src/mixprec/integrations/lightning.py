"""A PyTorch Lightning precision plugin that trains with :func:`mixprec.initialize`.

::

    from pytorch_lightning import Trainer
    from mixprec.integrations.lightning import MixprecPrecision

    trainer = Trainer(plugins=[MixprecPrecision(opt_level="O2", compute="bfloat16")])

The plugin hooks mixprec's three lines into Lightning's loop, for any format, native or
emulated: when the strategy connects it (after ``configure_optimizers``) it calls
``mixprec.initialize(model, optimizers, ...)``; every backward runs inside
``mixprec.scale_loss`` (so ``on_after_backward``, gradient clipping and
``on_before_optimizer_step`` see unscaled gradients, on the float32 masters at O2); the
optimizer step is skipped after an overflow, which is logged (``mixprec/loss_scale`` and
``mixprec/skipped_steps`` through ``LightningModule.log``, and a line on the Python logger
``mixprec.integrations.lightning`` at INFO). ``training_step``/``validation_step``/... run inside
the opt level's op policy, so a step that calls submodules directly (``self.net(x)``) is covered
too. Checkpoints carry the loss scaler's state under the plugin's name, and the optimizer's
state carries the masters, scaler and skip record (``"mixprec_amp"``): resuming continues the
same scale and skip count.

When the run ends (``teardown``) everything is undone with :func:`mixprec.amp.deinitialize`: at
O2 the model gets the float32 master weights back. A validate/test/predict run (no optimizers)
evaluates the model in ``compute`` and gives it back with the weights it had.

This module imports ``pytorch_lightning``; ``import mixprec`` never does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.plugins.precision import Precision

import mixprec
from mixprec.amp import (
    AmpOptions,
    KeepFp32,
    LossScaleSpec,
    OptLevel,
    SkippedStep,
    deinitialize,
    get_config,
    get_scaler,
    last_step_skipped,
    level_policy,
    skipped_steps,
)
from mixprec.formats import FloatFormat
from mixprec.precision import Autocast

_log = logging.getLogger(__name__)


@dataclass
class _Connection:
    """What one ``connect`` set up; ``teardown`` undoes it."""

    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    region: Autocast | None  # the op policy around *_step (None at O0)
    saved_weights: dict[str, torch.Tensor] | None  # eval runs: the weights to give back


class MixprecPrecision(Precision):
    """Lightning precision plugin: mixed-precision training with :func:`mixprec.initialize`.

    Args:
        opt_level, compute, loss_scale, emulate, keep_fp32, min_loss_scale, max_loss_scale,
        on_skip, on_divergence: as :func:`mixprec.initialize` (``compute``: any mixprec format;
            ``emulate=None`` runs natively where the device has the format fast).
        log_metrics: log ``mixprec/loss_scale`` and ``mixprec/skipped_steps`` after every
            optimizer step with ``LightningModule.log``.

    One loss per backward (``num_losses=1``). Tested with single-device strategies; strategies
    that wrap the model before ``configure_optimizers`` (DDP, FSDP) are untested. Cost per step:
    ``scale_loss``'s (one fused pass over the new gradients, one device sync) and, at O2, one
    rounding copy of the masters into the model.
    """

    def __init__(
        self,
        opt_level: OptLevel = "O1",
        compute: str | FloatFormat | torch.dtype = "float16",
        loss_scale: LossScaleSpec = "dynamic",
        *,
        emulate: bool | None = None,
        keep_fp32: KeepFp32 | None = None,
        min_loss_scale: float | None = None,
        max_loss_scale: float | None = 2.0**24,
        on_skip: Callable[[SkippedStep], object] | None = None,
        on_divergence: Literal["raise", "warn", "ignore"] = "raise",
        log_metrics: bool = True,
    ) -> None:
        # initialize's own validation, now rather than when Lightning connects the plugin
        self.settings = AmpOptions(
            opt_level=opt_level, compute=compute, loss_scale=loss_scale, emulate=emulate,
            keep_fp32=keep_fp32, min_loss_scale=min_loss_scale, max_loss_scale=max_loss_scale,
            on_skip=on_skip, on_divergence=on_divergence,
        )  # fmt: skip
        if not isinstance(log_metrics, bool):
            raise TypeError(f"log_metrics must be True or False, got {log_metrics!r}")
        self.log_metrics = log_metrics
        self._connection: _Connection | None = None

    def __repr__(self) -> str:
        s = self.settings
        return f"MixprecPrecision(opt_level={s.opt_level!r}, compute={s.compute!r})"

    # -- set up and take down --------------------------------------------------------------

    def connect(
        self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], lr_schedulers: Any
    ) -> tuple[torch.nn.Module, list[torch.optim.Optimizer], Any]:
        """``mixprec.initialize`` the model and optimizers (in place; Lightning keeps them)."""
        self.teardown()  # a run that ended without teardown
        opts = list(optimizers)
        saved = None
        if not opts and self.settings.opt_level in ("O2", "O3"):
            # initialize rounds the weights in place; an evaluation gives them back (one copy)
            saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        kwargs = self.settings.initialize_kwargs()
        mixprec.initialize(model, opts or None, **kwargs)
        self._connection = _Connection(model, opts, _step_region(model), saved)
        return model, optimizers, lr_schedulers

    def teardown(self) -> None:
        """Undo ``connect``: :func:`mixprec.amp.deinitialize` (O2: the masters go back into the
        model), and after an evaluation the weights the model had before."""
        conn, self._connection = self._connection, None
        if conn is None:
            return
        try:
            get_config(conn.model)
        except RuntimeError:
            pass  # the user deinitialized it already
        else:
            deinitialize(conn.model)
        if conn.saved_weights is not None:
            with torch.no_grad():
                for name, p in conn.model.named_parameters():
                    p.copy_(conn.saved_weights[name])

    # -- the step ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """The opt level's op policy around ``training_step``, ``validation_step``, ..."""
        region = self._connection.region if self._connection is not None else None
        if region is None:
            yield
            return
        with region:
            yield

    def backward(  # type: ignore[override]
        self,
        tensor: torch.Tensor,
        model: pl.LightningModule,
        optimizer: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """``model.backward`` on the scaled loss inside ``mixprec.scale_loss``: on exit the
        gradients are unscaled (into the masters at O2) and checked for overflow."""
        optimizers = self._optimizers_for(optimizer)
        if not optimizers:
            super().backward(tensor, model, optimizer, *args, **kwargs)
            return
        delay = _in_no_sync(model)
        with mixprec.scale_loss(tensor, optimizers, delay_unscale=delay) as scaled:
            super().backward(scaled, model, optimizer, *args, **kwargs)

    def _optimizers_for(self, optimizer: Any) -> list[torch.optim.Optimizer]:
        """The optimizers a backward feeds: the given one, or all (manual optimization)."""
        if self._connection is None or not self._connection.optimizers:
            return []
        if optimizer is None:
            return list(self._connection.optimizers)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        return [optimizer]

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Any,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        """Run the closure (step and backward), the pre-step hooks and clipping, then
        ``optimizer.step()``, which mixprec skips after an overflow; log the outcome."""
        if self._connection is None or not self._connection.optimizers:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        closure_result = closure()
        self._after_closure(model, optimizer)  # hooks, then clipping of unscaled gradients
        if closure_result is None and model.automatic_optimization:
            return None  # training_step returned None: no backward, nothing to step
        out = optimizer.step(**kwargs)  # mixprec's closure-less step (backward already ran)
        self._record_step(model, optimizer)
        return out

    def _record_step(self, model: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        scale = get_scaler(optimizer).get_scale()
        skipped = skipped_steps(optimizer)
        if last_step_skipped(optimizer):
            _log.info(
                "mixprec: optimizer step skipped (gradients overflowed); loss scale now %g, "
                "skipped steps so far: %d",
                scale,
                skipped,
            )
        if self.log_metrics:
            to_logger = model.trainer.logger is not None
            for name, value in (("loss_scale", scale), ("skipped_steps", float(skipped))):
                model.log(
                    f"mixprec/{name}", value, on_step=True, on_epoch=False, logger=to_logger,
                    batch_size=1,
                )  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Saved by Lightning under ``"MixprecPrecision"``: the setup and the loss scaler's
        state (the masters travel in the optimizer's own state, ``"mixprec_amp"``)."""
        conn = self._connection
        if conn is None or not conn.optimizers:
            return {}
        cfg = get_config(conn.optimizers[0])
        return {
            "opt_level": cfg.opt_level,
            "compute": cfg.compute.name,
            "emulate": cfg.emulate,
            "scaler": get_scaler(conn.optimizers[0]).state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the loss scaler (an evaluation run, without optimizers, has none)."""
        conn = self._connection
        if conn is None or not conn.optimizers or "scaler" not in state_dict:
            return
        get_scaler(conn.optimizers[0]).load_state_dict(state_dict["scaler"])


def _step_region(model: torch.nn.Module) -> Autocast | None:
    """The policy ``initialize`` attached to the model's forward, as a region for a whole step
    (None at O0). Regions nest, so the model's own hooks inside it change nothing."""
    cfg = get_config(model)
    spec = level_policy(cfg.opt_level, cfg.policy_compute, cfg.emulate)
    if spec is None:
        return None
    policy, op_lists = spec
    return mixprec.autocast(
        policy, emulate=cfg.emulate, op_lists=op_lists, device_type=cfg.device_type
    )


def _in_no_sync(model: pl.LightningModule) -> bool | None:
    """Does this backward run inside DDP's ``no_sync()`` (Lightning runs every micro-batch of
    ``accumulate_grad_batches`` but the last there)? Then its gradients must stay scaled in
    ``.grad`` for the last backward's all-reduce (``scale_loss(delay_unscale=True)``). False
    where the strategy's model is DDP and syncs; None (undecided) under other strategies."""
    trainer = getattr(model, "_trainer", None)
    wrapped = getattr(getattr(trainer, "strategy", None), "model", None)
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return not wrapped.require_backward_grad_sync
    return None
