"""What the console's templates show, computed here so the templates stay plain: payloads with
their secrets redacted, times in UTC, error texts cleaned like log lines, and the chart."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
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
