"""A local stand-in for a vendor API: records every request, answers scripted responses.

::

    from tests.support.vendor_server import VendorServer

    def test_upsert(vendor: VendorServer) -> None:  # the fixture: tests/integration/conftest.py
        vendor.reply(429, {"message": "slow down"}, headers={"Retry-After": "7"})
        ...  # the driver sends to vendor.url
        assert vendor.requests[0].path == "/crm/v3/objects/contacts/batch/upsert"

Scripted replies are used first-in first-out, each optionally bound to a method and path; a
request no script matches gets the default reply (200 ``{}``), or, on a server started with a
:class:`HubSpotContacts`, what HubSpot's contacts batch upsert would answer::

    hubspot = HubSpotContacts(limit=100, interval=10.0)   # a private app's 100 per 10 s
    vendor = VendorServer(hubspot=hubspot).start()
    ...  # the driver upserts; hubspot.contacts, hubspot.stats() and
    assert hubspot.problems == []   # every request and answer matched HubSpot's OpenAPI schema

It runs on the tests' one loopback server (``loopback.py``): only 127.0.0.1 is bound. ``python
-m tests.support.vendor_server --hubspot`` runs the HubSpot stand-in alone (the bench's), prints
its URL and answers ``GET /__stats``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import re
import signal
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jsonschema_rs

from tests.support.loopback import LoopbackHTTPServer

HUBSPOT_UPSERT = "/crm/v3/objects/contacts/batch/upsert"
#: The request and answer schemas of the batch upsert, as HubSpot publishes them.
HUBSPOT_SCHEMA = Path(__file__).with_name("hubspot_batch_upsert.schema.json")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # with the query string, as sent
    headers: Mapping[str, str]  # keys lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class ScriptedReply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    method: str | None = None
    path: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path is None or self.path == path
        )


class VendorServer:
    def __init__(self, hubspot: HubSpotContacts | None = None) -> None:
        self.hubspot = hubspot
        self.requests: list[RecordedRequest] = []
        self._scripts: list[ScriptedReply] = []
        self._default = ScriptedReply(200, b"{}", {"Content-Type": "application/json"})
        self._lock = threading.Lock()
        self._httpd = LoopbackHTTPServer(self._handler_class())

    @property
    def url(self) -> str:
        return self._httpd.url

    def reply(
        self,
        status: int = 200,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        method: str | None = None,
        path: str | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Script the next matching answer. ``body`` may be bytes, str, or JSON-able."""
        raw = _encode(body)
        all_headers = dict(headers or {})
        if raw:
            all_headers.setdefault("Content-Type", content_type)
        with self._lock:
            self._scripts.append(ScriptedReply(status, raw, all_headers, method, path))

    def _answer_for(self, request: RecordedRequest) -> ScriptedReply:
        with self._lock:
            for index, script in enumerate(self._scripts):
                if script.matches(request.method, request.path):
                    return self._scripts.pop(index)
        if self.hubspot is not None:
            if (request.method, request.path) == ("GET", "/__stats"):
                return ScriptedReply(200, json.dumps(self.hubspot.stats()).encode(),
                                     {"Content-Type": "application/json"})
            played = self.hubspot.answer(request)
            if played is not None:
                return played
        return self._default

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {key.lower(): value for key, value in self.headers.items()}
                request = RecordedRequest(self.command, self.path, headers, body)
                with server._lock:
                    server.requests.append(request)
                answer = server._answer_for(request)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if answer.body:
                    self.wfile.write(answer.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        return Handler

    def start(self) -> VendorServer:
        self._httpd.start()
        return self

    def stop(self) -> None:
        self._httpd.stop()


def _encode(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


# -- HubSpot's contacts batch upsert -------------------------------------------------------------


class _Schema:
    """HubSpot's published schemas of the batch upsert (``HUBSPOT_SCHEMA``)."""

    def __init__(self) -> None:
        document = json.loads(HUBSPOT_SCHEMA.read_text())
        defs = document["$defs"]
        self.request = jsonschema_rs.validator_for({**document["request"], "$defs": defs})
        self.answers = {status: jsonschema_rs.validator_for({**ref, "$defs": defs})
                        for status, ref in document["responses"].items()}

    def problems(self, validator: Any, value: Any) -> list[str]:
        return [f"{'/'.join(map(str, e.instance_path)) or '(top)'}: {e.message}"
                for e in validator.iter_errors(value)]


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")


class HubSpotContacts:
    """What HubSpot's ``POST /crm/v3/objects/contacts/batch/upsert`` does, as far as the relay
    depends on it (sources in docs/destinations.md#hubspot-crm):

    - ``Authorization: Bearer <token>`` (401 otherwise), a body that matches the published
      request schema (400 otherwise; the mismatch is also kept in :attr:`problems`), at most
      100 inputs, ``idProperty: email``;
    - ``limit`` requests per rolling ``interval`` seconds: past it, 429 with HubSpot's body and
      ``X-HubSpot-RateLimit-*`` headers (those headers on every answer); a refused request does
      not count; past ``daily`` accepted requests, 429 ``policyName: DAILY`` for the rest of
      the server's life;
    - the same email twice in one request (case-insensitive): 400 "Duplicate IDs", nothing
      written;
    - an input with an invalid email, or a property not in ``known_properties``: with a unique
      ``objectWriteTraceId`` on every input (and ``multi_status``), 207: the others written,
      an error per bad input naming its trace id; otherwise 400 for the whole batch, nothing
      written, the first bad value quoted in the message;
    - results in another order than the inputs, emails lower-cased, ``latency`` seconds per
      processed request.
    """

    def __init__(self, token: str | None = None, limit: int = 100, interval: float = 10.0,
                 latency: float = 0.0, multi_status: bool = True,
                 known_properties: set[str] | None = None, daily: int = 250_000) -> None:
        self.token = token
        self.limit = limit
        self.interval = interval
        self.latency = latency
        self.multi_status = multi_status
        self.known_properties = known_properties
        self.daily = daily
        self.schema = _Schema()
        self.contacts: dict[str, dict[str, str]] = {}  # lower-cased email -> properties
        self.ids: dict[str, str] = {}
        self.problems: list[str] = []  # schema mismatches: requests and answers
        self.counts: collections.Counter[str] = collections.Counter()
        self.batch_sizes: list[int] = []  # inputs per processed request
        self._accepted: collections.deque[float] = collections.deque()
        self._ids = itertools.count(1001)
        self._lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "contacts": len(self.contacts),
                    "batch_sizes": list(self.batch_sizes), "problems": list(self.problems)}

    def answer(self, request: RecordedRequest) -> ScriptedReply | None:
        if (request.method, request.path) != ("POST", HUBSPOT_UPSERT):
            return None
        with self._lock:
            self.counts["requests"] += 1
            token = (request.header("authorization") or "").removeprefix("Bearer ")
            if not token or (self.token is not None and token != self.token):
                return self._reply(401, {"status": "error", "category": "INVALID_AUTHENTICATION",
                                         "message": "Authentication credentials not found.",
                                         "correlationId": str(uuid.uuid4())})
            now = time.monotonic()
            while self._accepted and self._accepted[0] <= now - self.interval:
                self._accepted.popleft()
            if self.counts["accepted"] >= self.daily:
                self.counts["rate_limited"] += 1
                self.counts["daily_limited"] += 1
                return self._reply(429, {
                    "status": "error", "category": "RATE_LIMITS", "errorType": "RATE_LIMIT",
                    "message": "You have reached your daily limit.", "policyName": "DAILY",
                    "correlationId": str(uuid.uuid4())})
            if len(self._accepted) >= self.limit:
                self.counts["rate_limited"] += 1
                return self._reply(429, {
                    "status": "error", "category": "RATE_LIMITS", "errorType": "RATE_LIMIT",
                    "message": "You have reached your ten_secondly_rolling limit.",
                    "policyName": "TEN_SECONDLY_ROLLING", "correlationId": str(uuid.uuid4())})
            self._accepted.append(now)
            self.counts["accepted"] += 1
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            return self._upsert(request)

    def _upsert(self, request: RecordedRequest) -> ScriptedReply:
        try:
            body = json.loads(request.body)
        except ValueError:
            return self._invalid("Invalid input JSON: the body is not JSON")
        problems = self.schema.problems(self.schema.request, body)
        if problems:
            self.problems += [f"request {p}" for p in problems]
            return self._invalid(f"Invalid input JSON: {problems[0]}")
        inputs = body["inputs"]
        if len(inputs) > 100:
            return self._invalid(f"Batch input of {len(inputs)} is above the limit of 100")
        if any(item.get("idProperty") != "email" for item in inputs):
            return self._invalid("Unable to perform upsert: idProperty must be email here")
        seen: collections.Counter[str] = collections.Counter(
            str(item["id"]).lower() for item in inputs)
        duplicates = sorted(email for email, n in seen.items() if n > 1)
        if duplicates:
            return self._reply(400, {
                "status": "error", "category": "VALIDATION_ERROR",
                "message": f"Duplicate IDs found in batch input: [{', '.join(duplicates)}]. "
                           "IDs must be unique",
                "correlationId": str(uuid.uuid4()), "context": {"ids": duplicates}})
        bad = {index: problem for index, item in enumerate(inputs)
               if (problem := self._invalid_value(item)) is not None}
        traces = [item.get("objectWriteTraceId") for item in inputs]
        multi = self.multi_status and all(traces) and len(set(traces)) == len(traces)
        if bad and not multi:
            return self._invalid("Property values were not valid: "
                                 + json.dumps([next(iter(bad.values()))]))
        started = _stamp()
        results = [self._write(item) for index, item in enumerate(inputs) if index not in bad]
        self.counts["upserted"] += len(results)
        self.batch_sizes.append(len(inputs))
        results.reverse()  # HubSpot does not keep the inputs' order
        answer: dict[str, Any] = {"status": "COMPLETE", "results": results,
                                  "startedAt": started, "completedAt": _stamp()}
        if not bad:
            return self._reply(200, answer)
        self.counts["refused_inputs"] += len(bad)
        answer["numErrors"] = len(bad)
        answer["errors"] = [{
            "status": "error", "category": "VALIDATION_ERROR",
            "message": "Property values were not valid: " + json.dumps([problem]),
            "context": {"objectWriteTraceId": [inputs[index]["objectWriteTraceId"]]},
            "errors": [], "links": {}} for index, problem in bad.items()]
        return self._reply(207, answer)

    def _invalid_value(self, item: Mapping[str, Any]) -> dict[str, Any] | None:
        email = str(item["id"])
        if not _EMAIL.match(email):
            return {"isValid": False, "message": f"Email address {email} is invalid",
                    "error": "INVALID_EMAIL", "name": "email"}
        for name in item["properties"]:
            if self.known_properties is not None and name not in self.known_properties:
                return {"isValid": False, "message": f'Property "{name}" does not exist',
                        "error": "PROPERTY_DOESNT_EXIST", "name": name}
        return None

    def _write(self, item: Mapping[str, Any]) -> dict[str, Any]:
        email = str(item["id"]).lower()
        new = email not in self.contacts
        if new:
            self.ids[email] = str(next(self._ids))
        stored = self.contacts.setdefault(email, {})
        stored.update(item["properties"])
        stored["email"] = email
        result = {"id": self.ids[email], "new": new, "properties": dict(stored),
                  "createdAt": _stamp(), "updatedAt": _stamp(), "archived": False}
        if item.get("objectWriteTraceId"):
            result["objectWriteTraceId"] = item["objectWriteTraceId"]
        return result

    def _invalid(self, message: str) -> ScriptedReply:
        return self._reply(400, {"status": "error", "category": "VALIDATION_ERROR",
                                 "message": message, "correlationId": str(uuid.uuid4())})

    def _reply(self, status: int, body: dict[str, Any]) -> ScriptedReply:
        validator = self.schema.answers.get(str(status), self.schema.answers["default"])
        self.problems += [f"answer {status} {p}" for p in self.schema.problems(validator, body)]
        self.counts[f"status_{status}"] += 1
        remaining = max(0, self.limit - len(self._accepted))
        headers = {"Content-Type": "application/json;charset=utf-8",
                   "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(self.interval * 1000)),
                   "X-HubSpot-RateLimit-Max": str(self.limit),
                   "X-HubSpot-RateLimit-Remaining": str(remaining),
                   "X-HubSpot-RateLimit-Daily": str(self.daily),
                   "X-HubSpot-RateLimit-Daily-Remaining": str(
                       max(0, self.daily - self.counts["accepted"]))}
        return ScriptedReply(status, json.dumps(body).encode(), headers)


def _stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def main(argv: list[str] | None = None) -> None:
    """The HubSpot stand-in alone, on a free port of 127.0.0.1: prints its URL, answers
    ``GET /__stats`` with :meth:`HubSpotContacts.stats`, stops on SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.vendor_server")
    parser.add_argument("--hubspot", action="store_true", required=True)
    parser.add_argument("--limit", type=int, default=100, help="requests per interval")
    parser.add_argument("--interval", type=float, default=10.0, help="rolling window, s")
    parser.add_argument("--latency", type=float, default=0.08, help="seconds per request")
    args = parser.parse_args(argv)
    hubspot = HubSpotContacts(limit=args.limit, interval=args.interval, latency=args.latency)
    server = VendorServer(hubspot=hubspot)
    server.start()
    print(server.url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
