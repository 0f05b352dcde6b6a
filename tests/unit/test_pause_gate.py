"""A resume takes effect at once, even for a worker whose snapshot still shows the pause."""

from __future__ import annotations

import time

import fakeredis

from relay.core.models import Destination
from relay.delivery.gates import PauseGate

CRM = Destination(name="crm", type="webhook")


def test_a_stale_snapshot_of_a_pause_does_not_hold_a_resumed_lane() -> None:
    client = fakeredis.FakeRedis()
    worker = PauseGate(client, snapshot_ttl=60.0)  # a worker's gate: it reads paused names once
    operator = PauseGate(client)
    operator.pause("crm")
    granted, until = worker.allow(CRM, 5)
    assert granted == 0 and until is not None
    assert until - time.time() <= 10.0  # held briefly: a missed resume costs seconds, not an hour
    operator.resume("crm")
    assert worker.allow(CRM, 5) == (5, None)  # the snapshot still says paused; Redis does not
