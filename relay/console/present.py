"""What the console's templates show, computed here so the templates stay plain: payloads with
their secrets redacted, times in UTC, error texts cleaned like log lines, the chart, and the
overview's bounded summary of the destinations."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from relay.core import redaction
from relay.core.redaction import REDACTED, redact
from relay.observability.timeseries import SERIES, Minute

IN_FLIGHT = frozenset({"pending", "inflight", "retrying"})


def redacted(value: Any) -> Any:
    """``value`` with every field named like a secret replaced, and keys in URLs and header
    lines masked: the relay's one policy (:func:`relay.core.redaction.redacted`), which the
    admin API, the CLI and the logs apply too."""
    return redaction.redacted(value)


def pretty_json(value: Any) -> str:
    return json.dumps(redacted(value), indent=2, sort_keys=False, ensure_ascii=False,
                      default=str)


def clean_text(text: object) -> str:
    """An error text or reason from a destination, as safe to show as a log line."""
    return redact(str(text)) if text not in (None, "") else ""


def utc(epoch: object, with_date: bool = True) -> str:
    """``2026-12-01 09:14:03 UTC``; ``-`` for no time."""
    if epoch in (None, "", 0, 0.0):
        return "-"
    try:
        seconds = float(epoch)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC" if with_date else "%H:%M UTC",
                         time.gmtime(seconds))


def iso(epoch: object) -> str:
    """The machine-readable twin of :func:`utc`, for ``<time datetime=…>``."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(epoch)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def masked_url(url: str) -> str:
    """A URL without its query values or user info: tokens ride there."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    query = "&".join(f"{p.split('=', 1)[0]}=…" for p in parts.query.split("&") if p)
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def millis(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}\u00a0ms"  # no line break inside


# -- the chart --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chart:
    """An inline SVG line chart of the per-minute counts (no script needed to draw it)."""

    width: int
    height: int
    top: int  # the y axis' largest value
    lines: dict[str, str]  # series -> SVG polyline points
    totals: dict[str, int]  # series -> sum over the window
    first: str  # label of the first minute
    last: str  # label of the last minute
    minutes: Sequence[Minute]


def chart(minutes: Sequence[Minute], width: int = 600, height: int = 160) -> Chart:
    peak = max((m.counts[s] for m in minutes for s in SERIES), default=0)
    top = _nice(peak)
    step = width / max(len(minutes) - 1, 1)
    lines = {}
    for series in SERIES:
        points = (f"{i * step:.1f},{height - m.counts[series] / top * height:.1f}"
                  for i, m in enumerate(minutes))
        lines[series] = " ".join(points)
    totals = {s: sum(m.counts[s] for m in minutes) for s in SERIES}
    return Chart(width, height, top, lines, totals,
                 utc(minutes[0].start, with_date=False) if minutes else "-",
                 utc(minutes[-1].start, with_date=False) if minutes else "-", minutes)


def _nice(peak: int) -> int:
    """The first of 5, 10, 25, 50, 100, 250 … at or above ``peak``."""
    bound = 5
    while bound < peak:
        for factor in (2, 2.5, 2):
            bound = int(bound * factor)
            if bound >= peak:
                break
    return bound


# -- the overview's destinations --------------------------------------------------------------

#: The overview shows at most this many destination rows and this many campaign rows, however
#: many destinations and API subscriptions there are; the Destinations page has them all, a
#: page at a time.
OVERVIEW_ROWS = 25
OVERVIEW_CAMPAIGNS = 10
STOPPED = ("open", "half-open", "paused")


def attention(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """Sort key: the rows an operator should look at first (stopped, then with dead letters,
    retrying, queued), then by name."""
    state = row.get("state")
    return (STOPPED.index(state) if state in STOPPED else len(STOPPED), -row.get("dead", 0),
            -row.get("retrying", 0), -row.get("queued", 0), str(row.get("name", "")))


@dataclass
class CampaignSummary:
    """One line for a campaign's API subscriptions (``campaign`` None: subscriptions no longer
    active that still have counters)."""

    campaign: str | None
    subscriptions: int = 0
    states: dict[str, int] = field(default_factory=dict)  # stopped state -> how many
    delivered: int = 0
    failed: int = 0
    queued: int = 0
    retrying: int = 0
    dead: int = 0

    @property
    def stopped(self) -> int:
        return sum(self.states.values())

    @property
    def success_rate(self) -> float | None:
        tried = self.delivered + self.failed
        return round(self.delivered / tried, 4) if tried else None

    def add(self, row: Mapping[str, Any]) -> None:
        self.subscriptions += 1
        if row["state"] in STOPPED:
            self.states[row["state"]] = self.states.get(row["state"], 0) + 1
        for name in ("delivered", "failed", "queued", "retrying", "dead"):
            setattr(self, name, getattr(self, name) + int(row.get(name) or 0))

    def attention(self) -> tuple[Any, ...]:
        return (-self.stopped, -self.dead, -self.retrying, -self.queued,
                self.campaign is None, self.campaign or "")


@dataclass
class OverviewDestinations:
    """What the overview shows of the destinations: at most :data:`OVERVIEW_ROWS` rows (the
    YAML's destinations, and any other not an API subscription), at most
    :data:`OVERVIEW_CAMPAIGNS` campaign lines for the API subscriptions, and how many of each
    are left out."""

    rows: list[dict[str, Any]]
    rows_total: int
    campaigns: list[CampaignSummary]
    campaigns_total: int
    subscriptions_total: int


def overview_destinations(rows: Iterable[Mapping[str, Any]],
                          campaign_of: Mapping[str, str], subscription_prefix: str,
                          max_rows: int = OVERVIEW_ROWS,
                          max_campaigns: int = OVERVIEW_CAMPAIGNS) -> OverviewDestinations:
    """Split :func:`relay.operations.status.relay_status`'s rows into destination rows and
    per-campaign lines (``campaign_of``: an active subscription's name -> its campaign), each
    list cut to its bound, those needing attention kept first and shown in name order."""
    plain: list[dict[str, Any]] = []
    campaigns: dict[str | None, CampaignSummary] = {}
    subscriptions = 0
    for row in rows:
        name = str(row["name"])
        if name in campaign_of or name.startswith(subscription_prefix):
            campaign = campaign_of.get(name)
            campaigns.setdefault(campaign, CampaignSummary(campaign)).add(row)
            subscriptions += 1
        else:
            plain.append(dict(row))
    shown = sorted(sorted(plain, key=attention)[:max_rows], key=lambda r: str(r["name"]))
    lines = sorted(campaigns.values(), key=CampaignSummary.attention)[:max_campaigns]
    return OverviewDestinations(shown, len(plain), lines, len(campaigns), subscriptions)


def version_of(*parts: Any) -> str:
    """A short digest of what a refreshing part shows: the same digest, nothing changed."""
    def plain(value: Any) -> Any:
        if isinstance(value, CampaignSummary | OverviewDestinations | Chart):
            return asdict(value)
        return str(value)

    text = json.dumps(parts, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
