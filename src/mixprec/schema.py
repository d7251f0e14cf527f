"""The version of every JSON document mixprec writes.

Sanitizer reports, the demo's ``report.json``, ``mixprec formats --json``, ``mixprec explain
--json`` and ``mixprec stabilize --json`` each carry ``"schema_version": SCHEMA_VERSION``. One
number for the whole family: it is bumped when any of those documents changes incompatibly, so a
reader checks one value whatever document it reads.
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION"]

SCHEMA_VERSION = 1
