"""API-key authentication for the subscription and admin APIs (keys from ``RELAY_API_KEYS``).

A key is presented the way KickoffLabs clients present it: an ``api_key`` parameter (query,
form or JSON body), or the last token of an ``Authorization`` or ``Authentication`` header
(``Bearer KEY``, ``Token KEY`` or just ``KEY``; tokens are separated by spaces or tabs).

Keys are compared **exactly**: nothing is stripped or normalised, so ``" KEY"`` or ``"KEY\x1c"``
is a wrong key. **The rule for a request that carries a key more than once** (a parameter and a
header, both headers, a repeated parameter): *every* key it carries must be a configured key,
or the answer is 401. An empty value counts as a key given, and it is a wrong one: an empty
``api_key=`` next to a valid header is refused like any wrong key next to it.

Each presented key is compared with *every* configured key in constant time, so neither the
position of the matching key nor a near miss shows in the response time.

Keys never reach the logs: nothing here logs them, and
:class:`relay.core.redaction.RedactApiKeys` is a logging filter for access logs (werkzeug,
gunicorn) that print request lines with ``?api_key=…``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from flask import current_app, request

from relay.core.api_keys import key_matches
from relay.core.errors import Unauthorized

KEY_PARAMETER = "api_key"
KEY_HEADERS = ("Authorization", "Authentication")
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_HEADER_TOKENS = re.compile(r"[ \t]+")  # HTTP's own whitespace, nothing else

F = TypeVar("F", bound=Callable[..., Any])


def presented_keys() -> list[object]:
    """Every key this request presents, in order: ``api_key`` query parameters, ``api_key``
    in the body, then the last token of each ``Authorization`` / ``Authentication`` header.

    The body is read the way the subscription API reads its parameters: a body that parses as
    a JSON object is JSON whatever its label, else a form body is a form. A value that is not
    a string (``{"api_key": 7}``) is kept as is; it matches no key."""
    keys: list[object] = list(request.args.getlist(KEY_PARAMETER))
    body = json_object(request.get_data(cache=True))
    if body is not None:
        if KEY_PARAMETER in body:
            keys.append(body[KEY_PARAMETER])
    elif request.mimetype in _FORM_TYPES:
        keys.extend(request.form.getlist(KEY_PARAMETER))
    for header in KEY_HEADERS:
        for value in request.headers.getlist(header):
            tokens = _HEADER_TOKENS.split(value.strip(" \t"))
            keys.append(tokens[-1])
    return keys


def require_api_key() -> None:
    """Raise :class:`~relay.core.errors.Unauthorized` unless the request presents at least one key
    and every key it presents is a configured one."""
    keys: Sequence[str] = current_app.extensions["relay"].settings.api_keys
    if not keys:
        raise Unauthorized("this relay has no API keys configured (set RELAY_API_KEYS)")
    given = presented_keys()
    if not given:
        raise Unauthorized(
            "missing API key: send api_key as a parameter or an 'Authorization: Bearer <key>' "
            "header"
        )
    # Every key is checked (no early exit): how many are wrong does not show in the timing.
    valid = [key_matches(key, keys) for key in given]
    if not all(valid):
        raise Unauthorized("invalid API key" if len(given) == 1 else
                           "invalid API key: every key a request carries must be valid")


def api_key_required(view: F) -> F:
    """Decorator for admin views: 401 (via the app's error handlers) without a valid key."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        require_api_key()
        return view(*args, **kwargs)

    return cast(F, wrapper)


def json_object(body: bytes) -> dict[str, Any] | None:
    """A body that is a JSON object, else None (the subscription API reads its parameters
    the same way)."""
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return decoded if isinstance(decoded, dict) else None
