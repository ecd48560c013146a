"""Argument checks shared by the modules of ``vmf_head.nn``."""

from __future__ import annotations

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: object) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= 1 (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
