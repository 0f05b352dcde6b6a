"""The history outbox's release after a commit (relay.store.history), on fakeredis: the
committed events' payloads stay a short grace for the claims of the next seconds, then go;
an expiry already shorter is never lengthened."""

from __future__ import annotations

import fakeredis

from relay.store.history import HistoryEntry, HistoryOutbox
from relay.store.keys import HISTORY, event_key, seen_key


def test_committed_payloads_stay_a_grace_then_go() -> None:
    client = fakeredis.FakeRedis()
    outbox = HistoryOutbox(client)
    entry = client.xadd(HISTORY, {"v": "1", "r": "[]"}).decode()
    client.hset(event_key("evt_1"), "event", '{"payload":{}}')  # kept for the retention
    client.expire(event_key("evt_1"), 7 * 86400)
    client.set(seen_key("evt_1"), entry, px=1_000)  # a marker about to expire anyway

    outbox.release([HistoryEntry(entry, 1, [])], ["evt_1"], [], grace_ms=5_000)

    assert client.xlen(HISTORY) == 0
    assert client.hget(event_key("evt_1"), "event") is not None  # claims still read it here
    assert 0 < client.pttl(event_key("evt_1")) <= 5_000
    assert 0 < client.pttl(seen_key("evt_1")) <= 1_000  # not lengthened to the grace

    outbox.release([], ["evt_1"], [], grace_ms=0)
    assert not client.exists(event_key("evt_1"), seen_key("evt_1"))

