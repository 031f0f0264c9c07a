"""Numeric environment knobs of the custom path, read one way: a typed one-line error names the variable."""

from __future__ import annotations

import os
from collections.abc import Callable

from .errors import InvalidArgumentError


def env_number(
    name: str,
    default: int | float,
    *,
    parse: Callable[[str], int | float] = int,
    unit: str = "an integer",
    minimum: int | float = 0,
    below: int | float | None = None,
) -> int | float:
    """``$name`` parsed by ``parse`` (``default`` when unset); ``InvalidArgumentError`` when it does not parse or
    lies outside ``[minimum, below)``."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = parse(text)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be {unit}, got {text!r}") from None
    if value < minimum or (below is not None and value >= below):
        bound = f"in [{minimum}, {below})" if below is not None else f">= {minimum}"
        raise InvalidArgumentError(f"{name} must be {bound}, got {text!r}")
    return value
