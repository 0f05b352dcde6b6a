"""The one nesting limit: how deep the objects and arrays of a lead may go.

The ingress refuses a body nested deeper than :data:`MAX_DEPTH` levels (the body's own object
is the first level; ``{"custom_fields": {"a": 1}}`` has two), JSON and form alike, so every
part of the relay that walks a payload (the console, the API, the CLI, the webhook's form
encoding, the history) works on what the ingress accepted well below Python's recursion limit.
The walk here is iterative: it cannot itself run out of stack on what it is asked to refuse.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 32


def deeper_than(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests dicts and lists more than ``limit`` levels (``value`` itself
    being the first)."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children
                     if isinstance(child, dict | list))
    return False
