"""Helpers for testing numerics: ULP audits against mpmath (imported lazily, only when
references are computed), shared by the test suite and ``benchmarks/ulp_audit.py``."""

from __future__ import annotations

from mixprec.testing import corpus, ulp
from mixprec.testing.ulp import (
    ELEMENTWISE,
    LEVELS,
    ROWWISE,
    TARGET_ULP,
    AuditRow,
    ElementwiseSpec,
    audit_elementwise,
    audit_rows,
    ulp_error,
)

__all__ = [
    "ELEMENTWISE",
    "LEVELS",
    "ROWWISE",
    "TARGET_ULP",
    "AuditRow",
    "ElementwiseSpec",
    "audit_elementwise",
    "audit_rows",
    "corpus",
    "ulp",
    "ulp_error",
]
