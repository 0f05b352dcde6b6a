"""``POST /hooks/<source>``: validate, name, store in Redis, answer 202 (SPEC §3).

The hot path of the product: everything here is measured by ``bench/ingress.py``. Dedupe and
routing are the workers' job; the ingress only makes sure the event is safely queued.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any
from urllib.parse import parse_qsl

from flask import Blueprint, Response, current_app, g, request
from marshmallow import ValidationError

from relay.core import formdata as forms
from relay.core.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
)
from relay.core.events import derive_event_id, event_id_from_header, is_known
from relay.core.nesting import MAX_DEPTH, deeper_than
from relay.ingress.lead_schema import load_form_lead, load_lead

bp = Blueprint("ingress", __name__)
_JSON_TYPES = ("application/json",)
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# Sender-supplied event ids: each header and its WSGI environ key (read there directly, the
# headers view would build the key anew and raise and catch a KeyError for each absent one).
_ID_HEADERS = (("Idempotency-Key", "HTTP_IDEMPOTENCY_KEY"), ("webhook-id", "HTTP_WEBHOOK_ID"))
MAX_FORM_FIELDS = 1000
_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds one per call


@bp.before_request
def _start_timer() -> None:
    # Read by the request log line and the ingress latency histogram (relay.api.access_log,
    # relay.api.health):
    # every POST is an event accepted or refused; Flask's automatic OPTIONS answer is neither.
    if request.method == "POST":
        g.relay_ingress_started = time.perf_counter()


@bp.post("/hooks/<source>")
def receive(source: str) -> Response:
    ctx = current_app.extensions["relay"]
    configured = ctx.config.sources.get(source)
    if configured is None:
        raise NotFound(f"unknown source {source!r}")
    if configured.token is not None:
        _check_token(configured.token)
    payload, from_form = _read_payload(ctx.settings.max_body_bytes)
    try:
        lead = load_form_lead(payload) if from_form else load_lead(payload)
    except ValidationError as exc:
        raise ValidationFailed("not a valid lead event", exc.messages) from None
    name: str = lead["__event"]
    event_id = _event_id(source, name, lead)
    event = {  # the payload last: a webhook's body is its compact JSON, cut out as stored
        "event_id": event_id,
        "source": source,
        "name": name,
        "known": is_known(name),
        "received_at": time.time(),
        "payload": lead,
    }
    ctx.intake.publish(event, configured.dedupe_window)
    g.relay_event_id = event_id  # for the request log line
    return _accepted(event_id)


def _accepted(event_id: str) -> Response:
    # jsonify's exact answer (compact, keys sorted, a final newline), without its provider
    # lookups and the (response, status) tuple: the hot path has this one answer.
    body = _encode({"event_id": event_id, "status": "accepted"})
    return Response(body + "\n", 202, mimetype="application/json")


def _check_token(expected: str) -> None:
    """The API keys' rule (:mod:`relay.api.auth`): a request carries the token at least once,
    as ``?token=`` or ``X-Relay-Token``, and every token it carries is the source's. An empty
    one is a wrong one: nothing falls back to another place, and no copy wins over another."""
    given = [*request.args.getlist("token"), *request.headers.getlist("X-Relay-Token")]
    if not given:
        raise Unauthorized("missing token (use ?token= or the X-Relay-Token header)")
    wanted = expected.encode()
    # Every one compared (no early exit): how many are wrong does not show in the timing.
    right = [hmac.compare_digest(token.encode(), wanted) for token in given]
    if not all(right):
        raise Unauthorized("wrong token" if len(given) == 1 else
                           "wrong token: every token a request carries must be right")


def _event_id(source: str, name: str, lead: dict[str, Any]) -> str:
    environ = request.environ
    chosen = None
    for header, environ_key in _ID_HEADERS:
        key = environ.get(environ_key)
        if key:
            if len(key) > 256 or not key.isprintable():
                raise BadRequest(f"invalid {header} header")  # each one given is checked
            chosen = chosen or key
    if chosen:
        return event_id_from_header(source, chosen)
    return derive_event_id(source, name, lead)


def _read_payload(limit: int) -> tuple[dict[str, Any], bool]:
    """The body decoded, and whether it was a form (typed by :func:`load_form_lead`)."""
    mimetype = request.mimetype
    if mimetype in _JSON_TYPES or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    ):
        return _parse_json(_read_body(limit)), False
    if mimetype == "application/x-www-form-urlencoded":
        return _parse_form(_read_body(limit)), True
    if mimetype == "multipart/form-data":
        _check_declared_length(limit)  # werkzeug's parser enforces size and part count
        payload = forms.decode(request.form.items(multi=True))
        if not payload:
            raise BadRequest("empty form body")
        return payload, True
    if not mimetype:
        raise UnsupportedMediaType(
            "missing Content-Type: send application/json or application/x-www-form-urlencoded"
        )
    raise UnsupportedMediaType(
        f"unsupported Content-Type {mimetype!r}: send application/json or "
        "application/x-www-form-urlencoded"
    )


def _check_declared_length(limit: int) -> int | None:
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"body of {length} bytes is over the limit of {limit} bytes")
    return length


def _read_body(limit: int) -> bytes:
    """The whole body, refused with 413 past ``limit`` before it is read whole.

    Read from the WSGI stream ourselves: werkzeug silently cuts a chunked body at
    MAX_CONTENT_LENGTH, and trusts a body that ends before its Content-Length (gunicorn
    marks its input terminated), either of which would relay a truncated lead.
    """
    length = _check_declared_length(limit)
    stream = request.environ["wsgi.input"]
    body = stream.read(limit + 1) if length is None else stream.read(length)
    if len(body) > limit:
        raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
    if length is not None and len(body) != length:
        raise BadRequest(f"body ended after {len(body)} of its {length} bytes")
    return body


def _parse_form(body: bytes) -> dict[str, Any]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                          max_num_fields=MAX_FORM_FIELDS, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"form body is not valid UTF-8 (byte {exc.start})") from None
    except ValueError:  # werkzeug caps multipart parts, this caps url-encoded fields
        raise PayloadTooLarge(f"more than {MAX_FORM_FIELDS} form fields") from None
    payload = forms.decode(pairs)
    if not payload:
        raise BadRequest("empty form body")
    return payload


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {duplicate!r}")
    return result


# One decoder for every request (json.loads with hooks builds a new one per call).
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)


def _parse_json(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("empty body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        payload = _DECODER.decode(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"invalid JSON: {exc}") from None
    # Fewer brackets than the limit cannot nest past it: a lead's dozen skip the walk.
    if text.count("{") + text.count("[") > MAX_DEPTH and deeper_than(payload):
        raise _too_deep()
    if "\\u" in text and _has_lone_surrogate(payload):
        raise BadRequest("invalid JSON: a \\u escape encodes a lone surrogate")
    if not isinstance(payload, dict):
        raise ValidationFailed(
            "the body must be a JSON object", {"_schema": [type(payload).__name__]}
        )
    return payload


def _too_deep() -> BadRequest:
    return BadRequest(f"JSON nested too deeply (at most {MAX_DEPTH} levels of objects and "
                      "arrays)", {"_body": [f"nested more than {MAX_DEPTH} levels deep"]})


def _has_lone_surrogate(payload: Any) -> bool:
    # ``"\ud800"`` is valid JSON but not valid Unicode: it could never be sent on as UTF-8.
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
