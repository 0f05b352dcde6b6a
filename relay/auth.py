"""API-key authentication for the subscription and admin APIs (keys from ``RELAY_API_KEYS``).

A key is presented the way KickoffLabs clients present it: an ``api_key`` parameter (query,
form or JSON body), or the last whitespace-separated token of an ``Authorization`` or
``Authentication`` header (``Bearer KEY``, ``Token KEY`` or just ``KEY``). The presented key is
compared with *every* configured key in constant time, so neither the position of the matching
key nor a near miss shows in the response time.

Keys never reach the logs: nothing here logs them, and :class:`RedactApiKeys` is a logging
filter for access logs (werkzeug, gunicorn) that print request lines with ``?api_key=…``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

from flask import current_app, request

from relay.errors import Unauthorized

KEY_PARAMETER = "api_key"
KEY_HEADERS = ("Authorization", "Authentication")
MAX_KEY_LENGTH = 512

F = TypeVar("F", bound=Callable[..., Any])


def presented_key(parameters: Mapping[str, Any] | None = None) -> str | None:
    """The key this request presents: the ``api_key`` parameter first, then the headers.

    ``parameters`` are the request's parsed parameters when the caller has merged query, form
    and body itself (the subscription API does); without them the query string, a form body and
    a JSON body are looked at here."""
    if parameters is None:
        parameters = _request_parameters()
    value = parameters.get(KEY_PARAMETER)
    if isinstance(value, str) and value.strip():
        return value.strip()
    for header in KEY_HEADERS:
        tokens = request.headers.get(header, "").split()
        if tokens:
            return tokens[-1]
    return None


def key_matches(given: str | None, keys: Sequence[str]) -> bool:
    """Constant-time check of ``given`` against every key (no early exit)."""
    if not given or len(given) > MAX_KEY_LENGTH:
        return False
    # Digests have one length, so compare_digest does not even reveal the keys' lengths.
    given_digest = hashlib.sha256(given.encode()).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_digest, hashlib.sha256(key.encode()).digest())
    return matched


def require_api_key(parameters: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`~relay.errors.Unauthorized` unless the request presents a configured key."""
    keys: Sequence[str] = current_app.extensions["relay"].settings.api_keys
    if not keys:
        raise Unauthorized("this relay has no API keys configured (set RELAY_API_KEYS)")
    given = presented_key(parameters)
    if given is None:
        raise Unauthorized(
            "missing API key: send api_key as a parameter or an 'Authorization: Bearer <key>' "
            "header"
        )
    if not key_matches(given, keys):
        raise Unauthorized("invalid API key")


def api_key_required(view: F) -> F:
    """Decorator for admin views: 401 (via the app's error handlers) without a valid key."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        require_api_key()
        return view(*args, **kwargs)

    return cast(F, wrapper)


def _request_parameters() -> Mapping[str, Any]:
    if request.args.get(KEY_PARAMETER):
        return request.args
    if request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return request.form
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


_KEY_IN_TEXT = re.compile(r"(?i)(api_key=)[^&\s\"']*")
_KEY_IN_HEADER = re.compile(r"(?i)((?:authorization|authentication):\s*(?:\S+\s+)?)\S+")


def redact(text: str) -> str:
    """``…?api_key=SECRET&…`` → ``…?api_key=[redacted]&…`` (and header values likewise)."""
    if "=" in text:
        text = _KEY_IN_TEXT.sub(r"\1[redacted]", text)
    if ":" in text:  # every line passes through here: most have neither
        text = _KEY_IN_HEADER.sub(r"\1[redacted]", text)
    return text


class RedactApiKeys(logging.Filter):
    """Rewrites log records that would print an API key (access logs print query strings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
