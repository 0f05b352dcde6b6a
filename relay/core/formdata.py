"""Bracket-notation form bodies, both ways (``custom_fields[company]=…``, ``tags[0][name]=…``).

KickoffLabs' legacy (form) delivery and form-encoded ingress use the Rails/PHP convention;
encoders write lists in two styles, and both are read:

- brackets, ``tags[][name]=a&tags[][name]=b`` (Rails, ``qs`` with ``arrayFormat: brackets``):
  an element key the last element already holds starts a new element;
- indices, ``tags[0][name]=a&tags[1][name]=b`` (``qs``'s default, PHP, Rails' nested
  attributes): one element per index, in the order of the indices (``a[1]=x&a[0]=y`` is
  ``[y, x]``; gaps close up, as ``qs`` does). ``[]`` next to indices appends after the highest.

An index is a plain decimal (``0``, ``17``; at most nine digits); any other key in brackets
(``[01]``, ``[-1]``, ``[x]``) names an object member, and a list used as an object (``a[0]=1``
and ``a[b]=2``) is refused with 422. A field given twice (``email=a&email=b``,
``c[k]=1&c[k]=2``, ``t[0]=x&t[0]=y``: not ``t[]=``, which appends) is refused with 400, as JSON's
duplicate key is, and so is a key nested deeper than the ingress's one limit
(:data:`relay.core.nesting.MAX_DEPTH` levels). The ingress caps the number of fields
(``MAX_FORM_FIELDS``) before this runs.

Values stay strings here; :func:`relay.ingress.lead_schema.load_form_lead` types them with the
lead schema.

(``qs-codec``, a Python port of ``qs``, was weighed as a replacement: about 4,300 lines against
these 150, and its limits reshape input silently, a list past 20 items becoming an object,
a key past depth 5 a literal string, where the ingress refuses with a 422 and says why.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

from relay.core.errors import BadRequest, ValidationFailed
from relay.core.nesting import MAX_DEPTH

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART = re.compile(r"\[([^\[\]]*)\]")
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


class _GivenTwice(Exception):
    """A field's value is given a second time."""


class _List:
    """A list being decoded: its elements by index, ordered when the body is done."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: dict[int, Any] = {}

    def last(self) -> Any:
        return self.items[max(self.items)] if self.items else None

    def append(self, value: Any) -> None:
        self.items[max(self.items) + 1 if self.items else 0] = value


def decode(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Decode ``(key, value)`` pairs into nested dicts and lists.

    ``a[b]=1`` → ``{"a": {"b": "1"}}``; ``t[]=x&t[]=y`` and ``t[0]=x&t[1]=y`` →
    ``{"t": ["x", "y"]}``; ``t[][name]=a&t[][name]=b`` and ``t[0][name]=a&t[1][name]=b`` →
    ``{"t": [{"name": "a"}, {"name": "b"}]}``. A field given twice is a :class:`BadRequest`.
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY.match(key)
        path = [match.group(1), *_PART.findall(match.group(2))] if match else [key]
        if len(path) > MAX_DEPTH:
            raise BadRequest(f"form field nested too deeply (at most {MAX_DEPTH} levels)",
                             {key[:100]: [f"nested more than {MAX_DEPTH} levels deep"]})
        try:
            _assign(result, path, value)  # a key that is not bracket notation: verbatim
        except _GivenTwice:
            raise BadRequest(f"form field {key[:100]!r} is given more than once",
                             {key[:100]: ["given more than once"]}) from None
        except TypeError as exc:
            raise ValidationFailed(
                "conflicting form fields", {key[:100]: str(exc)}
            ) from None
    finalized: dict[str, Any] = _finish(result)
    return finalized


def _is_list_step(part: str) -> bool:
    return part == "" or _INDEX.fullmatch(part) is not None


def _assign(node: dict[str, Any] | _List, path: list[str], value: str) -> None:
    head, rest = path[0], path[1:]
    if isinstance(node, _List):
        _assign_item(node, head, rest, value)
        return
    child = node.get(head)
    if not rest:
        if isinstance(child, dict | _List):
            raise TypeError(f"{head!r} is used both as a list or object and as a value")
        if child is not None:
            raise _GivenTwice(head)
        node[head] = value
        return
    want_list = _is_list_step(rest[0])
    if child is None:
        child = _List() if want_list else {}
        node[head] = child
    elif want_list != isinstance(child, _List) or isinstance(child, str):
        raise TypeError(f"{head!r} is used both as a list and as an object"
                        if not isinstance(child, str) else
                        f"{head!r} is used both as a value and as a list or object")
    _assign(child, rest, value)


def _assign_item(items: _List, step: str, rest: list[str], value: str) -> None:
    if step == "":
        if not rest:
            items.append(value)
            return
        # ``t[][name]=a&t[][name]=b``: a key path the last element already holds starts a
        # new element (Rails' rule; checking only the first key merged
        # ``[{"a": {"b": 1}}, {"a": {"b": 2}}]``).
        last = items.last()
        if not isinstance(last, dict) or _has_path(last, rest):
            last = {}
            items.append(last)
        _assign(last, rest, value)
        return
    index = int(step)
    element = items.items.get(index)
    if not rest:
        if isinstance(element, dict | _List):
            raise TypeError(f"element {index} is used both as a list or object and as a value")
        if element is not None:
            raise _GivenTwice(index)
        items.items[index] = value
        return
    want_list = _is_list_step(rest[0])
    if element is None:
        element = items.items[index] = _List() if want_list else {}
    elif isinstance(element, str) or want_list != isinstance(element, _List):
        raise TypeError(f"element {index} is used both as a value and as a list or object"
                        if isinstance(element, str) else
                        f"element {index} is used both as a list and as an object")
    _assign(element, rest, value)


def _has_path(node: Any, path: list[str]) -> bool:
    for part in path:
        if isinstance(node, _List):
            if _INDEX.fullmatch(part) is None or int(part) not in node.items:
                return False
            node = node.items[int(part)]
            continue
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _finish(value: Any) -> Any:
    if isinstance(value, _List):
        return [_finish(value.items[i]) for i in sorted(value.items)]
    if isinstance(value, dict):
        return {key: _finish(item) for key, item in value.items()}
    return value


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
