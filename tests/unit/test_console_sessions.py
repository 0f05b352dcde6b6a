"""The console's server-side sessions (:class:`relay.console.auth.Sessions`) on fakeredis with a
clock the test moves: the idle timeout, the absolute lifetime, the key they were signed in
with. The pages that use them: tests/integration/test_console.py."""

from __future__ import annotations

import fakeredis

from relay.console.auth import Sessions

IDLE, LIFETIME = 600.0, 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def sessions() -> tuple[Sessions, Clock, fakeredis.FakeRedis]:
    clock = Clock()
    client = fakeredis.FakeRedis()
    return Sessions(client, IDLE, LIFETIME, clock), clock, client


def ttl_of(client: fakeredis.FakeRedis) -> float:
    [key] = client.scan_iter("relay:console:session:*")
    return int(client.pttl(key)) / 1000


def test_a_session_is_on_for_its_key_only_and_until_it_ends() -> None:
    store, _, client = sessions()
    session_id = store.start("fingerprint-a")
    assert store.check(session_id, ["fingerprint-b", "fingerprint-a"], active=True)
    assert not store.check("some-other-id", ["fingerprint-a"], active=True)
    store.end(session_id)
    assert not store.check(session_id, ["fingerprint-a"], active=True)
    assert list(client.scan_iter("relay:console:session:*")) == []


def test_a_session_whose_key_is_gone_is_ended() -> None:
    store, _, client = sessions()
    session_id = store.start("fingerprint-a")
    assert not store.check(session_id, ["fingerprint-b"], active=True)
    assert list(client.scan_iter("relay:console:session:*")) == []
    assert not store.check(session_id, ["fingerprint-a"], active=True)


def test_only_activity_restarts_the_idle_timeout() -> None:
    store, clock, client = sessions()
    session_id = store.start("k")
    assert IDLE - 1 < ttl_of(client) <= IDLE
    [key] = client.scan_iter("relay:console:session:*")
    client.pexpire(key, 5_000)  # most of the idle time gone
    assert store.check(session_id, ["k"], active=False)  # a page refreshing itself
    assert ttl_of(client) <= 5
    clock.now += 100
    assert store.check(session_id, ["k"], active=True)  # the operator
    assert IDLE - 1 < ttl_of(client) <= IDLE


def test_no_activity_carries_a_session_past_its_lifetime() -> None:
    store, clock, client = sessions()
    session_id = store.start("k")
    clock.now += LIFETIME - 60
    assert store.check(session_id, ["k"], active=True)
    assert ttl_of(client) <= 60  # the record expires at the session's end
    clock.now += 60
    assert not store.check(session_id, ["k"], active=True)
    assert list(client.scan_iter("relay:console:session:*")) == []
