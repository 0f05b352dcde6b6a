"""Bracket-notation form bodies, both ways (``custom_fields[company]=…``, ``tags[][name]=…``).

KickoffLabs' legacy (form) delivery and form-encoded ingress use the Rails/PHP convention.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

from relay.errors import ValidationFailed

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
MAX_DEPTH = 32


def decode(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Decode ``(key, value)`` pairs into nested dicts and lists.

    ``a[b]=1`` → ``{"a": {"b": "1"}}``; ``t[]=x&t[]=y`` → ``{"t": ["x", "y"]}``;
    ``t[][name]=a&t[][name]=b`` → ``{"t": [{"name": "a"}, {"name": "b"}]}``. A plain key
    repeated keeps its last value. Values stay strings; the schema types them.
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY.match(key)
        if not match:
            result[key] = value  # not bracket notation: keep verbatim
            continue
        path = [match.group(1)] + re.findall(r"\[([^\[\]]*)\]", match.group(2))
        if len(path) > MAX_DEPTH:
            raise ValidationFailed("form field nested too deeply", {key[:100]: "too deep"})
        try:
            _assign(result, path, value)
        except TypeError as exc:
            raise ValidationFailed(
                "conflicting form fields", {key[:100]: str(exc)}
            ) from None
    return result


def _assign(node: dict[str, Any], path: list[str], value: str) -> None:
    head, rest = path[0], path[1:]
    if not rest:
        node[head] = value
        return
    child = node.get(head)
    want_list = rest[0] == ""
    if child is None:
        child = [] if want_list else {}
        node[head] = child
    elif not isinstance(child, list | dict) or want_list != isinstance(child, list):
        raise TypeError(f"{head!r} is used both as a list and as an object")
    if want_list:
        _assign_list(child, rest[1:], value)
    else:
        _assign(child, rest, value)


def _assign_list(items: list[Any], rest: list[str], value: str) -> None:
    # ``t[][name]=a&t[][name]=b``: a key already present in the last element starts a new one.
    if not rest:
        items.append(value)
        return
    last = items[-1] if items else None
    if not isinstance(last, dict) or _has_path(last, rest):
        last = {}
        items.append(last)
    _assign(last, rest, value)


def _has_path(node: Any, path: list[str]) -> bool:
    # Rails' rule: a key path the last element already holds (``t[][a][b]`` twice) starts a
    # new element; checking only the first key merged ``[{"a": {"b": 1}}, {"a": {"b": 2}}]``.
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def encode(payload: Mapping[str, Any]) -> str:
    """The inverse of :func:`decode` for delivery in form format."""
    return urlencode(list(_flatten(payload, "")))


def _flatten(value: Any, prefix: str) -> Iterable[tuple[str, str]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}[{key}]" if prefix else str(key))
    elif isinstance(value, list):
        for item in value:
            yield from _flatten(item, f"{prefix}[]")
    elif value is None:
        yield prefix, ""
    elif isinstance(value, bool):
        yield prefix, "true" if value else "false"
    else:
        yield prefix, str(value)
