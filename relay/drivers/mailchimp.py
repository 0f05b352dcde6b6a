"""Mailchimp Marketing API 3.0: keep leads as members of one audience (list), up to 500 a
request (batch subscribe or unsubscribe).

YAML::

    - name: newsletter
      type: mailchimp
      api_key: ${MAILCHIMP_API_KEY}        # ends in -usNN, the data centre of the account
      list_id: a1b2c3d4e5                  # the audience ID
      status_if_new: pending               # double opt-in; default subscribed
      merge_fields:                        # merge tag -> dotted lead path, or {path, type}
        COMPANY: custom_fields.company     # text
        SCORE: {path: contest_score, type: number}
        SIGNED_UP: {path: when, type: date}
        PHONE: null                        # a default turned off
      # batch: {max: 500, wait: 200ms}, concurrency: 5, timeout: 60s   # the defaults

One request carries a batch: ``POST /3.0/lists/{list_id}`` with one member per email
(``update_existing: true``). Events of the same email are merged into one member in the order
the relay received them (the newest value of each merge field wins), and each is answered by
it. What each member says:

- ``status_if_new`` only, so an existing member's status is never changed (someone who
  unsubscribed is not subscribed again by a score change) ...
- ... except for an opted-out lead (``opted_out`` event, or ``opted_out: true`` in the
  payload): ``status`` becomes ``unsubscribed``, for new and existing members alike.
- ``merge_fields``: each value as its merge field's type takes it (:func:`merge_value`),
  converted where the conversion is exact (``"12"`` for a number: 12; ``2026-07-15T14:29:23-04:00``
  for a date: ``2026-07-15``; ``1990-12-25`` for a birthday: ``12/25``), else left out with a
  note; a type a lead field can never be is refused by ``check-config``.

Mailchimp answers ``200`` with ``new_members``, ``updated_members`` and ``errors[]``; each
error is tied back to its member by email address (lower-cased): that member's events are dead
letters with Mailchimp's reason, the others are delivered. Per member, after the batch:

- ``tagged``: ``POST .../members/{hash}/tags`` makes the tag active.
- ``deleted``: ``DELETE .../members/{hash}`` archives the member (Mailchimp's DELETE is an
  archive, not a permanent delete); a member that is not there is nothing to archive. The
  events of an email up to its ``deleted`` are answered by the archive (sent before the batch),
  later ones join the batch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from marshmallow import Schema, ValidationError, fields, validate, validates

from relay.core.dotted import dotted_get
from relay.core.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import DeliveryResult, Destination, LeadEvent
from relay.drivers.base import Answer, Answers, BulkDriver
from relay.drivers.http import HttpClient, HttpResponse
from relay.drivers.mapping import as_text, lead_email, lead_kind, raise_vendor_error

#: The most members one batch request takes (the spec's ``members`` description).
MAX_MEMBERS = 500
#: Mailchimp's merge field types (the spec's ``Merge_Field.type`` enum).
MERGE_TYPES = ("text", "number", "address", "phone", "date", "url", "imageurl", "radio",
               "dropdown", "birthday", "zip")
#: The lead kinds (:func:`relay.drivers.mapping.lead_kind`) each type can take a value of;
#: a path whose kind KickoffLabs does not declare may hold anything (checked value by value).
ACCEPTED_KINDS: dict[str, frozenset[str]] = {
    "text": frozenset({"text", "integer", "boolean"}),
    "number": frozenset({"integer"}),
    "address": frozenset({"object"}),
    "phone": frozenset({"text"}),
    "date": frozenset({"text"}),
    "url": frozenset({"text"}),
    "imageurl": frozenset({"text"}),
    "radio": frozenset({"text", "integer", "boolean"}),
    "dropdown": frozenset({"text", "integer", "boolean"}),
    "birthday": frozenset({"text"}),
    "zip": frozenset({"text", "integer"}),
}
_KIND_WORDS = {"integer": "a whole number", "boolean": "a yes/no value", "text": "text",
               "object": "an object", "list": "a list"}

DEFAULT_MERGE_FIELDS: dict[str, dict[str, Any]] = {
    "FNAME": {"path": "first_name", "type": "text"},
    "LNAME": {"path": "family_name", "type": "text"},
    "PHONE": {"path": "phone_number", "type": "phone"},
}

_DATA_CENTRE = re.compile(r"-([a-z]{2,4}\d{1,3})$")
_DECIMAL = re.compile(r"^-?\d+(\.\d+)?$")
_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:$|[T ])")
_BIRTHDAY = re.compile(r"^(0[1-9]|1[0-2])/(0[1-9]|[12]\d|3[01])$")
_ZIP = re.compile(r"^\d{5}(-\d{4})?$")
_ADDRESS_REQUIRED = ("addr1", "city", "state", "zip")
_ADDRESS_FIELDS = ("addr1", "addr2", "city", "state", "zip", "country")

# Problem-detail titles whose cause is in the data or the account, not in the moment.
_HINTS: dict[str, str] = {
    "Member In Compliance State": (
        "the member unsubscribed, bounced or was cleaned; only they can re-subscribe "
        "(e.g. through a Mailchimp signup form)"
    ),
    "Forgotten Email Not Subscribed": (
        "the member asked to be forgotten (GDPR); Mailchimp will not add this address again"
    ),
    "API Key Invalid": "check api_key: it must be a current Mailchimp API key ending in -usNN",
    "API Key Missing": "set api_key",
    "Resource Not Found": "check list_id: it must be the audience ID of this account",
    "Invalid Resource": "check merge_fields against the audience's merge tags",
}


class _MergeField(fields.Field):
    """A merge tag's source: a dotted lead path, ``{path, type, choices}``, or ``null`` /
    ``false`` to turn a default off. Loads to ``{"path", "type", "choices"}`` (type None:
    inferred) or None; refuses a type the lead path can never be."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if value is None or value is False:
            return None
        kind: str | None = None
        choices: list[str] | None = None
        if isinstance(value, str):
            path = value
        elif isinstance(value, dict):
            unknown = set(value) - {"path", "type", "choices"}
            if unknown:
                raise ValidationError(f"unknown keys {sorted(unknown)}: use path, type, choices")
            path, kind, choices = value.get("path"), value.get("type"), value.get("choices")
            if kind is not None and kind not in MERGE_TYPES:
                raise ValidationError(f"type: must be one of {', '.join(MERGE_TYPES)}")
            if choices is not None:
                if kind not in ("radio", "dropdown"):
                    raise ValidationError("choices: only radio and dropdown fields have them")
                if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                    raise ValidationError("choices: must be a list of strings")
        else:
            raise ValidationError("must be a dotted lead path, {path, type}, or null")
        if not isinstance(path, str) or not path.strip():
            raise ValidationError(
                "must be a dotted lead path (e.g. custom_fields.company), or null to turn it off")
        path = path.strip()
        known = lead_kind(path)
        if kind is not None and known is not None and known not in ACCEPTED_KINDS[kind]:
            raise ValidationError(
                f"{path} is {_KIND_WORDS[known]}; a Mailchimp {kind} field cannot take it")
        if kind is None and known in ("object", "list"):
            raise ValidationError(
                f"{path} is {_KIND_WORDS[known]}: map one of its fields, or give a type "
                "(an object can be an address)")
        return {"path": path, "type": kind, "choices": choices}


class MailchimpOptions(Schema):
    api_key = fields.String(required=True)
    list_id = fields.String(required=True, validate=validate.Length(min=1))
    status_if_new = fields.String(
        load_default="subscribed", validate=validate.OneOf(["subscribed", "pending"])
    )
    merge_fields = fields.Dict(
        keys=fields.String(validate=lambda key: bool(key.strip())),
        values=_MergeField(allow_none=True),
        load_default=dict,
    )

    @validates("api_key")
    def _has_data_centre(self, value: str, **_: Any) -> None:
        if not _DATA_CENTRE.search(value.strip()):
            raise ValidationError(
                "must be a Mailchimp API key ending in its data centre, e.g. …-us21"
            )


def merge_fields_of(configured: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The defaults overlaid by the configured merge fields, each with its type: the one
    configured, else the default tag's, else a number for a whole-number lead field and text
    for anything else."""
    merged: dict[str, dict[str, Any] | None] = {**DEFAULT_MERGE_FIELDS, **(configured or {})}
    resolved: dict[str, dict[str, Any]] = {}
    for tag, spec in merged.items():
        if spec is None:
            continue
        kind = spec.get("type") or (DEFAULT_MERGE_FIELDS.get(tag) or {}).get("type")
        if kind is None:
            kind = "number" if lead_kind(spec["path"]) == "integer" else "text"
        resolved[tag] = {"path": spec["path"], "type": kind, "choices": spec.get("choices")}
    return resolved


def merge_value(kind: str, value: Any, choices: Sequence[str] | None = None
                ) -> tuple[Any, str | None]:
    """``value`` as a Mailchimp merge field of type ``kind`` takes it, when the conversion is
    exact: ``(converted, None)``, or ``(None, why not)``."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "text":
        if isinstance(value, dict | list):
            return None, f"{'an object' if isinstance(value, dict) else 'a list'} is not text"
        return as_text(value), None
    if kind == "number":
        if number:
            return value, None
        if isinstance(value, str) and _DECIMAL.match(value.strip()):
            text = value.strip()
            return (float(text) if "." in text else int(text)), None
        return None, f"{value!r} is not a number"
    if kind == "address":
        if not isinstance(value, dict):
            return None, f"{value!r} is not an address (addr1, city, state, zip)"
        address = {key: as_text(value[key]) for key in _ADDRESS_FIELDS
                   if value.get(key) not in (None, "")}
        missing = [key for key in _ADDRESS_REQUIRED if key not in address]
        if missing:
            return None, f"the address has no {', '.join(missing)} (Mailchimp needs them all)"
        return address, None
    if kind == "zip":
        if isinstance(value, int) and not isinstance(value, bool) and 10_000 <= value <= 99_999:
            return str(value), None
        if isinstance(value, str) and _ZIP.match(value.strip()):
            return value.strip(), None
        return None, f"{value!r} is not a US ZIP code"
    if not isinstance(value, str) and kind not in ("radio", "dropdown"):
        return None, f"{value!r} is not a {kind}"
    if kind == "phone":
        return (value.strip(), None) if value.strip() else (None, "an empty phone number")
    if kind == "date":
        match = _ISO_DATE.match(value.strip())
        if match:
            return "-".join(match.groups()), None
        return None, f"{value!r} is not a date (YYYY-MM-DD)"
    if kind == "birthday":
        text = value.strip()
        if _BIRTHDAY.match(text):
            return text, None
        match = _ISO_DATE.match(text)
        if match:
            return f"{match.group(2)}/{match.group(3)}", None
        return None, f"{value!r} is not a birthday (MM/DD)"
    if kind in ("url", "imageurl"):
        if value.strip().lower().startswith(("http://", "https://")):
            return value.strip(), None
        return None, f"{value!r} is not a URL"
    # radio, dropdown: one of the choices
    if isinstance(value, dict | list):
        return None, f"{value!r} is not one of the field's choices"
    text = as_text(value)
    if choices and text not in choices:
        return None, f"{text!r} is not one of {', '.join(choices)}"
    return text, None


@dataclass
class _Member:
    """One email of a batch: the merged fields of its events (newest last)."""

    email: str
    merge_fields: dict[str, Any] = field(default_factory=dict)
    events: list[int] = field(default_factory=list)  # indexes into the batch, oldest first
    unsubscribe: bool = False
    tags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.email.lower()

    def body(self, status_if_new: str) -> dict[str, Any]:
        member: dict[str, Any] = {
            "email_address": self.email,
            "status_if_new": "unsubscribed" if self.unsubscribe else status_if_new,
        }
        if self.unsubscribe:
            member["status"] = "unsubscribed"
        if self.merge_fields:
            member["merge_fields"] = self.merge_fields
        return member


@dataclass
class _Requests:
    """The requests one send made, and when it must be over (its ``timeout``: the lease)."""

    deadline: float
    made: int = 0


class MailchimpDriver(BulkDriver):
    type_name = "mailchimp"
    # Mailchimp throttles by connections: 10 simultaneous per user account, across every app
    # using it (its API fundamentals page); 5 leaves room for the account's other apps.
    default_concurrency = 5
    account_fields = ("api_key",)  # one key, one account: one budget (e.g. a rate_limit)
    max_batch = MAX_MEMBERS
    default_batch_wait = 0.2
    default_timeout = 60.0  # a 500-member call is slow (Mailchimp's own SDK waits 60 s)
    options_schema = MailchimpOptions
    secret_fields = frozenset({"api_key"})
    # No fixed host: see base_url, which derives it from the api_key's data-centre suffix.
    default_base_url = None

    def __init__(self, destination: Destination, http: HttpClient | None = None) -> None:
        super().__init__(destination, http)
        self.merge_fields = merge_fields_of(self.options.get("merge_fields"))
        api_key = str(self.options["api_key"]).strip()
        # Mailchimp ignores the user name of basic auth; the key is the password.
        token = base64.b64encode(f"leadrelay:{api_key}".encode()).decode()
        self._headers = {
            "Authorization": f"Basic {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        match = _DATA_CENTRE.search(api_key)
        self._data_centre = match.group(1) if match else None

    @property
    def base_url(self) -> str:
        # The API host is the account's data centre, named by the key's suffix.
        if self.destination.base_url:
            return self.destination.base_url.rstrip("/")
        return f"https://{self._data_centre}.api.mailchimp.com"

    def send_batch(self, events: Sequence[LeadEvent]) -> Answers:
        answers: list[Answer | None] = [None] * len(events)
        requests = _Requests(time.monotonic() + self.timeout)
        order = sorted(range(len(events)), key=lambda i: events[i].received_at)
        last_deleted: dict[str, int] = {}  # email -> position in `order` of its last deleted
        for position, index in enumerate(order):
            email = lead_email(events[index].payload)
            if events[index].name == "deleted" and email is not None:
                last_deleted[email.lower()] = position
        archives: dict[str, list[int]] = {}
        members: dict[str, _Member] = {}
        for position, index in enumerate(order):
            event = events[index]
            email = lead_email(event.payload)
            if email is None:
                answers[index] = DeliveryResult(
                    skipped=True, detail="lead has no email; Mailchimp members are keyed by email")
            elif position <= last_deleted.get(email.lower(), -1):
                archives.setdefault(email, []).append(index)  # up to the email's deleted
            else:
                member = members.get(email.lower())
                if member is None:
                    member = members[email.lower()] = _Member(email)
                self._merge(member, event, index)
        for email, indexes in archives.items():
            answer = self._archive(email, requests)
            for index in indexes:
                answers[index] = answer
        if members:
            outcome = self._upsert(list(members.values()), requests)
            for member in members.values():
                answer = outcome[member.key]
                if isinstance(answer, DeliveryResult) and member.tags:
                    answer = self._add_tags(member, answer, requests)
                answer = _noted(answer, member)
                for index in member.events:
                    answers[index] = answer
        return Answers([a for a in answers if a is not None], requests=requests.made)

    def _merge(self, member: _Member, event: LeadEvent, index: int) -> None:
        """Fold one event into its email's member: the newest value of each field wins."""
        member.email = lead_email(event.payload) or member.email
        member.events.append(index)
        if event.name == "opted_out" or event.payload.get("opted_out") is True:
            member.unsubscribe = True
        for tag, spec in self.merge_fields.items():
            value = dotted_get(event.payload, spec["path"])
            if value is None:
                continue  # an absent value never clears what the audience already has
            converted, why_not = merge_value(spec["type"], value, spec.get("choices"))
            if why_not is None:
                member.merge_fields[tag] = converted
            else:
                note = f"merge field {tag} ({spec['type']}): {why_not}: left out"
                if note not in member.notes:
                    member.notes.append(note)
        if event.name == "tagged":
            tagged = event.payload.get("__tagged")
            name = tagged.get("name") if isinstance(tagged, dict) else None
            if isinstance(name, str) and name.strip():
                if name.strip() not in member.tags:
                    member.tags.append(name.strip())
            elif "no tag name in __tagged, no tag added" not in member.notes:
                member.notes.append("no tag name in __tagged, no tag added")

    # -- the batch request -----------------------------------------------------------------

    def _upsert(self, members: list[_Member], requests: _Requests) -> dict[str, Answer]:
        """Each member's answer (by lower-cased email) from one batch request."""
        body = {"members": [m.body(self.options["status_if_new"]) for m in members],
                "update_existing": True}
        list_id = quote(str(self.options["list_id"]), safe="")
        try:
            response = self._request("POST", f"{self.base_url}/3.0/lists/{list_id}", body,
                                     requests)
            self._check(response, "batch subscribe")
        except DeliveryError as exc:
            return {m.key: exc for m in members}
        answer = response.json_object()
        by_email = {m.key: m for m in members}
        out: dict[str, Answer] = {}
        for group, verb in (("new_members", "added"), ("updated_members", "updated")):
            for result in _dicts(answer.get(group)):
                member = by_email.get(str(result.get("email_address") or "").lower())
                if member is not None:
                    status = result.get("status") or "?"
                    out[member.key] = DeliveryResult(
                        response.status, f"member {member.email} {status} ({verb})")
        unplaced: list[dict[str, Any]] = []
        for error in _dicts(answer.get("errors")):
            member = by_email.get(str(error.get("email_address") or "").lower())
            if member is None:
                unplaced.append(error)
            else:
                out[member.key] = self._member_error(error, response.status)
        left = [m for m in members if m.key not in out]
        for member in left:
            if not unplaced:
                out[member.key] = DeliveryResult(response.status,
                                                 f"member {member.email} upserted")
            elif len(left) == 1 and len(unplaced) == 1:
                out[member.key] = self._member_error(unplaced[0], response.status)
            else:
                out[member.key] = RetryableDeliveryError(
                    f"Mailchimp reported {len(unplaced)} error(s) it did not tie to a member "
                    f"(first: {_member_error_text(unplaced[0])}); this one is sent again",
                    response.status)
        return out

    def _member_error(self, error: dict[str, Any], status: int) -> DeliveryError:
        text = _member_error_text(error)
        message = f"Mailchimp refused member {error.get('email_address') or '?'}: {text}"
        lowered = text.lower()
        if "compliance state" in lowered:
            message += f" — {_HINTS['Member In Compliance State']}"
        elif "forgotten" in lowered or "permanently deleted" in lowered:
            message += f" — {_HINTS['Forgotten Email Not Subscribed']}"
        elif "merge" in lowered or str(error.get("field") or "").startswith("merge_fields"):
            message += " — check merge_fields (and their types) against the audience's fields"
        return PermanentDeliveryError(message, status)

    # -- one member at a time --------------------------------------------------------------

    def _archive(self, email: str, requests: _Requests) -> Answer:
        try:
            response = self._request("DELETE", self._member_url(email), None, requests)
            if response.status == 404:
                return DeliveryResult(
                    status_code=404,
                    skipped=True,
                    detail="member not in the audience; nothing to archive",
                )
            self._check(response, "member archive")
        except DeliveryError as exc:
            return exc
        return DeliveryResult(status_code=response.status, detail="member archived")

    def _add_tags(self, member: _Member, upserted: DeliveryResult,
                  requests: _Requests) -> Answer:
        body = {"tags": [{"name": name, "status": "active"} for name in member.tags]}
        try:
            response = self._request("POST", self._member_url(member.email) + "/tags", body,
                                     requests)
            self._check(response, "member tags")
        except DeliveryError as exc:
            return _with_note(exc, upserted.detail)
        named = ", ".join(repr(name) for name in member.tags)
        return DeliveryResult(upserted.status_code,
                              f"{upserted.detail}; tag{'s' if len(member.tags) > 1 else ''} "
                              f"{named} active")

    def _member_url(self, email: str) -> str:
        subscriber_hash = hashlib.md5(email.lower().encode(), usedforsecurity=False).hexdigest()
        list_id = quote(str(self.options["list_id"]), safe="")
        return f"{self.base_url}/3.0/lists/{list_id}/members/{subscriber_hash}"

    def _request(self, method: str, url: str, body: dict[str, Any] | None,
                 requests: _Requests) -> HttpResponse:
        """One request, within what is left of the send's ``timeout`` (a batch with many
        tags or archives must not outlive its lease)."""
        left = requests.deadline - time.monotonic()
        if left <= 0:
            raise RetryableDeliveryError(
                f"the send took its whole timeout ({self.timeout:g}s); sent again")
        requests.made += 1
        return self.http.request(
            method, url, body=json.dumps(body).encode() if body is not None else None,
            headers=self._headers, timeout=min(self.timeout, left))

    def _check(self, response: HttpResponse, action: str) -> None:
        if 200 <= response.status < 300:
            return
        if response.status == 403 and not response.body.strip():
            # Mailchimp's connection throttle can answer a bare 403 (no problem document)
            # at high volume: a pause, not a missing permission.
            raise RetryableDeliveryError(
                f"Mailchimp {action} answered HTTP 403 without a body (its throttle at high "
                "volume); retrying", 403)
        problem = response.json_object()
        title = str(problem.get("title") or "").strip()
        detail = str(problem.get("detail") or "").strip()
        text = ": ".join(part for part in (title, detail) if part) or response.text(200).strip()
        field_errors = problem.get("errors")
        if isinstance(field_errors, list) and field_errors:
            text += (
                " ("
                + "; ".join(
                    f"{item.get('field') or '?'}: {item.get('message') or ''}".strip()
                    for item in field_errors
                    if isinstance(item, dict)
                )
                + ")"
            )
        message = f"Mailchimp {action} answered HTTP {response.status}"
        message += f": {text}" if text else ""
        hint = _HINTS.get(title)
        if hint is None and response.status in (401, 403):
            hint = "check api_key and that the key's user may change this audience"
        if hint:
            message += f" — {hint}"
        raise_vendor_error(response, "Mailchimp", message, retryable=self.retryable_answers)


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _member_error_text(error: dict[str, Any]) -> str:
    """Mailchimp's words for one member's error: ``error``, and the field it names."""
    text = str(error.get("error") or "").strip() or "no reason given"
    where = str(error.get("field") or "").strip()
    says = str(error.get("field_message") or "").strip()
    if where:
        text += f" ({where}{': ' + says if says and says not in text else ''})"
    code = str(error.get("error_code") or "").strip()
    return f"{text} [{code}]" if code else text


def _noted(answer: Answer, member: _Member) -> Answer:
    """The member's notes (fields left out, merged events) added to its answer."""
    notes = list(member.notes)
    if len(member.events) > 1:
        notes.append(f"with {len(member.events) - 1} other event(s) of this email, merged "
                     "into one member")
    if not notes:
        return answer
    if isinstance(answer, DeliveryResult):
        return DeliveryResult(answer.status_code, f"{answer.detail}; {'; '.join(notes)}",
                              answer.skipped)
    if isinstance(answer, DeliveryError):
        return _with_note(answer, "; ".join(notes))
    return answer


def _with_note(error: DeliveryError, note: str) -> DeliveryError:
    message = f"{error.message} ({note})"
    if isinstance(error, RetryableDeliveryError):
        return RetryableDeliveryError(message, error.status_code, error.retry_after)
    if isinstance(error, PermanentDeliveryError):
        return PermanentDeliveryError(message, error.status_code, gone=error.gone)
    return error
