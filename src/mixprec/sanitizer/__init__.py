"""A numerical sanitizer for PyTorch: shadow float64 execution of every aten op.

``with mixprec.sanitize() as report:`` runs the user's code unchanged and, under a
``TorchDispatchMode``, every aten op (forward *and* backward) a second time on float64 shadow
copies of its inputs — LLVM's NSan idea, per tensor op instead of per scalar instruction. Each
op's real output is compared with its shadow output; where they disagree by more than a
threshold the op is re-run on the shadow inputs rounded to the real format, which separates the
error the op introduced itself (*local* error, Herbgrind's idea) from the error it inherited.
Only ops with a large local error become findings. See docs/sanitize.md.

Modules, in the order a checked op passes through them:

* ``session``: the :func:`sanitize` context manager (argument checks, start / stop);
* ``mode``: the dispatch mode: routes each op by its kind, labels autograd nodes, gradient
  hooks, :func:`record_rounding`;
* ``ops``: op classification (view, exact, rounding, random, in-place, ...);
* ``attribution``: source lines and module names of ops;
* ``shadows`` and ``store``: shadow arguments, and the storage-keyed shadow table;
* ``tolerances``, ``passes`` and ``measurement``: the bits-lost measure, real against shadow
  results (``passes``: the comparison passes, a C kernel ``_checks`` or torch),
  local error, finding kinds; non-finite values judged element by element (which output
  elements an input's NaN/Inf reaches), root causes (``Finding.cause``);
* ``findings``: :class:`Finding` (``label``, ``cause``) and the aggregation of hits into findings;
* ``gradients``: gradient histograms (:class:`GradHistogram`);
* ``report`` and ``render``: :class:`Report`, its JSON (``SCHEMA_VERSION``), cause chains,
  the table laid out for a given width, and figures.

``torch.compile``d code runs eagerly while the sanitizer is active (``mode``), so it is checked.

Cost: each shadowed op runs once more in float64 plus one fused comparison pass (the fast path,
``passes``: a C kernel with a torch fallback); the local re-run happens only for suspicious ops.
Shadows live in a side table keyed by storage and are freed with the real tensors.
"""

from __future__ import annotations

from mixprec.sanitizer.findings import KINDS, PHASES, Finding
from mixprec.sanitizer.gradients import GradHistogram
from mixprec.sanitizer.mode import record_rounding
from mixprec.sanitizer.report import SCHEMA_VERSION, Report
from mixprec.sanitizer.session import sanitize

__all__ = [
    "KINDS",
    "PHASES",
    "SCHEMA_VERSION",
    "Finding",
    "GradHistogram",
    "Report",
    "record_rounding",
    "sanitize",
]
