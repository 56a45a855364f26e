"""Argument conversions shared by the ops' checks."""

from __future__ import annotations

import operator


def as_int(value):
    """A Python int for any integer a user may pass (a NumPy integer, a 0-d integer tensor:
    what ``F.unfold`` and ``F.interpolate`` accept too); anything else, bools included,
    unchanged, for the caller's check to name."""
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value
