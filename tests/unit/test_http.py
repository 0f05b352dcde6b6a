"""``Retry-After`` as the outgoing HTTP client reads it: seconds or an HTTP date, never a
negative wait. The client against a real loopback server: tests/integration/test_http.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relay.drivers.http import parse_retry_after

NOW = datetime(2026, 7, 15, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("Wed, 15 Jul 2026 12:02:00 GMT", 120.0),
        ("Wed, 15 Jul 2026 11:00:00 GMT", 0.0),  # in the past: no wait
        ("", None),
        (None, None),
        ("soon", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds
