"""A lead as an operator acts on it: erase it from the relay (GDPR)."""

from __future__ import annotations

import redis

from relay.store.erase import ErasureReport, erase_lead


def erase(client: redis.Redis, email: str) -> ErasureReport:
    """Remove every trace of the lead with this email: its events, delivery states, attempts,
    dead letters, parked retries and lane entries, and its lead index."""
    return erase_lead(client, email)
