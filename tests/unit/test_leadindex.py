"""The lead index (console lead search): by email, social_id, phone and event id, newest first,
bounded by the retention, and gone with ``relay erase``. Events are indexed the way the workers
index a newly admitted event: one :func:`relay.store.lead_index.index_event` call each."""

from __future__ import annotations

import json

import fakeredis

from relay.core.models import LeadEvent
from relay.store import lead_index as leadindex
from relay.store.erase import erase_lead
from relay.store.lead_index import index_event, search
from tests.support.samples import sample

DAY = 86400.0


def event(n: int, at: float, **payload: object) -> LeadEvent:
    return LeadEvent(f"evt_{n:04d}", "kickofflabs", "new_signup",
                     sample("new_signup", **payload), received_at=at)


def test_a_lead_is_found_by_email_social_id_or_phone_newest_first() -> None:
    client = fakeredis.FakeRedis()
    now = 1_800_000_000.0
    index_event(client, event(1, now - 60, email="Ada@Example.com", social_id="ada1",
                              phone_number="+1 (555) 010-0000"), DAY)
    index_event(client, event(2, now, email="ada@example.com", social_id="ada1",
                              phone_number=None), DAY)
    index_event(client, event(3, now, email="grace@example.com", social_id="g1"), DAY)
    assert search(client, "ada@example.com").event_ids == ["evt_0002", "evt_0001"]
    assert search(client, " ADA@example.com ").event_ids == ["evt_0002", "evt_0001"]
    assert search(client, "ada1").event_ids == ["evt_0002", "evt_0001"]
    assert search(client, "+15550100000").event_ids == ["evt_0001"]
    assert search(client, "evt_0003").event_ids == ["evt_0003"]
    assert search(client, "nobody@example.com").event_ids == []
    latest = search(client, "")
    assert latest.total == 3 and latest.event_ids[-1] == "evt_0001"


def test_indexing_twice_keeps_one_entry_and_pages_are_bounded() -> None:
    client = fakeredis.FakeRedis()
    for n in range(30):
        index_event(client, event(n, 1000.0 + n, email="ada@example.com"), DAY)
    index_event(client, event(29, 1029.0, email="ada@example.com"), DAY)
    first = search(client, "ada@example.com", offset=0, limit=25)
    second = search(client, "ada@example.com", offset=25, limit=25)
    assert first.total == 30 and len(first.event_ids) == 25 and first.event_ids[0] == "evt_0029"
    assert second.event_ids == [f"evt_{n:04d}" for n in range(4, -1, -1)]


def test_entries_older_than_the_retention_go_and_keys_expire() -> None:
    client = fakeredis.FakeRedis()
    index_event(client, event(1, 1000.0, email="ada@example.com"), 100.0)
    index_event(client, event(2, 1200.0, email="ada@example.com"), 100.0)
    assert search(client, "ada@example.com").event_ids == ["evt_0002"]
    assert 0 < client.ttl(leadindex.email_key("ada@example.com")) <= 100


def test_erase_removes_the_leads_entries_and_no_one_elses() -> None:
    client = fakeredis.FakeRedis()
    ada = event(1, 1000.0, email="ada@example.com", social_id="ada1", phone_number="+44 20")
    grace = event(2, 1001.0, email="grace@example.com", social_id="g1", phone_number="+44 20")
    client.hset("relay:event:evt_0001", "event", json.dumps(ada.to_json()))
    index_event(client, ada, DAY)
    index_event(client, grace, DAY)
    report = erase_lead(client, "ADA@example.com")
    assert report.removed["lead_index_entries"] == 3
    assert search(client, "ada@example.com").event_ids == []
    assert search(client, "ada1").event_ids == []
    assert search(client, "+4420").event_ids == ["evt_0002"]  # Grace's, sharing the number
    assert search(client, "").event_ids == ["evt_0002"]
    assert not [k for k in client.scan_iter() if b"ada" in k.lower() or b"0001" in k]


def test_given_a_pipeline_it_only_queues_the_commands() -> None:
    # A Pipeline is a Redis too: the worker's one round trip must carry the commands, not a
    # second pipeline of their own sent on the side.
    import fakeredis

    from relay.core.models import LeadEvent
    from relay.store.lead_index import index_event, search

    client = fakeredis.FakeRedis()
    event = LeadEvent("evt_1", "kickofflabs", "new_signup", {"email": "ada@example.com"})
    pipe = client.pipeline(transaction=False)
    index_event(pipe, event, 3600)
    assert client.dbsize() == 0  # nothing sent yet
    assert len(pipe) > 0
    pipe.execute()
    assert search(client, "ada@example.com").event_ids == ["evt_1"]
