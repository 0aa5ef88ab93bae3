"""Small argument checks used across the package, so every "must be a whole number >= 1" reads the same."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A FinetuneConfig value that cannot work; the message names the field, the value and what is allowed."""


def is_whole(value: Any, low: int = 1) -> bool:
    """A real int (not a bool, not 2.0) of at least `low`: what counts and sizes must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_positive_number(value: Any) -> bool:
    """A finite int or float above 0 (not a bool, not nan/inf): what rates, scales and penalties must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def require_whole(name: str, value: Any, low: int = 1, error: type[Exception] = ValueError) -> int:
    """Return `value` if it is a whole number >= low, else raise `error` naming it and what is allowed."""
    if not is_whole(value, low):
        raise error(f"{name}={value!r} is not allowed: a whole number >= {low}")
    return value


def require_bool(name: str, value: Any, error: type[Exception] = ValueError) -> bool:
    """Return `value` if it is True or False; a string such as 'false' would silently count as true."""
    if not isinstance(value, bool):
        raise error(f"{name}={value!r} is not allowed: True or False (a {type(value).__name__} is not a boolean)")
    return value


def require_choice(name: str, value: Any, allowed) -> Any:
    """Return `value` if it is one of `allowed`, else raise ValueError listing what is."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
    return value
