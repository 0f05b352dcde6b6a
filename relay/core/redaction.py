"""What never leaves the relay in clear: one policy for the admin API, the console, the CLI
and the logs.

- **Secret by name**: a field (a payload field at any depth, a log line's extra, a config
  option) whose name contains one of :data:`SECRET_WORDS` (``token``, ``api_key``,
  ``password`` …), or is one of the names the operator adds with ``RELAY_REDACT_FIELDS``
  (compared whole, ignoring case). Its value is shown as ``[redacted]``.
- **Secret in text**: in any text shown (a URL in a payload, an error text, a request line),
  the value of a ``name=value`` pair whose name is secret by the rule above (``?api_key=…``,
  ``&access_token=…``, ``custom_fields[password]=…``), and the credentials of an
  ``Authorization:`` / ``Authentication:`` header line.

The policy is the process's: :func:`configure` sets the added names (each process does, from
its settings: :func:`relay.config.settings.apply_process_settings`, the CLI), and every reader
calls the functions below. :func:`redacted` walks a value without recursion and shows at most
:data:`SHOWN_DEPTH` levels of it, so no renderer can run out of stack on a stored payload,
whatever the ingress let in before its nesting limit (:mod:`relay.core.nesting`).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from relay.core.nesting import MAX_DEPTH

SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey", "authorization",
                "authentication", "signature")
REDACTED = "[redacted]"
TOO_DEEP = "[nested too deeply]"
#: Levels of a value shown; deeper containers are shown as TOO_DEEP. Twice the ingress's
#: limit: a payload the ingress accepts is always shown whole, inside an event's record too.
SHOWN_DEPTH = 2 * MAX_DEPTH

# ``name=value``: a name starts where the previous character cannot be part of one (so the
# search is linear), and its value runs to the next separator of a query string or a text.
_PAIR = re.compile(r"(?<![\w.\[\]%-])([\w.\[\]%-]+)=([^&\s\"'<>]*)")
_KEY_IN_HEADER = re.compile(r"(?i)((?:authorization|authentication):\s*(?:\S+\s+)?)\S+")


class Policy:
    """Which names are secret: :data:`SECRET_WORDS` anywhere in a name, and ``names`` whole."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = frozenset(name.strip().lower() for name in names if name.strip())
        # The same few names on every log line and in every payload.
        self.is_secret_name = functools.lru_cache(maxsize=1024)(self._is_secret_name)

    def _is_secret_name(self, name: str) -> bool:
        lowered = name.lower()
        return lowered in self.names or any(word in lowered for word in SECRET_WORDS)

    def text(self, text: str) -> str:
        if "=" in text:
            text = _PAIR.sub(self._pair, text)
        if ":" in text:  # every log line passes through here: most have neither
            text = _KEY_IN_HEADER.sub(r"\1" + REDACTED, text)
        return text

    def _pair(self, match: re.Match[str]) -> str:
        name = match.group(1)
        if not match.group(2) or not self.is_secret_name(name):
            return match.group()
        return f"{name}={REDACTED}"


_policy = Policy()


def configure(names: Iterable[str] = ()) -> None:
    """Make ``names`` (``RELAY_REDACT_FIELDS``) secret in this process, besides the words."""
    global _policy
    _policy = Policy(names)


def policy() -> Policy:
    """The process's policy (what :func:`configure` set last)."""
    return _policy


def is_secret_name(name: str) -> bool:
    """Whether a field called ``name`` holds a secret (``token``, ``api_key``, ``password`` …,
    or a name from ``RELAY_REDACT_FIELDS``)."""
    return _policy.is_secret_name(name)


def redact(text: str) -> str:
    """``…?api_key=SECRET&…`` → ``…?api_key=[redacted]&…`` (and every ``name=`` whose name is
    secret; header values likewise)."""
    return _policy.text(text)


def redacted(value: Any, by_name: bool = True) -> Any:
    """A copy of ``value`` (JSON-like: mappings, lists, scalars) with its texts redacted and,
    when ``by_name``, the value of every field named like a secret replaced by ``[redacted]``
    (an empty one stays empty: there is nothing to hide). Containers deeper than
    :data:`SHOWN_DEPTH` are shown as ``[nested too deeply]``."""
    current = _policy
    holder: list[Any] = [None]
    # (where the copy goes, under which key, the original, its depth): no recursion.
    work: list[tuple[Any, Any, Any, int]] = [(holder, 0, value, 1)]
    while work:
        parent, key, item, depth = work.pop()
        if isinstance(item, Mapping):
            if depth > SHOWN_DEPTH:
                parent[key] = TOO_DEEP
                continue
            copy: dict[Any, Any] = {}
            parent[key] = copy
            for name, child in item.items():
                if by_name and current.is_secret_name(str(name)) and child not in (None, ""):
                    copy[name] = REDACTED
                else:
                    copy[name] = None  # keeps the order; filled in below
                    work.append((copy, name, child, depth + 1))
        elif isinstance(item, list | tuple):
            if depth > SHOWN_DEPTH:
                parent[key] = TOO_DEEP
                continue
            items: list[Any] = [None] * len(item)
            parent[key] = items
            work.extend((items, i, child, depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            parent[key] = current.text(item)
        else:
            parent[key] = item
    return holder[0]


def redacted_record(record: Mapping[str, Any], payload: str = "payload") -> dict[str, Any]:
    """A record the relay shows (an event's detail): its ``payload`` redacted by field names
    and texts, the rest by texts only (destination names are keys there, not secrets)."""
    shown: dict[str, Any] = {}
    for key, value in record.items():
        shown[key] = redacted(value, by_name=key == payload)
    return shown


class RedactApiKeys(logging.Filter):
    """Rewrites log records that would print an API key (access logs print query strings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
