"""The values a declaration's settings hold: plain JSON (strings, numbers, booleans, lists, objects), or UNKNOWN,
which a preview's settings hold until what they come from is known."""

from __future__ import annotations

from typing import Any


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


def contains_unknown(value: Any) -> bool:
    if value is UNKNOWN:
        return True
    if isinstance(value, dict):
        return any(contains_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(contains_unknown(v) for v in value)
    return False


def known(value: Any) -> bool:
    """Set, and known: a rule has something to hold it to."""
    return value is not None and not contains_unknown(value)


def kind_of(value: Any) -> str:
    """The JSON kind of a value for an error message (`a list`); never the value itself."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def short(value: Any, limit: int = 80) -> str:
    """A value for an error message, cut short: a failure names the setting, not a megabyte of input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
