"""When the next attempt happens (SPEC §4)."""

from __future__ import annotations

import random

from relay.core.models import RetryPolicy


def next_delay(policy: RetryPolicy, attempt: int, retry_after: float | None = None,
               rng: random.Random | None = None) -> float | None:
    """Seconds before attempt ``attempt + 1`` after attempt ``attempt`` failed, or None when
    the schedule is exhausted. The scheduled delay gets ±jitter; ``Retry-After`` is a floor."""
    if attempt > len(policy.schedule):
        return None
    base = policy.schedule[attempt - 1]
    spread = (rng or random).uniform(1 - policy.jitter, 1 + policy.jitter)
    delay = base * spread
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
