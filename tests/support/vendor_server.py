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

Klaviyo and Mailchimp have stand-ins of the same kind: :class:`KlaviyoAccount` plays the bulk
profile import jobs (asynchronous: they complete after a delay, with import errors, or never)
and the subscription jobs; :class:`MailchimpAudience` the batch subscribe or unsubscribe, its
per-member errors and its limit of simultaneous connections. Each checks requests and answers
against an excerpt of its vendor's published OpenAPI description (``*.schema.json`` here)::

    account = KlaviyoAccount(job_delay=0.5, stuck={"slow@example.com"})
    vendor = VendorServer(klaviyo=account).start()   # or mailchimp=MailchimpAudience(...)

It runs on the tests' one loopback server (``loopback.py``): only 127.0.0.1 is bound. ``python
-m tests.support.vendor_server --hubspot`` runs the HubSpot stand-in alone (the bench's), prints
its URL and answers ``GET /__stats``.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import itertools
import json
import math
import re
import signal
import threading
import time
import urllib.parse
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
    def __init__(self, hubspot: HubSpotContacts | None = None,
                 klaviyo: KlaviyoAccount | None = None,
                 mailchimp: MailchimpAudience | None = None) -> None:
        self.hubspot = hubspot
        self.klaviyo = klaviyo
        self.mailchimp = mailchimp
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
        for stand_in in (self.klaviyo, self.mailchimp):
            if stand_in is None:
                continue
            if (request.method, request.path) == ("GET", "/__stats"):
                return ScriptedReply(200, json.dumps(stand_in.stats()).encode(),
                                     {"Content-Type": "application/json"})
            played = stand_in.answer(request)
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


# -- Klaviyo's bulk profile jobs -----------------------------------------------------------------

#: Klaviyo's published schemas of the operations the klaviyo driver calls.
KLAVIYO_SCHEMA = Path(__file__).with_name("klaviyo_bulk_jobs.schema.json")
KLAVIYO_IMPORT_JOBS = "/api/profile-bulk-import-jobs"
KLAVIYO_SUBSCRIBE = "/api/profile-subscription-bulk-create-jobs"
KLAVIYO_UNSUBSCRIBE = "/api/profile-subscription-bulk-delete-jobs"
KLAVIYO_PROFILE_IMPORT = "/api/profile-import"
_KLAVIYO_JOB = re.compile(r"^/api/profile-bulk-import-jobs/([^/]+)$")
_KLAVIYO_JOB_ERRORS = re.compile(r"^/api/profile-bulk-import-jobs/([^/]+)/import-errors$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def _or_null(schema: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema says it: the schema, or null."""
    if isinstance(schema, list):
        return [_or_null(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: _or_null(value) for key, value in schema.items()
                 if key != "nullable" or not isinstance(value, bool)}
    if schema.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


def _documented_only(schema: Any) -> Any:
    """Every object that lists its properties takes only those (the vendor's schemas leave
    ``additionalProperties`` open; a key they do not document is a mistake of the driver)."""
    if isinstance(schema, list):
        return [_documented_only(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _documented_only(value) for key, value in schema.items()}
    if "properties" in strict and "additionalProperties" not in strict:
        strict["additionalProperties"] = False
    return strict


class _OpenApiOperations:
    """Validators of a vendor's operations, from an excerpt of its published OpenAPI
    description (``{"operations": {id: {"request", "responses"}}, "$defs"}``): requests
    strictly (documented keys only), answers as published."""

    def __init__(self, path: Path) -> None:
        document = json.loads(path.read_text())
        self.document = document
        defs = _or_null(document["$defs"])
        strict_defs = _documented_only(defs)
        self.requests: dict[str, Any] = {}
        self.answers: dict[tuple[str, str], Any] = {}
        for name, operation in document["operations"].items():
            if operation.get("request") is not None:
                self.requests[name] = jsonschema_rs.validator_for(
                    {**_documented_only(_or_null(operation["request"])), "$defs": strict_defs})
            for status, schema in operation["responses"].items():
                if schema is not None:
                    self.answers[(name, status)] = jsonschema_rs.validator_for(
                        {**_or_null(schema), "$defs": defs})

    def request_problems(self, operation: str, body: Any) -> list[str]:
        return _problems(self.requests[operation], body)

    def answer_problems(self, operation: str, status: int, body: Any) -> list[str]:
        responses = self.document["operations"][operation]["responses"]
        key = next((k for k in (str(status), f"{str(status)[0]}XX", "default") if k in responses),
                   None)
        if key is None:
            return [f"{status} is not an answer the operation declares"]
        if responses[key] is None:
            return [] if body is None else [f"{status} declares no body"]
        return _problems(self.answers[(operation, key)], body)


def _problems(validator: Any, value: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.instance_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(value)]


@dataclass
class _ImportJob:
    id: str
    profiles: list[dict[str, Any]]  # each profile's attributes, in the request's order
    errors: list[dict[str, Any]]  # import-error resources
    created: float  # monotonic
    completes_at: float | None  # monotonic; None: never
    created_at: str = field(default_factory=lambda: _stamp())
    status: str = "queued"
    completed_at: str | None = None


class KlaviyoAccount:
    """What Klaviyo's profile endpoints do, as far as the klaviyo driver depends on them
    (sources in docs/destinations.md#klaviyo-marketing):

    - ``Authorization: Klaviyo-API-Key <key>`` (401 otherwise), a ``revision`` header and
      ``application/vnd.api+json`` (400 / 415 otherwise), a body that matches the published
      request schema with documented keys only (400 otherwise, the mismatch also kept in
      :attr:`problems`); each answer is checked against the published answer schema too;
    - each operation's published rate limit (``x-klaviyo-ratelimit``: burst per second,
      steady per minute, fixed windows): past it, 429 with Klaviyo's body and ``Retry-After``;
    - ``POST /api/profile-bulk-import-jobs`` (at most 10,000 profiles and 5 MB): 202 and a
      job, ``queued`` then ``processing``, ``complete`` ``job_delay`` seconds later (its valid
      profiles written then); a profile whose email is in ``stuck`` makes a job that never
      completes. A profile with an invalid email or a phone number not in E.164 is an import
      error of its job (``GET …/{id}/import-errors``, paged), with its ``source.pointer`` and,
      unless ``error_payloads`` is off, its ``original_payload``;
    - the bulk subscribe (≤ 1,000) and unsubscribe (≤ 100) jobs: 202 without a body, applied
      at once (they cannot be followed); an unsubscribe naming a list unsubscribes the
      profiles in it from that list and every other profile globally, as the spec warns;
    - ``POST /api/profile-import``: one profile, 201 created / 200 updated, 400 for an
      invalid email or phone;
    - ``latency`` seconds per request.
    """

    def __init__(self, api_key: str | None = None, job_delay: float = 0.0,
                 latency: float = 0.0, stuck: set[str] | None = None,
                 error_payloads: bool = True, limits: bool = True) -> None:
        self.api_key = api_key
        self.job_delay = job_delay
        self.latency = latency
        self.stuck = {email.lower() for email in stuck or ()}
        self.error_payloads = error_payloads
        self.limits = limits
        self.schema = _OpenApiOperations(KLAVIYO_SCHEMA)
        self.profiles: dict[str, dict[str, Any]] = {}  # lower-cased email (or phone) -> attrs
        self.profile_ids: dict[str, str] = {}
        self.email_consent: dict[str, str] = {}  # lower-cased email -> SUBSCRIBED/UNSUBSCRIBED
        self.sms_consent: dict[str, str] = {}  # phone -> SUBSCRIBED/UNSUBSCRIBED
        self.list_members: collections.defaultdict[str, set[str]] = (
            collections.defaultdict(set))
        self.list_suppressed: collections.defaultdict[str, set[str]] = (
            collections.defaultdict(set))
        self.jobs: dict[str, _ImportJob] = {}
        self.problems: list[str] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.job_sizes: list[int] = []  # profiles per import job
        self._windows: dict[tuple[str, str, int], int] = collections.Counter()
        self._lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "profiles": len(self.profiles),
                    "job_sizes": list(self.job_sizes), "problems": list(self.problems)}

    # -- routing ---------------------------------------------------------------------------

    def answer(self, request: RecordedRequest) -> ScriptedReply | None:
        path, _, query = request.path.partition("?")
        operation, job_id = self._route(request.method, path)
        if operation is None:
            return None
        with self._lock:
            self.counts["requests"] += 1
            self.counts[operation] += 1
            refused = self._refuse(request, operation)
            if refused is not None:
                return refused
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            if operation == "bulk_import_profiles":
                return self._create_job(request)
            if operation == "get_bulk_import_profiles_job":
                return self._job(job_id, request)
            if operation == "get_errors_for_bulk_import_profiles_job":
                return self._job_errors(job_id, request, urllib.parse.parse_qs(query))
            if operation == "create_or_update_profile":
                return self._profile_import(request)
            return self._subscription_job(request, operation)

    @staticmethod
    def _route(method: str, path: str) -> tuple[str | None, str | None]:
        if method == "POST":
            return {KLAVIYO_IMPORT_JOBS: "bulk_import_profiles",
                    KLAVIYO_SUBSCRIBE: "bulk_subscribe_profiles",
                    KLAVIYO_UNSUBSCRIBE: "bulk_unsubscribe_profiles",
                    KLAVIYO_PROFILE_IMPORT: "create_or_update_profile"}.get(path), None
        if method == "GET":
            if match := _KLAVIYO_JOB_ERRORS.match(path):
                return "get_errors_for_bulk_import_profiles_job", match.group(1)
            if match := _KLAVIYO_JOB.match(path):
                return "get_bulk_import_profiles_job", match.group(1)
        return None, None

    def _refuse(self, request: RecordedRequest, operation: str) -> ScriptedReply | None:
        """Authentication, headers and the operation's rate limit."""
        key = (request.header("authorization") or "").removeprefix("Klaviyo-API-Key ")
        if not key or key == request.header("authorization") or (
                self.api_key is not None and key != self.api_key):
            return self._error(operation, 401, "not_authenticated",
                               "Authentication credentials were not provided.",
                               "Missing or invalid private key.")
        if not request.header("revision"):
            self.problems.append(f"{operation}: no revision header")
            return self._error(operation, 400, "invalid", "Invalid input.",
                               "The revision header is required.")
        if request.header("accept") != "application/vnd.api+json" or (
                request.method == "POST"
                and request.header("content-type") != "application/vnd.api+json"):
            self.problems.append(f"{operation}: not application/vnd.api+json")
            return self._error(operation, 415, "unsupported_media_type",
                               "Unsupported media type.", "Use application/vnd.api+json.")
        if self.limits:
            wait = self._throttled(operation)
            if wait:
                self.counts["rate_limited"] += 1
                return self._error(operation, 429, "throttled", "Request was throttled.",
                                   f"Request was throttled. Expected available in {wait} "
                                   "seconds.", headers={"Retry-After": str(wait)})
        return None

    def _throttled(self, operation: str) -> int:
        """Seconds until the operation may be called again (0: now, and counted)."""
        limits = self.schema.document["operations"][operation]["rate_limit"]
        now = time.time()
        windows = []
        for name, size in (("burst", 1), ("steady", 60)):
            count, unit = limits[name].split("/")
            per = {"s": 1, "m": 60}[unit]
            assert per == size
            slot = (operation, name, int(now // size))
            if self._windows[slot] >= int(count):
                return max(1, math.ceil((slot[2] + 1) * size - now))
            windows.append(slot)
        for slot in windows:
            self._windows[slot] += 1
        return 0

    # -- the operations --------------------------------------------------------------------

    def _body(self, request: RecordedRequest, operation: str) -> tuple[Any, ScriptedReply | None]:
        try:
            body = json.loads(request.body)
        except ValueError:
            return None, self._error(operation, 400, "invalid", "Invalid input.",
                                     "The body is not JSON.")
        problems = self.schema.request_problems(operation, body)
        if problems:
            self.problems += [f"request {operation} {p}" for p in problems]
            pointer = "/" + problems[0].split(":")[0].replace("(top)", "")
            return None, self._error(operation, 400, "invalid", "Invalid input.", problems[0],
                                     source={"pointer": pointer})
        return body, None

    def _create_job(self, request: RecordedRequest) -> ScriptedReply:
        operation = "bulk_import_profiles"
        if len(request.body) > 5 * 1024 * 1024:
            return self._error(operation, 413, "too_large", "Payload too large.",
                               "The maximum allowed payload size is 5MB.")
        body, refused = self._body(request, operation)
        if refused is not None:
            return refused
        profiles = [p["attributes"] for p in body["data"]["attributes"]["profiles"]["data"]]
        if len(profiles) > 10_000:
            return self._error(operation, 400, "invalid", "Invalid input.",
                               "Accepts up to 10,000 profiles per request.",
                               source={"pointer": "/data/attributes/profiles/data"})
        keys = [_profile_key(p) for p in profiles]
        if len(set(keys)) != len(keys):
            self.problems.append(f"{operation}: a profile named twice in one job")
        errors = [error for index, attributes in enumerate(profiles)
                  if (error := self._import_error(index, attributes)) is not None]
        stuck = any(str(p.get("email") or "").lower() in self.stuck for p in profiles)
        now = time.monotonic()
        job = _ImportJob(uuid.uuid4().hex[:16], profiles, errors, now,
                         None if stuck else now + self.job_delay)
        self.jobs[job.id] = job
        self.job_sizes.append(len(profiles))
        self.counts["jobs"] += 1
        return self._reply(operation, 202, {"data": self._job_resource(job, request)})

    def _import_error(self, index: int, attributes: Mapping[str, Any]) -> dict[str, Any] | None:
        email, phone = attributes.get("email"), attributes.get("phone_number")
        if email is not None and not _EMAIL.match(str(email)):
            field_name, detail = "email", f"Invalid email address: {email}"
        elif phone is not None and not _E164.match(str(phone)):
            field_name, detail = ("phone_number", "Invalid phone number format (Example of a "
                                  "valid format: +12345678901)")
        elif email is None and phone is None and not attributes.get("external_id"):
            field_name, detail = "", "A profile needs an email, a phone number or an external_id."
        else:
            return None
        pointer = f"/data/attributes/profiles/data/{index}/attributes"
        error: dict[str, Any] = {
            "type": "import-error", "id": str(uuid.uuid4()),
            "attributes": {"code": "invalid", "title": "Invalid input.", "detail": detail,
                           "source": {"pointer": f"{pointer}/{field_name}".rstrip("/")}}}
        if self.error_payloads:
            error["attributes"]["original_payload"] = dict(attributes)
        return error

    def _advance(self, job: _ImportJob) -> None:
        if job.status in ("complete", "cancelled"):
            return
        now = time.monotonic()
        if job.completes_at is not None and now >= job.completes_at:
            failed = {int(e["attributes"]["source"]["pointer"].split("/")[5])
                      for e in job.errors}
            for index, attributes in enumerate(job.profiles):
                if index not in failed:
                    self._write(attributes)
            self.counts["profiles_imported"] += len(job.profiles) - len(failed)
            self.counts["import_errors"] += len(failed)
            job.status, job.completed_at = "complete", _stamp()
        elif now - job.created >= min(0.05, self.job_delay / 2):
            job.status = "processing"

    def _job_resource(self, job: _ImportJob, request: RecordedRequest) -> dict[str, Any]:
        done = job.status == "complete"
        return {"type": "profile-bulk-import-job", "id": job.id,
                "attributes": {"status": job.status, "created_at": job.created_at,
                               "total_count": len(job.profiles),
                               "completed_count": len(job.profiles) - len(job.errors)
                               if done else 0,
                               "failed_count": len(job.errors) if done else 0,
                               "completed_at": job.completed_at, "expires_at": None,
                               "started_at": job.created_at if job.status != "queued" else None},
                "links": {"self": f"{_origin(request)}{KLAVIYO_IMPORT_JOBS}/{job.id}"}}

    def _job(self, job_id: str | None, request: RecordedRequest) -> ScriptedReply:
        operation = "get_bulk_import_profiles_job"
        job = self.jobs.get(job_id or "")
        if job is None:
            return self._error(operation, 404, "not_found", "Not found.",
                               f"A profile-bulk-import-job with id {job_id} was not found.")
        self._advance(job)
        return self._reply(operation, 200, {"data": self._job_resource(job, request),
                                            "links": {"self": _origin(request) + request.path}})

    def _job_errors(self, job_id: str | None, request: RecordedRequest,
                    query: Mapping[str, list[str]]) -> ScriptedReply:
        operation = "get_errors_for_bulk_import_profiles_job"
        job = self.jobs.get(job_id or "")
        if job is None:
            return self._error(operation, 404, "not_found", "Not found.",
                               f"A profile-bulk-import-job with id {job_id} was not found.")
        size = int((query.get("page[size]") or ["20"])[0])
        if not 1 <= size <= 100:
            return self._error(operation, 400, "invalid", "Invalid input.",
                               "page[size] must be between 1 and 100.",
                               source={"parameter": "page[size]"})
        start = int((query.get("page[cursor]") or ["0"])[0])
        self._advance(job)
        listed = job.errors if job.status == "complete" else []
        page = listed[start:start + size]
        base = f"{_origin(request)}{KLAVIYO_IMPORT_JOBS}/{job.id}/import-errors"
        links = {"self": f"{base}?page%5Bsize%5D={size}&page%5Bcursor%5D={start}"}
        if start + size < len(listed):
            links["next"] = f"{base}?page%5Bsize%5D={size}&page%5Bcursor%5D={start + size}"
        return self._reply(operation, 200, {"data": page, "links": links})

    def _profile_import(self, request: RecordedRequest) -> ScriptedReply:
        operation = "create_or_update_profile"
        body, refused = self._body(request, operation)
        if refused is not None:
            return refused
        attributes = body["data"]["attributes"]
        error = self._import_error(0, attributes)
        if error is not None:
            pointer = error["attributes"]["source"]["pointer"].replace(
                "/profiles/data/0/attributes", "")
            return self._error(operation, 400, "invalid", "Invalid input.",
                               error["attributes"]["detail"], source={"pointer": pointer})
        new = _profile_key(attributes) not in self.profiles
        self._write(attributes)
        self.counts["profiles_imported"] += 1
        key = _profile_key(attributes)
        return self._reply(operation, 201 if new else 200, {"data": {
            "type": "profile", "id": self.profile_ids[key],
            "attributes": {k: v for k, v in self.profiles[key].items()},
            "links": {"self": f"{_origin(request)}/api/profiles/{self.profile_ids[key]}/"}}})

    def _subscription_job(self, request: RecordedRequest, operation: str) -> ScriptedReply:
        body, refused = self._body(request, operation)
        if refused is not None:
            return refused
        data = body["data"]
        profiles = data["attributes"]["profiles"]["data"]
        most = 1000 if operation == "bulk_subscribe_profiles" else 100
        if len(profiles) > most:
            return self._error(operation, 400, "invalid", "Invalid input.",
                               f"Maximum number of profiles per call: {most}",
                               source={"pointer": "/data/attributes/profiles/data"})
        list_id = ((data.get("relationships") or {}).get("list") or {}).get("data", {}).get("id")
        for profile in profiles:
            self._consent(profile["attributes"], list_id)
        self.counts[f"{operation}_profiles"] += len(profiles)
        return self._reply(operation, 202, None)

    def _consent(self, attributes: Mapping[str, Any], list_id: str | None) -> None:
        email = str(attributes.get("email") or "").lower()
        phone = str(attributes.get("phone_number") or "")
        for channel, consent in _consents(attributes.get("subscriptions") or {}):
            who, book = (email, self.email_consent) if channel == "email" else (
                phone, self.sms_consent)
            if not who:
                continue
            if consent == "SUBSCRIBED":
                book[who] = consent
                if list_id:
                    self.list_members[list_id].add(who)
                    self.list_suppressed[list_id].discard(who)
            elif list_id and who in self.list_members[list_id]:
                self.list_members[list_id].discard(who)
                self.list_suppressed[list_id].add(who)
            else:  # no list, or not in it: "globally unsubscribed" (the spec's warning)
                book[who] = consent

    def _write(self, attributes: Mapping[str, Any]) -> None:
        key = _profile_key(attributes)
        self.profile_ids.setdefault(key, "01" + uuid.uuid4().hex[:24].upper())
        stored = self.profiles.setdefault(key, {})
        stored.update({k: v for k, v in attributes.items() if k != "properties"})
        if isinstance(attributes.get("properties"), dict):
            stored.setdefault("properties", {}).update(attributes["properties"])

    # -- answers ---------------------------------------------------------------------------

    def _error(self, operation: str, status: int, code: str, title: str, detail: str,
               headers: Mapping[str, str] | None = None, **extra: Any) -> ScriptedReply:
        return self._reply(operation, status, {"errors": [{
            "id": str(uuid.uuid4()), "status": status, "code": code, "title": title,
            "detail": detail, **extra}]}, headers)

    def _reply(self, operation: str, status: int, body: Any,
               headers: Mapping[str, str] | None = None) -> ScriptedReply:
        self.problems += [f"answer {operation} {status} {p}"
                          for p in self.schema.answer_problems(operation, status, body)]
        self.counts[f"status_{status}"] += 1
        all_headers = dict(headers or {})
        if body is None:
            return ScriptedReply(status, b"", all_headers)
        all_headers["Content-Type"] = "application/vnd.api+json"
        return ScriptedReply(status, json.dumps(body).encode(), all_headers)


def _profile_key(attributes: Mapping[str, Any]) -> str:
    return str(attributes.get("email") or attributes.get("phone_number")
               or attributes.get("external_id") or "").lower()


def _consents(subscriptions: Mapping[str, Any]) -> list[tuple[str, str]]:
    found = []
    for channel in ("email", "sms"):
        marketing = (subscriptions.get(channel) or {}).get("marketing") or {}
        if marketing.get("consent"):
            found.append((channel, str(marketing["consent"])))
    return found


def _origin(request: RecordedRequest) -> str:
    return f"http://{request.header('host') or '127.0.0.1'}"


# -- Mailchimp's batch subscribe or unsubscribe -------------------------------------------------

#: Mailchimp's published schemas of the operations the mailchimp driver calls.
MAILCHIMP_SCHEMA = Path(__file__).with_name("mailchimp_batch_members.schema.json")
_MAILCHIMP_LIST = re.compile(r"^/3\.0/lists/([^/]+)$")
_MAILCHIMP_MEMBER = re.compile(r"^/3\.0/lists/([^/]+)/members/([0-9a-f]{32})(/tags)?$")
_MC_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MC_BIRTHDAY = re.compile(r"^(0[1-9]|1[0-2])/(0[1-9]|[12]\d|3[01])$")


class MailchimpAudience:
    """What Mailchimp's audience endpoints do, as far as the mailchimp driver depends on them
    (sources in docs/destinations.md#mailchimp-marketing):

    - basic auth with the API key as password (401 ``API Key Invalid`` otherwise), a body that
      matches the published request schema with documented keys only (400 otherwise, the
      mismatch also kept in :attr:`problems`); each answer checked against the published
      answer schema too;
    - at most ``connections`` requests at once (Mailchimp's 10 simultaneous connections per
      account): past them, 429 ``Too Many Requests``;
    - ``POST /3.0/lists/{list_id}`` (at most 500 members): each member written or refused on
      its own, refusals in ``errors[]`` inside a 200: an invalid email, a merge tag the
      audience does not have (``merge_fields``: tag -> type) or a value its type refuses, a
      new member without a status (``status`` or ``status_if_new``), an existing member
      without ``update_existing``; an existing member's status changes only with ``status``;
    - ``POST …/members/{hash}/tags`` (204) and ``DELETE …/members/{hash}`` (archive, 204;
      404 for a member not there);
    - ``latency`` seconds per request, and ``member_latency`` more per member of a batch.
    """

    def __init__(self, list_id: str = "a1b2c3d4e5", api_key: str | None = None,
                 merge_fields: Mapping[str, str] | None = None, latency: float = 0.0,
                 connections: int = 10, member_latency: float = 0.0) -> None:
        self.list_id = list_id
        self.member_latency = member_latency
        self.api_key = api_key
        self.merge_types = dict(merge_fields if merge_fields is not None else
                                {"FNAME": "text", "LNAME": "text", "PHONE": "phone"})
        self.latency = latency
        self.connections = connections
        self.schema = _OpenApiOperations(MAILCHIMP_SCHEMA)
        self.members: dict[str, dict[str, Any]] = {}  # lower-cased email -> member
        self.tags: collections.defaultdict[str, set[str]] = collections.defaultdict(set)
        self.problems: list[str] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.batch_sizes: list[int] = []
        self.most_at_once = 0
        self._open = 0
        self._lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "members": len(self.members),
                    "batch_sizes": list(self.batch_sizes), "most_at_once": self.most_at_once,
                    "problems": list(self.problems)}

    def answer(self, request: RecordedRequest) -> ScriptedReply | None:
        path = request.path.partition("?")[0]
        operation, list_id, member_hash = self._route(request.method, path)
        if operation is None:
            return None
        with self._lock:
            self.counts["requests"] += 1
            if not self._authenticated(request):
                return self._problem(operation, 401, "API Key Invalid",
                                     "Your API key may be invalid, or you've attempted to "
                                     "access the wrong datacenter.")
            if self._open >= self.connections:
                self.counts["rate_limited"] += 1
                return self._problem(operation, 429, "Too Many Requests",
                                     f"You have exceeded the limit of {self.connections} "
                                     "simultaneous connections.")
            self._open += 1
            self.most_at_once = max(self.most_at_once, self._open)
        try:
            members = (request.body.count(b'"email_address"')
                       if operation == "postListsId" else 0)
            if self.latency or self.member_latency:
                time.sleep(self.latency + self.member_latency * members)
            with self._lock:
                if list_id != self.list_id:
                    return self._problem(operation, 404, "Resource Not Found",
                                         "The requested resource could not be found.")
                if operation == "postListsId":
                    return self._batch(request)
                if operation == "postListMemberTags":
                    return self._add_tags(request, member_hash or "")
                return self._archive(member_hash or "")
        finally:
            with self._lock:
                self._open -= 1

    @staticmethod
    def _route(method: str, path: str) -> tuple[str | None, str | None, str | None]:
        if method == "POST" and (match := _MAILCHIMP_LIST.match(path)):
            return "postListsId", match.group(1), None
        match = _MAILCHIMP_MEMBER.match(path)
        if match and method == "POST" and match.group(3):
            return "postListMemberTags", match.group(1), match.group(2)
        if match and method == "DELETE" and not match.group(3):
            return "deleteListsIdMembersId", match.group(1), match.group(2)
        return None, None, None

    def _authenticated(self, request: RecordedRequest) -> bool:
        header = request.header("authorization") or ""
        if not header.startswith("Basic "):
            return False
        try:
            _, _, key = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return bool(key) and (self.api_key is None or key == self.api_key)

    def _body(self, request: RecordedRequest, operation: str) -> tuple[Any, ScriptedReply | None]:
        try:
            body = json.loads(request.body)
        except ValueError:
            return None, self._problem(operation, 400, "JSON Parse Error",
                                       "We encountered an unspecified JSON parsing error.")
        problems = self.schema.request_problems(operation, body)
        if problems:
            self.problems += [f"request {operation} {p}" for p in problems]
            return None, self._problem(operation, 400, "Invalid Resource", problems[0])
        return body, None

    def _batch(self, request: RecordedRequest) -> ScriptedReply:
        operation = "postListsId"
        body, refused = self._body(request, operation)
        if refused is not None:
            return refused
        members = body["members"]
        if len(members) > 500:
            return self._problem(operation, 400, "Invalid Resource",
                                 "Up to 500 members may be added or updated with each API call.")
        self.batch_sizes.append(len(members))
        seen: set[str] = set()
        answer: dict[str, Any] = {"new_members": [], "updated_members": [], "errors": []}
        for item in members:
            email = str(item.get("email_address") or "")
            if email.lower() in seen:
                self.problems.append(f"{operation}: {email} twice in one request")
            seen.add(email.lower())
            error = self._member_error(item, body.get("update_existing") is True)
            if error is not None:
                answer["errors"].append({"email_address": email, **error})
                continue
            new = email.lower() not in self.members or self.members[email.lower()].get(
                "status") == "archived"  # an archived member comes back as a new one
            stored = self.members.setdefault(email.lower(), {
                "id": hashlib.md5(email.lower().encode(), usedforsecurity=False).hexdigest(),
                "email_address": email, "list_id": self.list_id, "merge_fields": {}})
            stored["status"] = item.get("status") or (
                item["status_if_new"] if new else stored["status"])
            stored["merge_fields"].update(item.get("merge_fields") or {})
            answer["new_members" if new else "updated_members"].append(
                {**stored, "merge_fields": dict(stored["merge_fields"])})
        answer["total_created"] = len(answer["new_members"])
        answer["total_updated"] = len(answer["updated_members"])
        answer["error_count"] = len(answer["errors"])
        answer["errors"].reverse()  # nothing ties an error to its member but its address
        self.counts["written"] += answer["total_created"] + answer["total_updated"]
        self.counts["refused_members"] += answer["error_count"]
        return self._reply(operation, 200, answer)

    def _member_error(self, item: Mapping[str, Any], update: bool) -> dict[str, str] | None:
        email = str(item.get("email_address") or "")
        if not _EMAIL.match(email):
            return {"error": "Please provide a valid email address.",
                    "error_code": "ERROR_GENERIC", "field": "email_address",
                    "field_message": "Please provide a valid email address."}
        known = self.members.get(email.lower())
        if known is not None and known["status"] == "archived":
            known = None
        if known is not None and not update:
            return {"error": f"{email} is already a list member. Use PUT to insert or update "
                    "list members.", "error_code": "ERROR_CONTACT_EXISTS"}
        if known is None and not (item.get("status") or item.get("status_if_new")):
            return {"error": "The resource submitted could not be validated: status is "
                    "required for a new member.", "error_code": "ERROR_GENERIC",
                    "field": "status"}
        for tag, value in (item.get("merge_fields") or {}).items():
            kind = self.merge_types.get(tag)
            why_not = ("the audience has no such merge field" if kind is None
                       else _merge_type_problem(kind, value))
            if why_not:
                return {"error": f"Your merge fields were invalid: {tag}: {why_not}",
                        "error_code": "ERROR_GENERIC", "field": f"merge_fields.{tag}",
                        "field_message": why_not}
        return None

    def _add_tags(self, request: RecordedRequest, member_hash: str) -> ScriptedReply:
        operation = "postListMemberTags"
        body, refused = self._body(request, operation)
        if refused is not None:
            return refused
        member = next((m for m in self.members.values() if m["id"] == member_hash), None)
        if member is None:
            return self._problem(operation, 404, "Resource Not Found",
                                 "The requested resource could not be found.")
        for tag in body["tags"]:
            if tag.get("status") == "active":
                self.tags[member["email_address"].lower()].add(tag["name"])
        return self._reply(operation, 204, None)

    def _archive(self, member_hash: str) -> ScriptedReply:
        operation = "deleteListsIdMembersId"
        email = next((e for e, m in self.members.items() if m["id"] == member_hash), None)
        if email is None:
            return self._problem(operation, 404, "Resource Not Found",
                                 "The requested resource could not be found.")
        self.members[email]["status"] = "archived"
        self.counts["archived"] += 1
        return self._reply(operation, 204, None)

    def _problem(self, operation: str, status: int, title: str, detail: str) -> ScriptedReply:
        return self._reply(operation, status, {
            "type": "https://mailchimp.com/developer/marketing/docs/errors/", "title": title,
            "status": status, "detail": detail, "instance": str(uuid.uuid4())},
            content_type="application/problem+json")

    def _reply(self, operation: str, status: int, body: Any,
               content_type: str = "application/json") -> ScriptedReply:
        self.problems += [f"answer {operation} {status} {p}"
                          for p in self.schema.answer_problems(operation, status, body)]
        self.counts[f"status_{status}"] += 1
        if body is None:
            return ScriptedReply(status, b"", {})
        return ScriptedReply(status, json.dumps(body).encode(), {"Content-Type": content_type})


def _merge_type_problem(kind: str, value: Any) -> str | None:
    """Why a merge field of type ``kind`` refuses ``value`` (None: it takes it)."""
    if kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == "address":
        ok = isinstance(value, dict) and all(value.get(k) for k in ("addr1", "city", "state",
                                                                     "zip"))
    elif kind == "date":
        ok = isinstance(value, str) and bool(_MC_DATE.match(value))
    elif kind == "birthday":
        ok = isinstance(value, str) and bool(_MC_BIRTHDAY.match(value))
    elif kind in ("url", "imageurl"):
        ok = isinstance(value, str) and value.startswith(("http://", "https://"))
    elif kind == "zip":
        ok = isinstance(value, str) and bool(re.match(r"^\d{5}(-\d{4})?$", value))
    else:  # text, phone, radio, dropdown
        ok = isinstance(value, str)
    return None if ok else f"{value!r} is not a valid {kind}"


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
