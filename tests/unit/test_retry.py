"""When the next attempt happens (SPEC §4): ``len(schedule) + 1`` attempts, ±20% jitter, and a
``Retry-After`` that is a floor."""

from __future__ import annotations

import random

import pytest

from relay.core.models import RetryPolicy
from relay.delivery.retry import next_delay

SCHEDULE = (10.0, 60.0, 300.0, 1800.0)


def attempts_made(policy: RetryPolicy, rng: random.Random) -> int:
    """Fail every attempt and count how many there are before the schedule gives up."""
    attempt = 1
    while next_delay(policy, attempt, rng=rng) is not None:
        attempt += 1
    return attempt


@pytest.mark.parametrize("schedule", [(), (5.0,), SCHEDULE, RetryPolicy().schedule])
def test_len_schedule_plus_one_attempts(schedule: tuple[float, ...]) -> None:
    policy = RetryPolicy(schedule)
    assert attempts_made(policy, random.Random(1)) == len(schedule) + 1 == policy.max_attempts


def test_default_schedule_is_the_documented_one() -> None:
    assert RetryPolicy().schedule == (10, 60, 300, 1800, 7200, 21600, 43200, 43200)
    assert RetryPolicy().jitter == 0.2


def test_each_delay_follows_the_schedule_within_twenty_percent() -> None:
    policy = RetryPolicy(SCHEDULE)
    rng = random.Random(20240715)
    for attempt, base in enumerate(SCHEDULE, start=1):
        delays = [next_delay(policy, attempt, rng=rng) for _ in range(500)]
        assert all(d is not None and base * 0.8 <= d <= base * 1.2 for d in delays)
        # The jitter really spreads: both sides of the base delay, most of the band used.
        assert min(delays) < base * 0.9 and max(delays) > base * 1.1  # type: ignore[operator]


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy(SCHEDULE)
    first = [next_delay(policy, 2, rng=random.Random(7)) for _ in range(3)]
    second = [next_delay(policy, 2, rng=random.Random(7)) for _ in range(3)]
    assert first == second


def test_no_jitter_policy_is_exact() -> None:
    policy = RetryPolicy(SCHEDULE, jitter=0.0)
    assert [next_delay(policy, n) for n in (1, 2, 3, 4)] == list(SCHEDULE)


def test_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(SCHEDULE)
    rng = random.Random(3)
    for _ in range(200):
        assert next_delay(policy, 1, retry_after=120.0, rng=rng) == 120.0
    # A Retry-After shorter than the schedule does not make the attempt earlier.
    for _ in range(200):
        delay = next_delay(policy, 2, retry_after=1.0, rng=rng)
        assert delay is not None and 48.0 <= delay <= 72.0


def test_retry_after_never_extends_the_schedule() -> None:
    policy = RetryPolicy((10.0,))
    assert next_delay(policy, 1, retry_after=3600.0) == 3600.0
    assert next_delay(policy, 2, retry_after=5.0) is None


def test_exhaustion_returns_none_for_every_later_attempt() -> None:
    policy = RetryPolicy(SCHEDULE)
    for attempt in range(len(SCHEDULE) + 1, len(SCHEDULE) + 5):
        assert next_delay(policy, attempt) is None
