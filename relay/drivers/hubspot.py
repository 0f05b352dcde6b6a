"""HubSpot CRM: upsert leads as contacts, keyed by email, up to 100 a request (CRM v3 batch
upsert).

YAML::

    - name: crm
      type: hubspot
      access_token: ${HUBSPOT_TOKEN}        # private app token, scope crm.objects.contacts.write
      events: [new_signup, referral, score_change, verified]
      properties:                           # contact property -> dotted lead path
        company: custom_fields.company
        kickofflabs_rank: null              # turn a default off
      # batch: {max: 100, wait: 200ms}      # the defaults; rate_limit 9/s, concurrency 4

The ``kickofflabs_*`` defaults are custom contact properties: create them in HubSpot (single-
line text / number / checkbox) or turn them off, else HubSpot refuses the whole contact.

One request carries a batch: ``POST /crm/v3/objects/contacts/batch/upsert`` with one input per
email (``idProperty: email``, every property value a string) and a unique
``objectWriteTraceId`` per input. Events of the same email in a batch are merged into one input
in the order the relay received them (the newest value of each property wins: HubSpot refuses
a batch that names an email twice), and each of them is answered by that input. HubSpot's
answer is mapped back per input, never by position: a result by its ``objectWriteTraceId`` (or
its lower-cased email), a ``207``'s ``errors[]`` by the trace ids in their ``context``. A
``400`` that refuses the whole batch for some of its inputs is split (:meth:`_split`), so the
good inputs still go.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from marshmallow import Schema, fields, validate

from relay.core.errors import (
    BudgetSpentError,
    DeliveryError,
    PermanentDeliveryError,
    RetryableDeliveryError,
)
from relay.core.models import DeliveryResult, Destination, LeadEvent, account_day
from relay.drivers.base import Answer, Answers, BulkDriver
from relay.drivers.http import (
    RETRYABLE_STATUSES,
    HttpClient,
    HttpResponse,
    parse_retry_after,
)
from relay.drivers.mapping import (
    apply_mapping,
    lead_email,
    mapping_field,
    raise_vendor_error,
    resolve_mapping,
)

UPSERT_PATH = "/crm/v3/objects/contacts/batch/upsert"

DEFAULT_PROPERTIES: dict[str, str] = {
    "firstname": "first_name",
    "lastname": "family_name",
    "phone": "phone_number",
    "kickofflabs_rank": "rank",
    "kickofflabs_referral_link": "social_url",
    "kickofflabs_score": "contest_score",
    "kickofflabs_verified": "verified",
    "kickofflabs_opted_out": "opted_out",
}

# HubSpot counts requests in a rolling ten-second window; when a 429 names no wait, one
# window is the shortest wait that can help.
_DEFAULT_RATE_LIMIT_WAIT = 10.0
# The daily allowance resets at midnight in the account's own time zone, which the API does
# not tell us: without an ``account_timezone``, a DAILY 429 holds the budget an hour at most.
_DAILY_LIMIT_WAIT = 3600.0
# HubSpot's error-handling guide: 423 Locked comes from syncing a large volume in a short time
# and the lock lasts 2 seconds, so wait at least that; 477 Migration in Progress comes while
# the account moves between data-hosting locations, with a Retry-After (up to about 24 hours).
RETRYABLE_ANSWERS: dict[int, float | None] = {423: 2.0, 477: None}
#: The most inputs one batch upsert takes (HubSpot's batch endpoints answer 400 past it).
MAX_INPUTS = 100
#: The most requests one batch may take while a whole-batch 400 is split (about two per bad
#: input in a batch of 100); what is left then is retried on the schedule.
MAX_SPLIT_REQUESTS = 16
#: The least time a request of a split is given; with less of the send's timeout left, the
#: rest of the batch is retried instead.
MIN_REQUEST_TIME = 1.0
#: Error categories of a 207's ``errors[]`` worth retrying when their ``status`` is not an
#: HTTP status (every other category, e.g. VALIDATION_ERROR, is the contact's own problem).
RETRYABLE_CATEGORIES = frozenset({"RATE_LIMITS", "LOCKED", "INTERNAL_ERROR", "UNKNOWN_ERROR",
                                  "TIMEOUT", "SERVICE_UNAVAILABLE"})


@dataclass
class _Input:
    """One contact of a batch: the merged properties of its events (newest last)."""

    email: str
    properties: dict[str, str]
    events: list[int] = field(default_factory=list)  # indexes into the batch, oldest first
    trace: str = ""  # objectWriteTraceId: unique in the request

    @property
    def key(self) -> str:
        return self.email.lower()

    def body(self) -> dict[str, Any]:
        return {"idProperty": "email", "id": self.email, "objectWriteTraceId": self.trace,
                "properties": self.properties}


@dataclass
class _Requests:
    """The requests of one send: how many were made, and when the send's time is up (its
    ``timeout`` in all, however many requests a split takes: the delivery's lease is the
    timeout and a margin, so a send that outlived it would be taken over and sent again)."""

    deadline: float
    made: int = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()


class HubSpotOptions(Schema):
    access_token = fields.String(required=True, validate=validate.Length(min=1))
    properties = mapping_field()


class HubSpotDriver(BulkDriver):
    type_name = "hubspot"
    # HubSpot answers 429 past 100 requests per rolling 10 s (private apps, Free and Starter).
    # The relay's windows are fixed and aligned: 9 a second puts at most 99 in any 10 s.
    default_rate_limit = "9/s"
    # 250,000 requests a day per account on Free and Starter (more on the higher tiers).
    default_daily_limit = 250_000
    # A private app's token: destinations with the same one share its budget.
    account_fields = ("access_token",)
    default_concurrency = 4  # requests in flight: 4 x ~100-300 ms is far above 9/s
    max_batch = MAX_INPUTS
    default_batch_wait = 0.2
    options_schema = HubSpotOptions
    secret_fields = frozenset({"access_token"})
    default_base_url = "https://api.hubapi.com"
    retryable_answers = RETRYABLE_ANSWERS

    def __init__(self, destination: Destination, http: HttpClient | None = None) -> None:
        super().__init__(destination, http)
        self.properties = resolve_mapping(DEFAULT_PROPERTIES, self.options.get("properties"))
        self.properties.pop("email", None)  # the email is the upsert key, always sent as is

    def send_batch(self, events: Sequence[LeadEvent]) -> Answers:
        answers: list[Answer | None] = [None] * len(events)
        inputs: dict[str, _Input] = {}
        # In the order the relay received them, so the newest value of a property wins.
        for index in sorted(range(len(events)), key=lambda i: events[i].received_at):
            event = events[index]
            if event.name == "deleted":
                # Removing a lead from a campaign is no reason to delete a CRM contact.
                answers[index] = DeliveryResult(
                    skipped=True, detail="deleted events leave HubSpot contacts")
                continue
            email = lead_email(event.payload)
            if email is None:
                answers[index] = DeliveryResult(
                    skipped=True,
                    detail="lead has no email; HubSpot contacts are upserted by email")
                continue
            if "@" not in email[1:-1] or any(c.isspace() for c in email):
                answers[index] = PermanentDeliveryError(
                    f"{email!r} is not an email address; HubSpot upserts contacts by email")
                continue
            properties = {name: _property_value(value)
                          for name, value in apply_mapping(self.properties, event.payload).items()}
            merged = inputs.get(email.lower())
            if merged is None:
                merged = inputs[email.lower()] = _Input(email, {})
            merged.email = email
            merged.properties.update(properties)
            merged.properties["email"] = email
            merged.events.append(index)
            merged.trace = event.event_id  # the newest event's id: unique in the batch
        requests = _Requests(time.monotonic() + self.timeout)
        if inputs:
            outcome = self._upsert(list(inputs.values()), requests)
            for merged in inputs.values():
                answer = outcome[merged.trace]
                if isinstance(answer, DeliveryResult) and len(merged.events) > 1:
                    answer = DeliveryResult(
                        answer.status_code, f"{answer.detail} (with {len(merged.events) - 1} "
                        "other event(s) of this email, merged into one input)")
                for index in merged.events:
                    answers[index] = answer
        return Answers([a for a in answers if a is not None], requests=requests.made)

    # -- one request, and what its answer says of each input --------------------------------

    def _upsert(self, inputs: list[_Input], requests: _Requests) -> dict[str, Answer]:
        """Each input's answer (by trace id) from one request, or from the requests a whole-
        batch 400 is split into."""
        requests.made += 1
        try:
            response = self.http.request(
                "POST",
                self.base_url + UPSERT_PATH,
                body=json.dumps({"inputs": [i.body() for i in inputs]}).encode(),
                headers={
                    "Authorization": f"Bearer {self.options['access_token']}",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                },
                timeout=max(requests.left(), MIN_REQUEST_TIME),
            )
        except DeliveryError as exc:  # no answer (timeout, connection): the same for all
            return {i.trace: exc for i in inputs}
        answer = response.json_object()
        if 200 <= response.status < 300:
            return self._per_input(inputs, response, answer)
        if response.status == 400 and len(inputs) > 1:
            return self._split(inputs, response, answer, requests)
        error = self._error(response, answer)
        return {i.trace: error for i in inputs}

    def _per_input(self, inputs: list[_Input], response: HttpResponse,
                   answer: Mapping[str, Any]) -> dict[str, Answer]:
        """A 200 or 207: results and ``errors[]`` tied to their inputs by trace id (or the
        lower-cased email HubSpot echoes), never by position (HubSpot does not keep the
        order). An input no error names is upserted; when an error names no input, the
        inputs it may be about are retried."""
        by_trace = {i.trace: i for i in inputs}
        by_email = {i.key: i for i in inputs}
        out: dict[str, Answer] = {}
        for result in _dicts(answer.get("results")):
            found = by_trace.get(str(result.get("objectWriteTraceId") or ""))
            if found is None:
                echoed = result.get("properties")
                email = echoed.get("email") if isinstance(echoed, dict) else None
                found = by_email.get(str(email or "").lower())
            if found is not None:
                verb = "created" if result.get("new") else "updated"
                out[found.trace] = DeliveryResult(
                    response.status, f"contact {result.get('id', found.email)} {verb}")
        unplaced: list[Mapping[str, Any]] = []
        for error in _dicts(answer.get("errors")):
            named = _named(error, by_trace, by_email)
            for item in named:
                out[item.trace] = self._input_error(error, response.status)
            if not named:
                unplaced.append(error)
        left = [i for i in inputs if i.trace not in out]
        for item in left:
            if not unplaced:
                out[item.trace] = DeliveryResult(response.status, "contact upserted")
            elif len(left) == 1 and len(unplaced) == 1:
                out[item.trace] = self._input_error(unplaced[0], response.status)
            else:
                out[item.trace] = RetryableDeliveryError(
                    f"HubSpot reported {len(unplaced)} error(s) it did not tie to a contact "
                    f"(first: {_error_text(unplaced[0])}); this one is sent again",
                    response.status)
        return out

    def _split(self, inputs: list[_Input], response: HttpResponse, answer: Mapping[str, Any],
               requests: _Requests) -> dict[str, Answer]:
        """A 400 that refused the whole batch for some of its inputs. The inputs it names
        (its ``context``: trace ids or ids; a property HubSpot says does not exist; a value
        its message quotes) get the error and the others are sent again (all of them named:
        nothing is sent again); when it names none, the batch is halved and each half sent
        again, down to single inputs. At most :data:`MAX_SPLIT_REQUESTS` requests in all, all
        within the send's ``timeout``: past either, the rest is retried."""
        error = self._error(response, answer)
        by_trace = {i.trace: i for i in inputs}
        by_email = {i.key: i for i in inputs}
        message = str(answer.get("message") or "")
        out: dict[str, Answer] = {}
        named = _named(answer, by_trace, by_email)
        if named and message.startswith("Duplicate IDs"):
            # HubSpot saw one contact twice where the relay saw two emails: each goes alone.
            groups = [[i for i in inputs if i not in named], *[[i] for i in named]]
        elif culprits := named or _quoted(message, inputs):
            out.update({i.trace: error for i in culprits})
            groups = [[i for i in inputs if i not in culprits]]
        else:
            half = len(inputs) // 2
            groups = [inputs[:half], inputs[half:]]
        for group in groups:
            if not group:
                continue
            if requests.made >= MAX_SPLIT_REQUESTS or requests.left() < MIN_REQUEST_TIME:
                out.update({i.trace: RetryableDeliveryError(
                    f"{error.message} (a batch HubSpot refused whole; not split further in "
                    "this attempt)", response.status) for i in group})
            else:
                out.update(self._upsert(group, requests))
        return out

    def _daily_reset(self, now: float) -> float:
        """When HubSpot's day ends for the account: midnight in its ``account_timezone``.
        Without one the relay does not know the account's midnight (the API does not tell),
        so it looks again within the hour rather than wait for a UTC midnight that may come
        hours before the account's."""
        budget = self.destination.budget
        timezone = budget.timezone if budget is not None else None
        reset = account_day(now, timezone)[1]
        return reset if timezone is not None else min(reset, now + _DAILY_LIMIT_WAIT)

    def _input_error(self, error: Mapping[str, Any], http_status: int) -> DeliveryError:
        """One input's error in a 207: retried or a dead letter by its ``status`` (an HTTP
        status, as HubSpot's schema says) or else its ``category``."""
        text = _error_text(error)
        category = str(error.get("category") or "")
        message = f"HubSpot refused this contact: {text}"
        if "PROPERTY_DOESNT_EXIST" in text or "does not exist" in text:
            message += (". Create the contact property in HubSpot, or turn it off with "
                        "`<property>: null` under properties:")
        status = str(error.get("status") or "")
        if status.isascii() and status.isdigit():
            code = int(status)
            retry = (code in RETRYABLE_STATUSES or code >= 500
                     or code in self.retryable_answers)
            if retry:
                return RetryableDeliveryError(message, code, self.retryable_answers.get(code))
            return PermanentDeliveryError(message, code)
        if category in RETRYABLE_CATEGORIES:
            return RetryableDeliveryError(message, http_status)
        return PermanentDeliveryError(message, http_status)

    def _error(self, response: HttpResponse, answer: Any) -> DeliveryError:
        try:
            self._raise(response, answer)
        except DeliveryError as exc:
            return exc
        raise AssertionError("_raise always raises")  # pragma: no cover

    def _raise(self, response: HttpResponse, answer: Any) -> None:
        status = response.status
        detail = _error_text(answer) or response.text(200).strip()
        where = f"HubSpot answered HTTP {status}"
        if status == 401:
            message = (
                f"{where}: the access_token was refused (expired, revoked or mistyped); "
                f"put a valid private app token in access_token. {detail}"
            )
        elif status == 403:
            message = (
                f"{where}: the access_token lacks permission; give the private app the "
                f"crm.objects.contacts.write scope. {detail}"
            )
        elif status == 429:
            if _daily_limit_reached(response):
                until = self._daily_reset(time.time())
                raise BudgetSpentError(
                    f"{where}: the account's daily limit is spent; waiting for its reset at "
                    f"{_utc(until)}. {detail}".strip(), until)
            message = f"{where}: rate limit reached. {detail}"
            raise_vendor_error(response, "HubSpot", message.strip(), _rate_limit_wait(response))
        elif status == 423:
            message = f"{where}: records locked by a burst of writes; retrying. {detail}"
        elif status == 477:
            message = f"{where}: the account is migrating between data centres; retrying. {detail}"
        elif "PROPERTY_DOESNT_EXIST" in detail or "does not exist" in detail:
            message = (
                f"{where}: {detail}. Create the contact property in HubSpot, or turn it off "
                f"with `<property>: null` under properties:"
            )
        else:
            message = f"{where}: {detail}" if detail else where
        raise_vendor_error(response, "HubSpot", message.strip(),
                           retryable=self.retryable_answers)


def _property_value(value: Any) -> str:
    """HubSpot property values are strings: checkboxes want "true"/"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)



def _error_text(answer: Any) -> str:
    """HubSpot's error body (``message`` + ``category``), or the first error of a batch."""
    if not isinstance(answer, dict):
        return ""
    errors = answer.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        answer = errors[0]
    message = str(answer.get("message") or "")
    category = answer.get("category")
    return f"{category}: {message}" if category and message else message


def _rate_limit_wait(response: HttpResponse) -> float:
    """Seconds to wait after a 429, from ``Retry-After`` or HubSpot's rate-limit headers."""
    headers: Mapping[str, str] = response.headers
    explicit = parse_retry_after(headers.get("Retry-After"))
    if explicit is not None:
        return explicit
    if headers.get("X-HubSpot-RateLimit-Secondly-Remaining") == "0":
        return 1.0
    interval = headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
    try:
        return max(1.0, float(interval) / 1000.0) if interval else _DEFAULT_RATE_LIMIT_WAIT
    except ValueError:
        return _DEFAULT_RATE_LIMIT_WAIT


def _daily_limit_reached(response: HttpResponse) -> bool:
    """A 429 for the account's daily limit (``policyName: DAILY``, or no daily requests
    left), not for the ten-second one."""
    answer = response.json_object()
    policy = str(answer.get("policyName", "")) if isinstance(answer, dict) else ""
    return policy == "DAILY" or response.headers.get("X-HubSpot-RateLimit-Daily-Remaining") == "0"


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _named(error: Mapping[str, Any], by_trace: Mapping[str, _Input],
           by_email: Mapping[str, _Input]) -> list[_Input]:
    """The inputs an error's ``context`` names: by ``objectWriteTraceId``, else by ``ids``
    (the emails of a duplicate, lower-cased as HubSpot does)."""
    context = error.get("context")
    if not isinstance(context, dict):
        return []
    found: list[_Input] = []
    for trace in context.get("objectWriteTraceId") or []:
        if str(trace) in by_trace and by_trace[str(trace)] not in found:
            found.append(by_trace[str(trace)])
    if not found:
        for value in context.get("ids") or []:
            item = by_email.get(str(value).lower())
            if item is not None and item not in found:
                found.append(item)
    return found


def _quoted(message: str, inputs: Sequence[_Input]) -> list[_Input]:
    """The inputs whose values a whole-batch 400 quotes: HubSpot's ``Property values were not
    valid: [{"name": ..., "message": ..., "error": ...}]`` names each bad property and its
    value ("Email address x@y.con is invalid"); a property that does not exist is bad in
    every input that sends it."""
    start = message.find("[")
    try:
        problems = json.loads(message[start:]) if start >= 0 else []
    except ValueError:
        problems = []
    found: list[_Input] = []
    for problem in problems if isinstance(problems, list) else []:
        if not isinstance(problem, dict):
            continue
        name, text = str(problem.get("name") or ""), str(problem.get("message") or "")
        for item in inputs:
            value = item.properties.get(name)
            if value is None or item in found:
                continue
            if problem.get("error") == "PROPERTY_DOESNT_EXIST" or (value and value in text):
                found.append(item)
    return found

