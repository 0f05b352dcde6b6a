"""The YAML configuration (SPEC §3): loading, ``${VAR}`` substitution, validation.

Validation errors name the destination and the field: ``destinations[1] (crm): access_token:
Missing data for required field.`` The result is a :class:`RelayConfig` of frozen values.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates

from relay.core.durations import parse_duration, parse_rate_limit
from relay.core.errors import ConfigError
from relay.core.events import canonical_event_name, is_known
from relay.core.models import (
    ORDERINGS,
    BatchPolicy,
    Budget,
    Destination,
    RateLimit,
    RetryPolicy,
)
from relay.core.redaction import redacted
from relay.drivers import REGISTRY, Driver, driver_class

DEFAULT_SOURCE = "kickofflabs"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
COMMON_KEYS = frozenset(
    {"name", "type", "events", "campaigns", "where", "timeout", "retry", "rate_limit", "base_url",
     "concurrency", "batch", "account", "daily_limit", "account_timezone", "ordering"}
)
#: A budget's limits: destinations that share the budget and say one of them must say the
#: same (one that leaves it out takes what the others say, else its driver's default).
BUDGET_KEYS = ("rate_limit", "daily_limit", "account_timezone")
#: The longest a lone delivery may wait for company (``batch.wait``): the wait is added to a
#: claimed delivery's lease, so it stays short.
MAX_BATCH_WAIT = 10.0


@dataclass(frozen=True)
class Source:
    name: str
    token: str | None = None
    dedupe_window: float = 86400.0


@dataclass(frozen=True)
class RelayConfig:
    sources: Mapping[str, Source]
    destinations: tuple[Destination, ...]
    warnings: tuple[str, ...] = ()
    path: str | None = None
    secrets: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)

    def budgets(self) -> dict[Budget, list[str]]:
        """Each budget of the YAML's destinations -> the names of the destinations that
        share it, in the YAML's order."""
        found: dict[Budget, list[str]] = {}
        for d in self.destinations:
            if d.budget is not None:
                found.setdefault(d.budget, []).append(d.name)
        return found


class Duration(fields.Field):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class EventName(fields.String):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        name = canonical_event_name(super()._deserialize(value, attr, data, **kwargs))
        if name != "*" and not is_known(name):
            raise ValidationError(f"unknown event {value!r}")
        return name


class RetrySchema(Schema):
    schedule = fields.List(Duration(), required=True, validate=validate.Length(min=0, max=50))


class BatchSchema(Schema):
    """``batch: {max: 100, wait: 200ms}``; either key may be left out (the driver's default)."""

    max = fields.Integer(load_default=None, strict=True, validate=validate.Range(min=1))
    wait = Duration(load_default=None,
                    validate=validate.Range(max=MAX_BATCH_WAIT,
                                            error=f"must be at most {MAX_BATCH_WAIT:g}s"))


class SourceSchema(Schema):
    token = fields.String(allow_none=True, load_default=None)
    dedupe_window = Duration(load_default=86400.0)


class DestinationSchema(Schema):
    """The keys every driver takes; the driver's own keys go to its ``options_schema``."""

    class Meta:
        unknown = EXCLUDE

    name = fields.String(
        required=True,
        validate=validate.Regexp(NAME_PATTERN, error=("use letters, digits, - and _ only")),
    )
    type = fields.String(required=True, validate=validate.OneOf(sorted(REGISTRY)))
    events = fields.List(EventName(), load_default=lambda: ["*"], validate=validate.Length(min=1))
    campaigns = fields.List(fields.Raw(), load_default=None, allow_none=True)
    where = fields.Dict(keys=fields.String(), load_default=dict)
    timeout = Duration(load_default=None)  # default: the driver's (default_timeout)
    retry = fields.Nested(RetrySchema, load_default=None, allow_none=True)
    rate_limit = fields.String(load_default=None, allow_none=True)
    base_url = fields.Url(load_default=None, allow_none=True, require_tld=False)
    # Deliveries in flight to the destination across all workers (default: the driver's).
    concurrency = fields.Integer(load_default=None, allow_none=True, strict=True,
                                 validate=validate.Range(1, 1000))
    # Deliveries per request to a bulk API (default: the driver's; see _batch_policy).
    batch = fields.Nested(BatchSchema, load_default=None, allow_none=True)
    # The vendor account it uses, when others use it too: they share one budget.
    account = fields.String(load_default=None, allow_none=True,
                            validate=validate.Regexp(NAME_PATTERN,
                                                     error="use letters, digits, - and _ only"))
    # Requests a day for the account (default: the driver's; null: not counted).
    daily_limit = fields.Integer(load_default=None, allow_none=True, strict=True,
                                 validate=validate.Range(min=1))
    # The account's time zone: its day, and its daily_limit, begin at midnight there.
    account_timezone = fields.String(load_default=None, allow_none=True)

    @validates("account_timezone")
    def _timezone(self, value: str | None, **kwargs: Any) -> None:
        if value is None:
            return
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValidationError(f"unknown time zone {value!r} (use an IANA name, e.g. "
                                  "America/New_York, or UTC)") from None
    # per_lead: each lead's events in the order received, one at a time per lead.
    ordering = fields.String(load_default="none", validate=validate.OneOf(ORDERINGS))

    # A driver's own key, checked here for every driver that signs (the webhook): a secret
    # that cannot be decoded would pass the check and then fail every delivery.
    signing_secret = fields.String(load_default=None, allow_none=True)

    @validates("signing_secret")
    def _signing_secret(self, value: str | None, **kwargs: Any) -> None:
        if value is not None and value.startswith("whsec_"):
            try:
                key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
            except (binascii.Error, ValueError):
                raise ValidationError(
                    "after whsec_ a signing secret is the base64 of its key, and this is not "
                    "valid base64 (A-Z a-z 0-9 + /, padded with = to a multiple of 4 "
                    "characters)") from None
            if not key:
                raise ValidationError("the key after whsec_ is empty")

    @validates("rate_limit")
    def _rate(self, value: str | None, **kwargs: Any) -> None:
        if value is not None:
            try:
                parse_rate_limit(value)
            except ValueError as exc:
                raise ValidationError(str(exc)) from None

    @validates("timeout")
    def _timeout(self, value: float | None, **kwargs: Any) -> None:
        if value is not None and not 0 < value <= 300:
            raise ValidationError("must be between 0 and 5m")


def substitute(value: Any, environ: Mapping[str, str], where: str = "") -> Any:
    """Replace ``${VAR}`` (and ``${VAR:-default}``) in every string of the parsed YAML."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            # As in the shell and compose: ``:-`` also replaces an empty value.
            if environ.get(name):
                return environ[name]
            if default is not None:
                return default
            if name in environ:
                return ""
            raise ConfigError(f"{where or 'config'}: environment variable {name} is not set")

        return _VAR.sub(replace, value)
    if isinstance(value, list):
        return [substitute(item, environ, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {
            key: substitute(item, environ, f"{where}.{key}" if where else str(key))
            for key, item in value.items()
        }
    return value


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> RelayConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    config = parse_config(raw, os.environ if environ is None else environ)
    return RelayConfig(
        config.sources, config.destinations, config.warnings, str(path), config.secrets
    )


def parse_config(raw: Any, environ: Mapping[str, str]) -> RelayConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config: the top level must be a mapping")
    unknown = set(raw) - {"sources", "destinations"}
    if unknown:
        raise ConfigError(f"config: unknown top-level keys: {', '.join(sorted(unknown))}")
    problems: list[str] = []
    warnings: list[str] = []
    sources = _parse_sources(raw.get("sources"), environ, problems, warnings)
    destinations: list[Destination] = []
    stated: dict[str, _Stated] = {}
    secrets: dict[str, frozenset[str]] = {}
    seen: set[str] = set()
    raw_destinations = raw.get("destinations") or []
    if not isinstance(raw_destinations, list):
        problems.append("destinations: must be a list")
        raw_destinations = []
    for index, item in enumerate(raw_destinations):
        label = f"destinations[{index}]"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label += f" ({item['name']})"
        try:
            item = substitute(item, environ, label)
            destination, secret_fields, said = _parse_destination(item, label, warnings)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if destination.name.startswith("sub-"):
            problems.append(f"{label}: name: the sub- prefix is reserved for API subscriptions")
        if destination.name in seen:
            problems.append(f"{label}: name: {destination.name!r} is used twice")
        seen.add(destination.name)
        destinations.append(destination)
        stated[destination.name] = said
        secrets[destination.name] = secret_fields
    if not problems:
        destinations = _shared_budgets(destinations, stated, problems, warnings)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems), problems)
    return RelayConfig(sources, tuple(destinations), tuple(warnings), None, secrets)


def _parse_sources(
    raw: Any, environ: Mapping[str, str], problems: list[str], warnings: list[str]
) -> dict[str, Source]:
    if raw is None:
        warnings.append(
            f"no sources configured: the {DEFAULT_SOURCE!r} source accepts events without a token"
        )
        return {DEFAULT_SOURCE: Source(DEFAULT_SOURCE)}
    if not isinstance(raw, dict):
        problems.append("sources: must be a mapping of source name to settings")
        return {}
    sources: dict[str, Source] = {}
    for name, settings in raw.items():
        label = f"sources.{name}"
        if not re.match(NAME_PATTERN, str(name)):
            problems.append(f"{label}: use letters, digits, - and _ only")
            continue
        try:
            loaded = SourceSchema().load(substitute(settings or {}, environ, label))
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        except ValidationError as exc:
            problems.extend(_flatten(label, exc.messages))
            continue
        token = loaded["token"] or None
        if token is None:
            warnings.append(f"{label}: no token: anyone who knows the URL can post events")
        sources[str(name)] = Source(str(name), token, loaded["dedupe_window"])
    return sources


@dataclass(frozen=True)
class _Stated:
    """What the YAML said of a destination's budget, before budgets are shared out."""

    label: str
    budget: str | None  # its budget's name: None for none (its own name)
    credential: str | None  # the digest of its account_fields, if its driver has them
    values: Mapping[str, Any]  # of BUDGET_KEYS, those the YAML says
    defaults: Mapping[str, Any]  # its driver's


def _parse_destination(item: Any, label: str, warnings: list[str] | None = None
                       ) -> tuple[Destination, frozenset[str], _Stated]:
    if not isinstance(item, dict):
        raise ConfigError(f"{label}: must be a mapping")
    try:
        common = DestinationSchema().load(item)
    except ValidationError as exc:
        raise ConfigError(label, _flatten(label, exc.messages)) from None
    cls = driver_class(common["type"])
    own = {key: value for key, value in item.items() if key not in COMMON_KEYS}
    try:
        options = cls.options_schema().load(own)
    except ValidationError as exc:
        raise ConfigError(label, _flatten(label, exc.messages)) from None
    retry = common["retry"]
    campaigns = common["campaigns"]
    rate_limit = common["rate_limit"] or cls.default_rate_limit
    said = _stated(cls, common, item, options, label)
    destination = Destination(
        name=common["name"],
        type=common["type"],
        events=frozenset(common["events"]),
        campaigns=None if campaigns is None else frozenset(str(c) for c in campaigns),
        where=common["where"],
        timeout=common["timeout"] or cls.default_timeout,
        retry=RetryPolicy(tuple(retry["schedule"])) if retry else RetryPolicy(),
        rate_limit=parse_rate_limit(rate_limit) if rate_limit else None,
        base_url=common["base_url"],
        concurrency=common["concurrency"] or cls.default_concurrency,
        options=options,
        batch=_batch_policy(cls, common["batch"], label),
        ordering=common["ordering"],
    )
    try:  # what the driver says of its keys together with the common ones
        notes = cls.review(destination)
    except ValueError as exc:
        raise ConfigError(label, [f"{label}: {exc}"]) from None
    if warnings is not None:
        warnings.extend(f"{label}: {note}" for note in notes)
    return destination, cls.secret_fields, said


def _stated(cls: type[Driver], common: Mapping[str, Any], item: Mapping[str, Any],
            options: Mapping[str, Any], label: str) -> _Stated:
    """A destination's budget as the YAML says it: ``account:`` names it (``<type>:<account>``);
    else, for a driver with ``account_fields``, a digest of their values and the API host
    (``<type>:<digest>``), so that destinations with the same credential share it."""
    credential = None
    values = [options.get(name) for name in cls.account_fields]
    if cls.account_fields and all(values):
        host = (common["base_url"] or cls.default_base_url or "").rstrip("/")
        material = json.dumps([common["type"], host, *values]).encode()
        credential = f"{common['type']}:{hashlib.sha256(material).hexdigest()[:12]}"
    account = common["account"]
    budget = f"{common['type']}:{account}" if account else credential
    said: dict[str, Any] = {}
    if common["rate_limit"] is not None:
        said["rate_limit"] = parse_rate_limit(common["rate_limit"])
    if "daily_limit" in item:
        said["daily_limit"] = common["daily_limit"]
    if common["account_timezone"] is not None:
        said["account_timezone"] = common["account_timezone"]
    default_rate = cls.default_rate_limit
    defaults = {"rate_limit": parse_rate_limit(default_rate) if default_rate else None,
                "daily_limit": cls.default_daily_limit, "account_timezone": None}
    return _Stated(label, budget, credential, said, defaults)


def _shared_budgets(destinations: list[Destination], stated: Mapping[str, _Stated],
                    problems: list[str], warnings: list[str]) -> list[Destination]:
    """Give each destination its budget. The destinations of one budget share its limits:
    a limit that two of them say differently is a config error, and one that leaves it out
    takes what the others say (else its driver's default). A destination in no budget that
    says ``daily_limit`` (or whose driver has one) gets a budget of its own name."""
    members: dict[str, list[Destination]] = {}
    for d in destinations:
        members.setdefault(stated[d.name].budget or d.name, []).append(d)
    shared: dict[str, Destination] = {}
    for name, group in members.items():
        limits: dict[str, Any] = {}
        for key in BUDGET_KEYS:
            says = [(d.name, stated[d.name].values[key]) for d in group
                    if key in stated[d.name].values]
            limits[key] = says[0][1] if says else stated[group[0].name].defaults[key]
            for other, value in says[1:]:
                if value != says[0][1]:
                    problems.append(
                        f"{stated[other].label}: {key}: {_shown(value)}, but {says[0][0]} "
                        f"says {_shown(says[0][1])} for the budget they share ({name}); a "
                        f"budget has one {key}: say it once, or the same on each")
                    break
        budget = None
        if stated[group[0].name].budget is not None or limits["daily_limit"] is not None:
            budget = Budget(name, limits["daily_limit"], limits["account_timezone"])
        rate: RateLimit | None = limits["rate_limit"]
        for d in group:
            shared[d.name] = dataclasses.replace(d, budget=budget, rate_limit=rate)
    by_credential: dict[str, list[str]] = {}
    for d in destinations:
        credential = stated[d.name].credential
        if credential is not None:
            by_credential.setdefault(credential, []).append(d.name)
    for names in by_credential.values():
        budgets = sorted({shared[n].budget_name for n in names})
        if len(budgets) > 1:
            warnings.append(
                f"{', '.join(names)} use the same account credential but are in different "
                f"budgets ({', '.join(budgets)}): the vendor counts their requests together; "
                "give them the same account:")
    return [shared[d.name] for d in destinations]


def _shown(value: Any) -> str:
    if isinstance(value, RateLimit):
        return _rate_text(value)
    return "null" if value is None else str(value)


def _rate_text(limit: RateLimit) -> str:
    return f"{limit.count}/{limit.per_seconds:g}s"


def _batch_policy(cls: type[Driver], configured: Mapping[str, Any] | None,
                  label: str) -> BatchPolicy | None:
    """The destination's batch: the driver's defaults (its vendor's maximum per request and
    its wait) under what the YAML says. None: one delivery per request (a driver that takes
    no batches, or ``max: 1``)."""
    configured = configured or {}
    if cls.max_batch <= 1:
        if configured:
            raise ConfigError(label, [f"{label}: batch: a {cls.type_name} destination sends "
                                      "one event per request and takes no batch"])
        return None
    size = configured.get("max") or cls.default_batch_max or cls.max_batch
    if size > cls.max_batch:
        raise ConfigError(label, [f"{label}: batch.max: {cls.type_name} takes at most "
                                  f"{cls.max_batch} per request, not {size}"])
    wait = configured.get("wait")
    policy = BatchPolicy(size, cls.default_batch_wait if wait is None else wait)
    return policy if size > 1 else None


def _flatten(label: str, messages: Any, path: str = "") -> list[str]:
    if isinstance(messages, dict):
        out: list[str] = []
        for key, value in messages.items():
            out.extend(_flatten(label, value, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{label}: {path}: {' '.join(messages)}"]
    if isinstance(messages, list):
        return [line for m in messages for line in _flatten(label, m, path)]
    return [f"{label}: {path}: {messages}"]


def masked(config: RelayConfig) -> dict[str, Any]:
    """A printable view of the config with every secret replaced by ``***``."""

    def mask(value: Any) -> Any:
        return "***" if value else value

    out: dict[str, Any] = {
        "sources": {
            name: {"token": mask(s.token), "dedupe_window": s.dedupe_window}
            for name, s in config.sources.items()
        },
        "destinations": [],
    }
    for d in config.destinations:
        secret = config.secrets.get(d.name, frozenset())
        options = {
            key: (mask(value) if key in secret else _mask_nested(key, value))
            for key, value in d.options.items()
        }  # the rest as the relay shows any value (?api_key= in a URL): relay.core.redaction
        out["destinations"].append(
            {
                "name": d.name,
                "type": d.type,
                "events": sorted(d.events),
                "campaigns": sorted(d.campaigns) if d.campaigns is not None else None,
                "where": dict(d.where),
                "timeout": d.timeout,
                "concurrency": d.concurrency,
                "retry": list(d.retry.schedule),
                "rate_limit": d.rate_limit and _rate_text(d.rate_limit),
                "batch": d.batch and {"max": d.batch.max, "wait": d.batch.wait},
                "budget": d.budget and d.budget.name,
                "ordering": d.ordering,
                "base_url": redacted(d.base_url),
                **options,
            }
        )
    budgets = {}
    for budget, names in config.budgets().items():
        if len(names) > 1 or budget.daily_limit is not None:
            first = config.destination(names[0])
            rate = first.rate_limit if first is not None else None
            budgets[budget.name] = {
                "destinations": names,
                "rate_limit": rate and _rate_text(rate),
                "daily_limit": budget.daily_limit,
                "day_begins": f"midnight {budget.timezone or 'UTC'}",
            }
    if budgets:
        out["budgets"] = budgets
    return out


def _mask_nested(key: str, value: Any) -> Any:
    # Header values routinely carry API keys (``X-Api-Key``, ``Authorization``).
    if key == "headers" and isinstance(value, Mapping):
        return {name: "***" for name in value}
    return redacted(value)
