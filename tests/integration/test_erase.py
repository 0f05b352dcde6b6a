"""GDPR erasure removes every trace of one lead from Redis and the history database, and
nothing of another."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import redis
from sqlalchemy import select

from relay.config.settings import Settings
from relay.delivery.engine import Engine
from relay.delivery.gates import PauseGate
from relay.history import schema
from relay.operations import leads
from relay.operations.context import OperatorContext
from relay.store.erase import ErasureReport
from tests.support.helpers import config, make_app, run_queue
from tests.support.history import history_for
from tests.support.loopback import Sink
from tests.support.samples import sample

ADA = "ada.lovelace@example.com"
GRACE = "grace@example.com"


def dump(client: redis.Redis) -> dict[str, Any]:
    """Every key with its whole content, as text."""
    found: dict[str, Any] = {}
    for key in client.scan_iter():
        kind = client.type(key).decode()
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "hash":
            value = sorted(client.hgetall(key).items())
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = client.xrange(key)
        else:
            value = sorted(client.smembers(key))
        found[key.decode()] = str(value)
    return found


def dump_history(client: redis.Redis) -> dict[str, Any]:
    """Every row of every history table, as text, keyed ``table:<row key>``."""
    found: dict[str, Any] = {}
    with history_for(client).connect() as connection:
        for table in schema.metadata.sorted_tables:
            for row in connection.execute(select(table)):
                key = ":".join(str(getattr(row, c.name)) for c in table.primary_key.columns)
                found[f"{table.name}:{key}"] = str(tuple(row))
    return found


def traces(client: redis.Redis, text: str) -> list[str]:
    everything = {**dump(client), **dump_history(client)}
    return [key for key, value in everything.items() if text.lower() in value.lower()]


def grace_traces(client: redis.Redis) -> dict[str, Any]:
    """Everything about the other lead: whole keys and rows, and her entries in the shared
    inbox."""
    everything = {**dump(client), **dump_history(client)}
    found = {k: v for k, v in everything.items() if GRACE in v and k != "relay:dev:inbox"}
    found["inbox"] = [e for e in client.lrange("relay:dev:inbox", 0, -1) if GRACE.encode() in e]
    return found


def erase_lead(client: redis.Redis, email: str) -> ErasureReport:
    return leads.erase(OperatorContext(client, history_for(client)), email)


class World:
    def __init__(self, sink: Sink) -> None:
        self.redis = fakeredis.FakeRedis()
        cfg = config([
            {"name": "crm", "type": "webhook", "url": f"{sink.url}/crm",
             "retry": {"schedule": []}},
            {"name": "inbox", "type": "webhook", "url": f"{sink.url}/inbox",
             "retry": {"schedule": ["1h"]}},
        ], sources={"kickofflabs": {}})
        self.client = make_app(cfg, self.redis, Settings(dev_inbox=True)).test_client()
        self.relay = Engine(Settings(), cfg, self.redis, gates=(PauseGate(self.redis),))

    def post(self, email: str, event: str = "new_signup", **changes: Any) -> str:
        response = self.client.post("/hooks/kickofflabs",
                                    json=sample(event, email=email, **changes))
        assert response.status_code == 202
        event_id: str = response.get_json()["event_id"]
        return event_id

    def run_queue(self) -> None:
        run_queue(self.relay, self.redis)


def test_erasure_removes_every_trace_of_one_lead_and_nothing_else(sink: Sink) -> None:
    world = World(sink)
    sink.script("/crm", [400])  # Ada's signup: a dead letter at the CRM ...
    sink.script("/inbox", [500])  # ... and a retry parked for an hour at the inbox
    world.post(ADA.upper(), social_id="ada1")
    world.run_queue()
    world.post(GRACE, social_id="grace1")
    world.run_queue()
    PauseGate(world.redis).pause("inbox")  # Ada's next event: held in the inbox's lane
    world.post(ADA, "score_change", social_id="ada1")
    world.post(GRACE, "score_change", social_id="grace1")
    world.run_queue()
    world.post(ADA, "verified", social_id="ada1")  # still on the queue, not processed
    for email in (ADA, GRACE):  # what the dev inbox received (JSON and form)
        world.client.post("/dev/inbox", json={"email": email, "__event": "new_signup"})
    world.client.post("/dev/inbox", data={"email": ADA, "__event": "tagged"})
    assert traces(world.redis, ADA)
    grace_before = grace_traces(world.redis)
    assert sum(k.startswith("relay_events:") for k in grace_before) == 2 and grace_before["inbox"]

    report = erase_lead(world.redis, f"  {ADA.title()} ")

    assert traces(world.redis, ADA) == []
    assert traces(world.redis, "ada1") == []
    for event_id in report.event_ids:
        assert traces(world.redis, event_id) == [], event_id
    assert len(report.event_ids) == 3
    assert report.removed["dead_letters"] == 1
    assert report.removed["dev_inbox"] == 2
    assert report.removed["queued_events"] == 1
    assert report.removed["parked_deliveries"] == 1
    assert report.removed["lane_entries"] == 1
    assert grace_traces(world.redis) == grace_before


def test_erasing_an_unknown_address_changes_nothing(sink: Sink) -> None:
    world = World(sink)
    world.post(GRACE)
    world.run_queue()
    before = dump(world.redis)
    report = erase_lead(world.redis, "nobody@example.com")
    assert report.event_ids == set() and sum(report.removed.values()) == 0
    assert dump(world.redis) == before


def test_the_report_is_json(sink: Sink) -> None:
    world = World(sink)
    world.post(ADA)
    world.run_queue()
    report = erase_lead(world.redis, ADA).to_json()
    assert json.loads(json.dumps(report))["email"] == ADA
    assert report["removed"]["events"] == 1
