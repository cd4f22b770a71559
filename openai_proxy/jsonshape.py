"""How the daemon names a JSON value's type in the error descriptions it sends to clients."""

from __future__ import annotations

_NAMES = {
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def type_name(value: object) -> str:
    """``"a string"``, ``"an array"``, ``"null"`` …: the JSON name of ``value``'s type."""
    return _NAMES.get(type(value), type(value).__name__)
