"""``10s``, ``5m``, ``2h``, ``7d`` durations and ``20/s`` rate limits as used in the YAML."""

from __future__ import annotations

import re

from relay.core.models import RateLimit

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)?\s*(s|m|h|d|sec|second|min|minute|hour|day)\s*$")
_RATE_UNITS = {"sec": "s", "second": "s", "min": "m", "minute": "m", "hour": "h", "day": "d"}


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration; a bare number is seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"negative duration: {value!r}")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 10s, 5m, 2h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def parse_rate_limit(value: str) -> RateLimit:
    """``20/s``, ``600/m``, ``1000/h``, ``5/10s``."""
    match = _RATE.match(str(value))
    if not match:
        raise ValueError(f"not a rate limit: {value!r} (use e.g. 20/s or 600/m)")
    count, multiple, unit = int(match.group(1)), match.group(2), match.group(3)
    unit = _RATE_UNITS.get(unit, unit)
    if count < 1:
        raise ValueError("a rate limit must allow at least 1 request")
    return RateLimit(count=count, per_seconds=_UNITS[unit] * int(multiple or 1))


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
