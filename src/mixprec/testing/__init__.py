"""Helpers for testing numerics: ULP audits against mpmath (imported lazily)."""

from __future__ import annotations

__all__ = []
