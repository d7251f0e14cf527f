"""O3 keeps the optimizer state in the compute format: check the optimizer's hyperparameters
against that format before training starts (``initialize`` calls :func:`check_divisors`).

An update that divides by a hyperparameter (``eps`` of Adam/AdamW/RMSprop/Adagrad/...) needs it
representable: AdamW's default ``eps=1e-8`` is 0 in float16, so where the second moment flushes
to zero the update divides by (almost) nothing and training blows up.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import torch

from mixprec.amp.config import AmpConfig, OptimizerPrecisionWarning
from mixprec.formats import FloatFormat
from mixprec.quantization import quantize

# hyperparameters an optimizer's update divides by (Adam*, Adagrad, RMSprop, Adadelta, NAdam,
# RAdam, Adamax: ``eps``; Adafactor: a tuple ``eps``)
_DIVISOR_KEYS = ("eps",)


def _floats(value: object) -> Iterator[float]:
    """The numbers in a hyperparameter (a float, or a tuple such as Adafactor's ``eps``)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            yield float(v)


def safe_divisor(fmt: FloatFormat) -> float:
    """The smallest power of ten at or above ``fmt``'s smallest normal number (1e-4 for
    float16): a divisor the format holds with full precision."""
    return 10.0 ** math.ceil(math.log10(fmt.min_normal))


def check_divisors(
    opts: Sequence[torch.optim.Optimizer], config: AmpConfig, *, stacklevel: int = 2
) -> None:
    """Warn (:class:`OptimizerPrecisionWarning`) for each hyperparameter an update divides by
    that is below the compute format's smallest normal number while O3 keeps the optimizer
    state in that format: where the second moment flushes to zero the update divides by
    (almost) nothing and training blows up. Costs nothing per step."""
    fmt = config.compute
    if not config.rounds_optimizer_state or fmt.bits >= 32:
        return
    for oi, opt in enumerate(opts):
        seen: set[tuple[str, float]] = set()
        for group in opt.param_groups:
            for key in _DIVISOR_KEYS:
                for value in _floats(group.get(key)):
                    if 0 < value < fmt.min_normal and (key, value) not in seen:
                        seen.add((key, value))
                        warnings.warn(
                            _divisor_message(oi, opt, key, value, fmt),
                            OptimizerPrecisionWarning,
                            stacklevel=stacklevel,
                        )


def _divisor_message(
    oi: int, opt: torch.optim.Optimizer, key: str, value: float, fmt: FloatFormat
) -> str:
    stored = float(quantize(torch.tensor(value), fmt))
    return (
        f"optimizers[{oi}] ({type(opt).__name__}) has {key}={value:g}, below {fmt.name}'s "
        f"smallest normal number {fmt.min_normal:g} (stored in {fmt.name} it is {stored:g}). "
        f"At O3 the optimizer state lives in {fmt.name}: where the second moment flushes to "
        f"zero the update divides by about {key} and training diverges. Pass {key}="
        f"{safe_divisor(fmt):g} to the optimizer, or initialize(..., optimizer_state='float32') "
        "(emulated O3) to keep the optimizer state in float32."
    )
