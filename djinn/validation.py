"""Checks of plain values a caller sends (numbers, integers, text), shared by the engine and the wire
decoder, so that anything that cannot be represented is a typed error before it is used."""
from __future__ import annotations

import math
from typing import Any, Optional

from .errors import InvalidRequest

INT64_MAX = (1 << 63) - 1


def shown(value: Any) -> str:
    """A short rendering of a caller's value for an error message (never recursive, never long)."""
    if isinstance(value, (bool, float, type(None))):
        return repr(value)
    if isinstance(value, int):
        digits = value.bit_length() * 0.302
        return repr(value) if digits < 40 else f"an integer of about {digits:.0f} digits"
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return f"a value of type {type(value).__name__}"


def number(value: Any, what: str, lo: Optional[float] = None, hi: Optional[float] = None) -> float:
    """`value` as a finite float within [lo, hi]: ints too large for a float, NaN and Inf are refused."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequest(f"{what} must be a number, got {shown(value)}")
    try:
        x = float(value)
    except OverflowError:
        raise InvalidRequest(f"{what} must be a finite number, got {shown(value)}") from None
    if not math.isfinite(x):
        raise InvalidRequest(f"{what} must be a finite number, got {shown(value)}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise InvalidRequest(f"{what} must be in [{lo if lo is not None else '-inf'}, "
                             f"{hi if hi is not None else 'inf'}], got {shown(value)}")
    return x


def integer(value: Any, what: str, lo: int = -INT64_MAX - 1, hi: int = INT64_MAX) -> int:
    """`value` as an int within [lo, hi] (by default what an int64 holds)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{what} must be an integer, got {shown(value)}")
    if not lo <= value <= hi:
        raise InvalidRequest(f"{what} must be an integer in [{lo}, {hi}], got {shown(value)}")
    return value


def text(value: Any, what: str) -> str:
    """`value` as text that encodes as UTF-8 (a lone surrogate such as '\\ud800' does not)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be text, got {shown(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"{what} is not valid Unicode text: {e.reason} at character {e.start}") from None
    return value
