"""Klaviyo: upsert leads as profiles, in bulk import jobs followed to their end; subscribe new
signups to a list; unsubscribe on opt-out.

YAML::

    - name: klaviyo
      type: klaviyo
      api_key: ${KLAVIYO_PRIVATE_KEY}      # scopes: profiles, lists, subscriptions (read, write)
      list_id: Y6nRLr                      # optional: subscribe new signups to this list
      unsubscribe: list                    # what opted_out does: global | list | none
      properties:                          # profile field -> dotted lead path
        organization: custom_fields.company
        external_id: id                    # a standard attribute: sent as a string
        location.city: custom_fields.city  # a location field
        plan: custom_fields.plan           # not a standard attribute: a custom property
      # batch: {max: 500, wait: 1s}, rate_limit: 2/s, concurrency: 2, timeout: 90s,
      # job_timeout: 60s                   # the defaults

Requests use Klaviyo's JSON:API (``application/vnd.api+json``) with a pinned ``revision``,
not the form encoding KickoffLabs uses for webhook URLs that mention klaviyo.

A batch's events are merged per lead (by lower-cased email, else E.164 phone number) in the
order the relay received them, the newest value of each attribute winning: one profile per
lead, every event of the lead answered by it. Then:

- **profiles** (every event but ``deleted``): five or more go in one bulk import job
  (``POST /api/profile-bulk-import-jobs``, up to 10,000 profiles and 5 MB a job). The job is
  asynchronous: its ``202`` means accepted, not applied, so the send follows it
  (``GET /api/profile-bulk-import-jobs/{id}``, waits doubling from half a second to 10 s)
  until it is ``complete``, then reads its import errors
  (``GET …/{id}/import-errors``) and ties each to its profile by the profile it quotes
  (``original_payload``: email, phone number, external id) or by the index in its
  ``source.pointer``. A profile without an error is *applied*; one with an error is a dead
  letter carrying Klaviyo's reason; a job not complete after ``job_timeout`` (or cancelled),
  or errors it does not tie to a profile, send the profiles again (an import is an upsert).
  Fewer than five profiles go one by one through ``POST /api/profile-import`` (Klaviyo's
  guide: bulk import is not for a handful of profiles), which answers at once.
  Keys of ``properties`` that are standard profile attributes go to the attributes, as the
  strings Klaviyo's schema wants (``external_id: id`` sends ``"4711"``); ``location.<field>``
  keys to the location; every other key to the profile's custom ``properties``.
- **consent**: the ``subscribe_events`` (default: the two new-signup events) with
  ``list_id`` set and the lead not opted out: ``POST /api/profile-subscription-bulk-create-
  jobs`` (up to 1,000 a job) gives email marketing consent and adds the profile to the list,
  once its import is applied. ``opted_out`` (email) and ``phone_number_opt_out`` (SMS):
  ``POST /api/profile-subscription-bulk-delete-jobs`` (up to 100 a job), as ``unsubscribe``
  says: ``global`` (no list: the whole account), ``list`` (the ``list_id``; Klaviyo
  unsubscribes a lead who is not in that list from the whole account) or ``none``. These
  jobs cannot be followed (no GET exists): their records say *accepted*.
- ``deleted`` is skipped: deleting a Klaviyo profile is a data-privacy request, not a sync.

``timeout`` bounds the whole send: the requests, following the job and reading its errors.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from marshmallow import Schema, ValidationError, fields, validate

from relay.core.durations import parse_duration
from relay.core.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import DeliveryResult, Destination, LeadEvent
from relay.drivers.base import Answer, Answers, BulkDriver
from relay.drivers.http import HttpClient, HttpResponse, parse_retry_after
from relay.drivers.mapping import (
    apply_mapping,
    as_text,
    lead_email,
    lead_kind,
    mapping_field,
    raise_vendor_error,
    resolve_mapping,
)

#: The API revision this driver was written against (Klaviyo keeps a revision for 2 years).
REVISION = "2026-10-15"
JSON_API = "application/vnd.api+json"
CUSTOM_SOURCE = "leadrelay (KickoffLabs)"

IMPORT_JOBS = "/api/profile-bulk-import-jobs"
PROFILE_IMPORT = "/api/profile-import"
SUBSCRIBE_JOBS = "/api/profile-subscription-bulk-create-jobs"
UNSUBSCRIBE_JOBS = "/api/profile-subscription-bulk-delete-jobs"

#: Klaviyo's limits of one bulk import job (the spec's bulk_import_profiles description).
MAX_JOB_PROFILES = 10_000
MAX_JOB_BYTES = 5_000_000
MAX_PROFILE_BYTES = 100_000
#: Profiles per bulk subscribe / unsubscribe job (the spec's descriptions).
MAX_SUBSCRIBE = 1_000
MAX_UNSUBSCRIBE = 100
#: A batch with fewer profiles than this imports them one by one (``/api/profile-import``):
#: Klaviyo's guide says bulk import is not for a small number of profiles, and a job costs at
#: least three requests (create, follow, errors).
BULK_FROM = 5
#: Import errors per page (the most ``page[size]`` takes).
ERRORS_PAGE = 100
#: Whole-job refusals (a ``400`` naming profiles by index) split this often at most.
MAX_SUBMITS = 3

PROFILE_ATTRIBUTES = frozenset(
    {"first_name", "last_name", "phone_number", "external_id", "organization", "locale",
     "title", "image"}
)  # fmt: skip
LOCATION_FIELDS = frozenset(
    {"address1", "address2", "city", "country", "region", "zip", "timezone", "ip",
     "latitude", "longitude"}
)  # fmt: skip
UNSUBSCRIBE_MODES = ("global", "list", "none")
OPT_OUT_EVENTS = frozenset({"opted_out", "phone_number_opt_out"})

DEFAULT_PROPERTIES: dict[str, str] = {
    "first_name": "first_name",
    "last_name": "family_name",
    "phone_number": "phone_number",
    "kickofflabs_rank": "rank",
    "kickofflabs_referral_link": "social_url",
    "kickofflabs_score": "contest_score",
    "kickofflabs_verified": "verified",
}

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_PHONE_PUNCTUATION = re.compile(r"[\s().-]")
_PROFILE_POINTER = re.compile(r"^/data/attributes/profiles/data/(\d+)(?:/|$)")
_ACCEPTED = "job accepted; Klaviyo does not report on subscription jobs"


class _Seconds(fields.Field):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class KlaviyoOptions(Schema):
    api_key = fields.String(required=True, validate=validate.Length(min=1))
    list_id = fields.String(load_default=None, allow_none=True)
    properties = mapping_field()
    subscribe_events = fields.List(
        fields.String(), load_default=lambda: ["new_signup", "new_signup_not_excluded"]
    )
    revision = fields.String(
        load_default=REVISION, validate=validate.Regexp(r"^\d{4}-\d{2}-\d{2}(\.\w+)?$")
    )
    # What opted_out / phone_number_opt_out do; required when they reach the destination.
    unsubscribe = fields.String(
        load_default=None, allow_none=True, validate=validate.OneOf(UNSUBSCRIBE_MODES)
    )
    # How long a send follows an import job before it sends the profiles again.
    job_timeout = _Seconds(load_default=60.0, validate=validate.Range(min=1, max=300))


@dataclass
class _Profile:
    """One lead of a batch: the merged attributes of its events (newest last), and what its
    events ask of its consent."""

    key: str
    email: str | None
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[int] = field(default_factory=list)  # indexes into the batch, oldest first
    notes: list[str] = field(default_factory=list)
    email_consent: str | None = None  # "subscribe" / "unsubscribe": the newest event's
    sms_unsubscribe: str | None = None  # the E.164 number to unsubscribe from SMS
    imported: Answer | None = None  # the import's answer
    consent: list[str] = field(default_factory=list)  # what the consent jobs did
    consent_error: DeliveryError | None = None

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def answer(self) -> Answer:
        imported = self.imported or RetryableDeliveryError("the profile was not imported")
        extra = "; ".join(self.notes + self.consent)
        merged = (f" (with {len(self.events) - 1} other event(s) of this lead, merged into "
                  "one profile)") if len(self.events) > 1 else ""
        if isinstance(imported, DeliveryError):
            return _with_note(imported, extra)
        if self.consent_error is not None:
            return _with_note(self.consent_error, f"{imported.detail}; {extra}".strip("; "))
        detail = "; ".join(part for part in (imported.detail + merged, extra) if part)
        return DeliveryResult(imported.status_code, detail)


@dataclass
class _Job:
    id: str
    profiles: list[_Profile]
    until: float  # monotonic: followed until then


@dataclass
class _Calls:
    """The requests one send made, and when it must be over."""

    deadline: float
    made: int = 0


class KlaviyoDriver(BulkDriver):
    type_name = "klaviyo"
    options_schema = KlaviyoOptions
    secret_fields = frozenset({"api_key"})
    default_base_url = "https://a.klaviyo.com"
    # The bulk import job endpoints (create, get, import errors) allow 10/s burst and 150/m
    # steady per account (the spec's x-klaviyo-ratelimit). The relay's windows are fixed one-
    # second windows: 2 a second is at most 4 in any second and 122 in any minute, for all
    # the requests of a send together (the follow-ups are charged after it).
    default_rate_limit = "2/s"
    account_fields = ("api_key",)  # destinations with one key share its account's budget
    default_concurrency = 2  # jobs followed at once: their polls stay within the burst
    max_batch = MAX_JOB_PROFILES
    default_batch_max = 500  # a few seconds of a busy campaign; far below 5 MB a job
    default_batch_wait = 1.0  # each job costs several requests: worth waiting for company
    default_timeout = 90.0  # the job_timeout (60 s) and the requests around it
    #: Seconds before the first look at a job, and the longest wait between looks.
    first_poll = 0.5
    max_poll = 10.0

    def __init__(self, destination: Destination, http: HttpClient | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(destination, http)
        self.properties = resolve_mapping(DEFAULT_PROPERTIES, self.options.get("properties"))
        self.properties.pop("email", None)  # the email always comes from the lead itself
        self.subscribe_events = frozenset(self.options.get("subscribe_events") or ())
        self.job_timeout = float(self.options.get("job_timeout") or 60.0)
        self._sleep = sleep
        self._clock = clock
        self._headers = {
            "Authorization": f"Klaviyo-API-Key {self.options['api_key']}",
            "revision": self.options.get("revision") or REVISION,
            "Accept": JSON_API,
            "Content-Type": JSON_API,
        }

    @classmethod
    def review(cls, destination: Destination) -> list[str]:
        options = destination.options
        list_id, mode = options.get("list_id"), options.get("unsubscribe")
        problems: list[str] = []
        opt_outs = "*" in destination.events or bool(destination.events & OPT_OUT_EVENTS)
        if opt_outs and mode is None:
            problems.append(
                "unsubscribe: opted_out events reach this destination, so say what they do "
                "in Klaviyo: `global` (unsubscribed from email marketing in the whole "
                "account), `list` (from list_id only; Klaviyo unsubscribes a lead who is not "
                "in that list from the whole account) or `none` (consent left as it is)")
        if mode == "list" and not list_id:
            problems.append("unsubscribe: `list` needs a list_id")
        job_timeout = float(options.get("job_timeout") or 60.0)
        if job_timeout >= destination.timeout:
            problems.append(
                f"job_timeout ({job_timeout:g}s) must be shorter than timeout "
                f"({destination.timeout:g}s), which bounds the whole send: the import "
                "request, following its job and reading its errors")
        for name, path in (options.get("properties") or {}).items():
            if path is None:
                continue
            if name.startswith("location.") and name[9:] not in LOCATION_FIELDS:
                problems.append(f"properties: {name}: Klaviyo's location has no such field "
                                f"(it has {', '.join(sorted(LOCATION_FIELDS))})")
            standard = name in PROFILE_ATTRIBUTES or name.startswith("location.")
            if standard and lead_kind(path) in ("object", "list"):
                problems.append(f"properties: {name}: {path} is an {lead_kind(path)}; "
                                f"Klaviyo's {name} is a string (map one of its fields)")
        if problems:
            raise ValueError("; ".join(problems))
        if not opt_outs:
            return []
        if mode == "global":
            return ["opted_out unsubscribes the lead from email marketing in the whole "
                    "Klaviyo account, phone_number_opt_out from SMS marketing "
                    "(unsubscribe: global)"]
        if mode == "list":
            return [f"opted_out unsubscribes the lead from list {list_id} (unsubscribe: "
                    "list); Klaviyo unsubscribes a lead who is not in that list from the "
                    "whole account"]
        return ["opted_out and phone_number_opt_out leave Klaviyo consent as it is "
                "(unsubscribe: none)"]

    # -- a batch ---------------------------------------------------------------------------

    def send_batch(self, events: Sequence[LeadEvent]) -> Answers:
        calls = _Calls(self._clock() + self.timeout)
        answers: list[Answer | None] = [None] * len(events)
        profiles = self._profiles(events, answers)
        if profiles:
            jobs: list[_Job] = []
            if len(profiles) < BULK_FROM:
                for profile in profiles:
                    profile.imported = self._import_one(profile, calls)
            else:
                jobs = self._submit_jobs(profiles, calls)
            self._unsubscribe(profiles, calls)  # whatever the import does: consent first
            self._follow(jobs, calls)
            self._subscribe([p for p in profiles if isinstance(p.imported, DeliveryResult)],
                            calls)
            for profile in profiles:
                answer = profile.answer()
                for index in profile.events:
                    answers[index] = answer
        return Answers([a for a in answers if a is not None], requests=calls.made)

    def _profiles(self, events: Sequence[LeadEvent], answers: list[Answer | None]
                  ) -> list[_Profile]:
        """The batch's leads, each event merged into its lead's profile in the order the
        relay received them; the events with nothing to send are answered here."""
        profiles: dict[str, _Profile] = {}
        list_id = self.options.get("list_id")
        for index in sorted(range(len(events)), key=lambda i: events[i].received_at):
            event = events[index]
            if event.name == "deleted":
                answers[index] = DeliveryResult(
                    skipped=True,
                    detail="deleted events leave Klaviyo profiles (deletion is a privacy "
                           "request)")
                continue
            payload = event.payload
            email = lead_email(payload)
            attributes, notes = self._profile_attributes(payload, email)
            phone = attributes.get("phone_number")
            if email is None and phone is None:
                answers[index] = DeliveryResult(
                    skipped=True, detail="lead has neither an email nor an E.164 phone number")
                continue
            key = email.lower() if email else str(phone)
            profile = profiles.get(key)
            if profile is None:
                profile = profiles[key] = _Profile(key, email)
            for name, value in attributes.items():
                if isinstance(value, dict):
                    profile.attributes.setdefault(name, {}).update(value)
                else:
                    profile.attributes[name] = value
            for note in notes:
                profile.note(note)
            profile.events.append(index)
            if event.name == "opted_out":
                profile.email_consent = "unsubscribe"
            elif event.name == "phone_number_opt_out":
                phone_out = _e164(payload.get("phone_number"))
                if phone_out is None:
                    profile.note("no E.164 phone number: sms not unsubscribed")
                else:
                    profile.sms_unsubscribe = phone_out
            elif event.name in self.subscribe_events and list_id:
                if payload.get("opted_out") is True:
                    profile.note("lead opted out: not subscribed")
                    if profile.email_consent == "subscribe":
                        profile.email_consent = None
                elif email is None:
                    profile.note("no email: not subscribed")
                else:
                    profile.email_consent = "subscribe"
        return list(profiles.values())

    def _profile_attributes(
        self, payload: Any, email: str | None
    ) -> tuple[dict[str, Any], list[str]]:
        notes: list[str] = []
        attributes: dict[str, Any] = {}
        custom: dict[str, Any] = {}
        location: dict[str, Any] = {}
        for name, value in apply_mapping(self.properties, payload).items():
            if name == "phone_number":
                phone = _e164(value)
                if phone is None:
                    # Klaviyo refuses the whole profile for a malformed number.
                    notes.append(f"phone number {value!r} is not E.164: left out")
                    continue
                value = phone
            if name.startswith("location."):
                field_name = name[len("location."):]
                coordinate = field_name in ("latitude", "longitude") and isinstance(
                    value, int | float) and not isinstance(value, bool)
                location[field_name] = value if coordinate else as_text(value)
            elif name in PROFILE_ATTRIBUTES:
                attributes[name] = as_text(value)  # the schema's type: string
            else:
                custom[name] = value
        if email is not None:
            attributes["email"] = email
        if location:
            attributes["location"] = location
        if custom:
            attributes["properties"] = custom
        return attributes, notes

    # -- profiles one by one ---------------------------------------------------------------

    def _import_one(self, profile: _Profile, calls: _Calls) -> Answer:
        body = {"data": {"type": "profile", "attributes": profile.attributes}}
        try:
            response = self._request("POST", PROFILE_IMPORT, calls, body)
            self._check(response, "profile import")
        except DeliveryError as exc:
            return exc
        data = response.json_object().get("data")
        profile_id = data.get("id") if isinstance(data, dict) else None
        verb = "created" if response.status == 201 else "updated"
        return DeliveryResult(response.status, f"profile {profile_id or profile.key} {verb}")

    # -- bulk import jobs ------------------------------------------------------------------

    def _submit_jobs(self, profiles: list[_Profile], calls: _Calls) -> list[_Job]:
        """One job per 10,000 profiles or 5 MB; a profile above 100 KB is refused here."""
        jobs: list[_Job] = []
        chunk: list[_Profile] = []
        size = 0
        for profile in profiles:
            encoded = len(json.dumps(profile.attributes).encode()) + 40
            if encoded > MAX_PROFILE_BYTES:
                profile.imported = PermanentDeliveryError(
                    f"the profile is {encoded // 1000} KB; Klaviyo imports at most 100 KB "
                    "per profile (turn large properties off under properties:)")
                continue
            if chunk and (len(chunk) >= MAX_JOB_PROFILES or size + encoded > MAX_JOB_BYTES):
                jobs += self._submit(chunk, calls)
                chunk, size = [], 0
            chunk.append(profile)
            size += encoded
        if chunk:
            jobs += self._submit(chunk, calls)
        return jobs

    def _submit(self, chunk: list[_Profile], calls: _Calls) -> list[_Job]:
        """Create a job for ``chunk``. A ``400`` that names profiles by their index refuses
        them (a dead letter each, with Klaviyo's reason) and the others are sent again."""
        for _ in range(MAX_SUBMITS):
            body = {"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {
                "data": [{"type": "profile", "attributes": p.attributes} for p in chunk]}}}}
            try:
                response = self._request("POST", IMPORT_JOBS, calls, body)
                if response.status == 400:
                    named = self._refused(response, chunk)
                    if named and len(named) < len(chunk):
                        chunk = [p for p in chunk if p not in named]
                        continue
                self._check(response, "bulk profile import")
            except DeliveryError as exc:
                for profile in chunk:
                    profile.imported = exc
                return []
            data = response.json_object().get("data")
            job_id = data.get("id") if isinstance(data, dict) else None
            if not job_id:
                error = RetryableDeliveryError(
                    f"Klaviyo accepted the import (HTTP {response.status}) but named no job",
                    response.status)
                for profile in chunk:
                    profile.imported = error
                return []
            return [_Job(str(job_id), chunk, min(self._clock() + self.job_timeout,
                                                calls.deadline))]
        error = RetryableDeliveryError(
            f"Klaviyo refused the import job {MAX_SUBMITS} times for some of its profiles; "
            "the others are sent again")
        for profile in chunk:
            profile.imported = error
        return []

    def _refused(self, response: HttpResponse, chunk: list[_Profile]) -> list[_Profile]:
        """The profiles a whole-job ``400`` names by index (``source.pointer``), each given
        its error."""
        named: list[_Profile] = []
        for error in _dicts(response.json_object().get("errors")):
            match = _PROFILE_POINTER.match(str((error.get("source") or {}).get("pointer") or ""))
            if match and int(match.group(1)) < len(chunk):
                profile = chunk[int(match.group(1))]
                profile.imported = PermanentDeliveryError(
                    f"Klaviyo refused this profile: {_error_text(error)}", response.status)
                if profile not in named:
                    named.append(profile)
        return named

    def _follow(self, jobs: list[_Job], calls: _Calls) -> None:
        """Look at each job until it is over or its time is up, waiting longer each time."""
        pending = list(jobs)
        wait = self.first_poll
        while pending:
            now = self._clock()
            due = [job for job in pending if now >= job.until]
            for job in due:
                pending.remove(job)
                self._give_up(job, f"Klaviyo's import job {job.id} was not complete after "
                                   f"{self.job_timeout:g}s; the profile is imported again")
            if not pending:
                return
            self._sleep(max(0.0, min(wait, min(job.until for job in pending) - now)))
            wait = min(wait * 2, self.max_poll)
            for job in list(pending):
                try:
                    response = self._request("GET", f"{IMPORT_JOBS}/{job.id}", calls)
                except DeliveryError:
                    continue  # no answer this time (timeout, connection): look again
                if response.status == 429:
                    wait = max(wait, parse_retry_after(response.headers.get("Retry-After"))
                               or 1.0)
                    continue
                if response.status >= 500 or response.status == 408:
                    continue
                if response.status != 200:
                    pending.remove(job)
                    try:
                        self._check(response, "import job lookup")
                    except DeliveryError as exc:
                        self._give_up(job, f"Klaviyo accepted import job {job.id}, but "
                                           f"following it failed: {exc.message}", exc)
                    continue
                attributes = (response.json_object().get("data") or {}).get("attributes") or {}
                status = attributes.get("status")
                if status == "complete":
                    pending.remove(job)
                    self._completed(job, attributes.get("failed_count"), calls)
                elif status == "cancelled":
                    pending.remove(job)
                    self._give_up(job, f"Klaviyo cancelled import job {job.id}; the "
                                       "profile is imported again")

    def _give_up(self, job: _Job, message: str, cause: DeliveryError | None = None) -> None:
        if cause is not None and isinstance(cause, PermanentDeliveryError):
            error: DeliveryError = PermanentDeliveryError(message, cause.status_code)
        else:
            error = RetryableDeliveryError(message, cause.status_code if cause else None,
                                           cause.retry_after if cause else None)
        for profile in job.profiles:
            profile.imported = error

    def _completed(self, job: _Job, failed_count: Any, calls: _Calls) -> None:
        """A complete job: its import errors tied to their profiles; the others applied."""
        failed = failed_count if isinstance(failed_count, int) else None
        unplaced: list[dict[str, Any]] = []
        refused: set[int] = set()
        read_all = True
        if failed != 0:
            read_all = self._read_errors(job, calls, refused, unplaced)
        applied = DeliveryResult(202, f"applied by Klaviyo import job {job.id}")
        left = [p for i, p in enumerate(job.profiles) if i not in refused]
        unexplained = max(len(unplaced), (failed or 0) - len(refused)) if read_all else 1
        if not unexplained:
            for profile in left:
                profile.imported = applied
            return
        if read_all and len(left) == 1 and len(unplaced) == 1:
            left[0].imported = PermanentDeliveryError(
                f"Klaviyo's import job {job.id} refused this profile: "
                f"{_error_text(unplaced[0].get('attributes') or {})}")
            return
        what = (f"reported {unexplained} import error(s) it did not tie to a profile"
                if read_all else "could not have its import errors read")
        error = RetryableDeliveryError(
            f"Klaviyo's import job {job.id} {what}; the profile is imported again")
        for profile in left:
            profile.imported = error

    def _read_errors(self, job: _Job, calls: _Calls, refused: set[int],
                     unplaced: list[dict[str, Any]]) -> bool:
        """Every page of the job's import errors, each tied to its profile (``refused``
        gets its index). False when a page could not be read."""
        by_identity: dict[str, int] = {}
        for index, profile in enumerate(job.profiles):
            for name in ("email", "phone_number", "external_id"):
                value = profile.attributes.get(name)
                if value:
                    by_identity.setdefault(f"{name}:{str(value).lower()}", index)
        target: str | None = f"{IMPORT_JOBS}/{job.id}/import-errors?page[size]={ERRORS_PAGE}"
        while target:
            try:
                response = self._request("GET", target, calls)
                self._check(response, "import errors")
            except DeliveryError:
                return False
            answer = response.json_object()
            for error in _dicts(answer.get("data")):
                attributes = error.get("attributes") or {}
                index = _error_index(attributes, by_identity, len(job.profiles))
                if index is None:
                    unplaced.append(error)
                    continue
                refused.add(index)
                job.profiles[index].imported = PermanentDeliveryError(
                    f"Klaviyo's import job {job.id} refused this profile: "
                    f"{_error_text(attributes)}")
            following = (answer.get("links") or {}).get("next")
            target = _path_of(following) if isinstance(following, str) else None
        return True

    # -- consent ---------------------------------------------------------------------------

    def _unsubscribe(self, profiles: list[_Profile], calls: _Calls) -> None:
        mode = self.options.get("unsubscribe") or "none"
        list_id = self.options.get("list_id")
        wanted = [p for p in profiles if p.email_consent == "unsubscribe" or p.sms_unsubscribe]
        entries: list[tuple[_Profile, dict[str, Any]]] = []
        for profile in wanted:
            if mode == "none":
                profile.note("opted out: Klaviyo consent left as it is (unsubscribe: none)")
                continue
            attributes: dict[str, Any] = {}
            subscriptions: dict[str, Any] = {}
            if profile.email_consent == "unsubscribe":
                if profile.email is None:
                    profile.note("no email: email not unsubscribed")
                else:
                    attributes["email"] = profile.email
                    subscriptions["email"] = {"marketing": {"consent": "UNSUBSCRIBED"}}
            if profile.sms_unsubscribe:
                attributes["phone_number"] = profile.sms_unsubscribe
                subscriptions["sms"] = {"marketing": {"consent": "UNSUBSCRIBED"}}
            if subscriptions:
                entries.append((profile, {"type": "profile", "attributes": {
                    **attributes, "subscriptions": subscriptions}}))
        where = f"list {list_id}" if mode == "list" else "the whole account"
        for start in range(0, len(entries), MAX_UNSUBSCRIBE):
            part = entries[start:start + MAX_UNSUBSCRIBE]
            data: dict[str, Any] = {
                "type": "profile-subscription-bulk-delete-job",
                "attributes": {"profiles": {"data": [entry for _, entry in part]}},
            }
            if mode == "list":
                data["relationships"] = {"list": {"data": {"type": "list", "id": list_id}}}
            error = self._consent_job(UNSUBSCRIBE_JOBS, {"data": data}, "unsubscribe", calls)
            for profile, entry in part:
                channels = " and ".join(entry["attributes"]["subscriptions"])
                if error is None:
                    profile.consent.append(
                        f"{channels} marketing unsubscribed from {where} ({_ACCEPTED})")
                else:
                    profile.consent_error = error

    def _subscribe(self, profiles: list[_Profile], calls: _Calls) -> None:
        list_id = self.options.get("list_id")
        wanted = [p for p in profiles if p.email_consent == "subscribe" and p.email]
        for start in range(0, len(wanted), MAX_SUBSCRIBE):
            part = wanted[start:start + MAX_SUBSCRIBE]
            body = {"data": {
                "type": "profile-subscription-bulk-create-job",
                "attributes": {"custom_source": CUSTOM_SOURCE, "profiles": {"data": [
                    {"type": "profile", "attributes": {
                        "email": p.email,
                        "subscriptions": {"email": {"marketing": {"consent": "SUBSCRIBED"}}},
                    }} for p in part]}},
                "relationships": {"list": {"data": {"type": "list", "id": list_id}}},
            }}
            error = self._consent_job(SUBSCRIBE_JOBS, body, "subscribe", calls)
            for profile in part:
                if error is None:
                    profile.consent.append(f"subscribed to list {list_id} ({_ACCEPTED})")
                else:
                    profile.consent_error = error

    def _consent_job(self, path: str, body: dict[str, Any], action: str,
                     calls: _Calls) -> DeliveryError | None:
        try:
            self._check(self._request("POST", path, calls, body), action)
        except DeliveryError as exc:
            return exc
        return None

    # -- requests --------------------------------------------------------------------------

    def _request(self, method: str, path: str, calls: _Calls,
                 body: dict[str, Any] | None = None) -> HttpResponse:
        left = calls.deadline - self._clock()
        if left <= 0:
            raise RetryableDeliveryError(
                f"the send took its whole timeout ({self.timeout:g}s); sent again")
        calls.made += 1
        return self.http.request(
            method,
            self.base_url + path,
            body=json.dumps(body).encode() if body is not None else None,
            headers=self._headers,
            timeout=left,
        )

    def _check(self, response: HttpResponse, action: str) -> None:
        if 200 <= response.status < 300:
            return
        errors = response.json_object().get("errors")
        described: list[str] = []
        codes: set[str] = set()
        for error in _dicts(errors):
            codes.add(str(error.get("code") or ""))
            described.append(_error_text(error))
        text = "; ".join(part for part in described if part) or response.text(200).strip()
        message = f"Klaviyo {action} answered HTTP {response.status}"
        message += f": {text}" if text else ""
        if response.status == 401 or "not_authenticated" in codes:
            message += " — check api_key: it must be a private API key (pk_…)"
        elif response.status == 403 or "permission_denied" in codes:
            message += (" — give the api_key read and write access to profiles, lists and "
                        "subscriptions")
        elif response.status == 404 and action in ("subscribe", "unsubscribe"):
            message += " — check list_id"
        raise_vendor_error(response, "Klaviyo", message, retryable=self.retryable_answers)


def _e164(value: Any) -> str | None:
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    phone = _PHONE_PUNCTUATION.sub("", str(value))
    return phone if _E164.match(phone) else None


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _error_text(error: dict[str, Any]) -> str:
    """Klaviyo's words for an error: its detail (else title) and where (``source``)."""
    text = str(error.get("detail") or error.get("title") or "").strip()
    pointer = (error.get("source") or {}).get("pointer")
    return f"{text} ({pointer})" if pointer else text


def _error_index(attributes: dict[str, Any], by_identity: dict[str, int],
                 count: int) -> int | None:
    """The profile an import error is about: the one its ``original_payload`` names (email,
    phone number, external id), else the index in its ``source.pointer``."""
    payload = attributes.get("original_payload")
    if isinstance(payload, dict):
        for name in ("email", "phone_number", "external_id"):
            value = payload.get(name)
            if value and f"{name}:{str(value).lower()}" in by_identity:
                return by_identity[f"{name}:{str(value).lower()}"]
    pointer = str((attributes.get("source") or {}).get("pointer") or "")
    match = _PROFILE_POINTER.match(pointer)
    if match and int(match.group(1)) < count:
        return int(match.group(1))
    return None


def _path_of(url: str) -> str | None:
    """The path and query of a ``links.next`` URL, sent to the destination's own host."""
    parts = urlsplit(url)
    if not parts.path.startswith(IMPORT_JOBS + "/"):
        return None
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _with_note(error: DeliveryError, note: str) -> DeliveryError:
    if not note:
        return error
    message = f"{error.message} ({note})"
    if isinstance(error, RetryableDeliveryError):
        return RetryableDeliveryError(message, error.status_code, error.retry_after)
    if isinstance(error, PermanentDeliveryError):
        return PermanentDeliveryError(message, error.status_code, gone=error.gone)
    return error
