"""Dotted paths into a lead payload (``custom_fields.company``), used by ``where`` filters and
the drivers' field mappings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_MISSING = object()


def dotted_get(payload: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """``dotted_get({"a": {"b": 1}}, "a.b") == 1``; a missing step gives ``default``.

    A key that itself contains dots (``{"a.b": 1}``) is found before descending.
    """
    if path in payload:
        return payload[path]
    node: Any = payload
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isascii() and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return default
    return node
