"""The admin API on fakeredis with a loopback sink: event detail, deliveries, dead letters and
their replay, destination health, pause / resume, erasure, authentication; and the bounds that
keep the delivery log's memory in check."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import fakeredis
import pytest

from relay.config.settings import Settings
from relay.delivery.engine import Engine
from relay.delivery.gates import default_gates
from tests.support.helpers import config, make_app, run_queue
from tests.support.loopback import Sink
from tests.support.samples import sample

KEY = "admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class World:
    def __init__(self, sink: Sink, settings: Settings | None = None,
                 schedule: list[str] | None = None) -> None:
        self.redis = fakeredis.FakeRedis()
        self.settings = settings or Settings(api_keys=(KEY,))
        retry = {"schedule": schedule if schedule is not None else ["1h"]}
        self.config = config(
            # One delivery in flight at a time: lists "newest first" in a predictable order.
            [{"name": name, "type": "webhook", "url": f"{sink.url}/{name}", "retry": retry,
              "concurrency": 1}
             for name in ("crm", "backend")], sources={"kickofflabs": {}})
        self.app = make_app(self.config, self.redis, self.settings)
        self.client = self.app.test_client()
        self.relay = Engine(self.settings, self.config, self.redis,
                           gates=default_gates(self.redis))
        self.sink = sink

    def post(self, n: int) -> str:
        response = self.client.post("/hooks/kickofflabs", json=sample(
            "new_signup", email=f"lead{n}@example.com", social_id=f"s{n}", id=n))
        assert response.status_code == 202
        event_id: str = response.get_json()["event_id"]
        return event_id

    def run_queue(self) -> None:
        run_queue(self.relay, self.redis)

    def get(self, path: str, **kwargs: Any) -> Any:
        response = self.client.get(path, headers=AUTH, **kwargs)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    def post_api(self, path: str, body: Any = None, status: int = 200) -> Any:
        response = self.client.post(path, json=body, headers=AUTH)
        assert response.status_code == status, response.get_data(as_text=True)
        return response.get_json()


@pytest.mark.parametrize(("method", "path"), [
    ("get", "/api/events/x"), ("get", "/api/deliveries?destination=crm"),
    ("get", "/api/dead-letters"), ("post", "/api/dead-letters/replay"),
    ("get", "/api/destinations"), ("post", "/api/destinations/crm/pause"),
    ("post", "/api/destinations/crm/resume"), ("post", "/api/erase"),
])
def test_every_endpoint_needs_a_key(sink: Sink, method: str, path: str) -> None:
    world = World(sink)
    assert getattr(world.client, method)(path).status_code == 401
    wrong = getattr(world.client, method)(path, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.get_json()["error"] == "invalid API key"


def test_event_detail_tells_where_the_lead_went_and_why_not(sink: Sink) -> None:
    world = World(sink)
    sink.script("/crm", [(503, {"Retry-After": "30"})])
    event_id = world.post(1)
    world.post(1)  # a duplicate
    world.run_queue()
    detail = world.get(f"/api/events/{event_id}")
    assert detail["name"] == "new_signup"
    assert detail["payload"]["email"] == "lead1@example.com"
    assert detail["duplicates"] == 1
    crm, backend = detail["destinations"]["crm"], detail["destinations"]["backend"]
    assert backend["status"] == "delivered"
    assert crm["status"] == "retrying" and crm["last_status"] == 503
    assert crm["attempts_log"][0]["outcome"] == "retrying"
    assert crm["next_attempt_at"] > crm["updated_at"]
    missing = world.client.get("/api/events/nope", headers=AUTH)
    assert missing.status_code == 404


def test_deliveries_by_destination_and_status_page_newest_first(sink: Sink) -> None:
    world = World(sink)
    ids = [world.post(n) for n in range(5)]
    world.run_queue()
    sink.script("/crm", [500])
    retrying = world.post(9)
    world.run_queue()
    page = world.get("/api/deliveries?destination=crm&status=delivered&limit=3")
    assert [d["event_id"] for d in page["deliveries"]] == ids[::-1][:3]
    assert all(d["status"] == "delivered" and d["attempts"] == 1 for d in page["deliveries"])
    rest = world.get(f"/api/deliveries?destination=crm&status=delivered&limit=3"
                     f"&cursor={page['next_cursor']}")
    assert [d["event_id"] for d in rest["deliveries"]] == ids[::-1][3:]
    assert rest["next_cursor"] is None
    both = world.get("/api/deliveries?destination=crm")["deliveries"]
    assert both[0]["event_id"] == retrying and both[0]["status"] == "retrying"
    # A query the server cannot use is a 400 on every admin endpoint (issue 12).
    assert world.client.get("/api/deliveries", headers=AUTH).status_code == 400
    assert world.client.get("/api/deliveries?destination=crm&status=lost",
                            headers=AUTH).status_code == 400


def test_replaying_dead_letters_after_recovery_delivers_each_once(sink: Sink) -> None:
    world = World(sink, schedule=[])  # one attempt: failures are dead letters at once
    sink.script("/crm", [500] * 4)
    ids = [world.post(n) for n in range(4)]
    world.run_queue()
    letters = world.get("/api/dead-letters")["dead_letters"]
    assert len(letters) == 4 and {d["destination"] for d in letters} == {"crm"}
    assert "payload" not in str(letters)  # the list does not carry the leads' data
    assert world.get("/api/dead-letters?destination=backend")["dead_letters"] == []

    # The sink has recovered. One by id, then the rest by destination, then "all" again.
    assert world.post_api("/api/dead-letters/replay", {"ids": [f"{ids[0]}|crm"]}) == {
        "queued": 1}
    assert world.post_api("/api/dead-letters/replay", {"destination": "crm"}) == {"queued": 3}
    assert world.post_api("/api/dead-letters/replay", {"all": True}) == {"queued": 0}
    assert world.post_api("/api/dead-letters/replay", {"ids": [ids[1]]}) == {"queued": 0}
    world.run_queue()
    delivered = Counter(r.headers["webhook-id"] for r in sink.requests("/crm")[4:])
    assert sorted(delivered) == sorted(ids) and set(delivered.values()) == {1}
    assert world.get("/api/dead-letters")["dead_letters"] == []
    states = {world.get(f"/api/events/{i}")["destinations"]["crm"]["status"] for i in ids}
    assert states == {"delivered"}


def test_replay_needs_exactly_one_choice(sink: Sink) -> None:
    world = World(sink)
    for body in ({}, {"all": True, "destination": "crm"}, {"ids": []}, {"ids": "x"}):
        assert world.post_api("/api/dead-letters/replay", body, status=422)["error"]


def test_destinations_say_when_and_why_they_were_paused(sink: Sink) -> None:
    world = World(sink)
    before = time.time()
    world.post_api("/api/destinations/backend/pause", {"reason": "maintenance"})
    world.post_api("/api/destinations/crm/pause")
    found = {d["name"]: d for d in world.get("/api/destinations")["destinations"]}
    assert found["backend"]["paused_reason"] == "maintenance"
    assert before <= found["backend"]["paused_at"] <= time.time()
    assert found["crm"]["paused_reason"] == "" and found["crm"]["paused_at"] >= before
    world.post_api("/api/destinations/backend/resume")
    backend = {d["name"]: d for d in world.get("/api/destinations")["destinations"]}["backend"]
    assert backend["paused_at"] is None and backend["paused_reason"] is None
    document = world.client.get("/api/openapi.json").get_json()
    described = next(s for name, s in document["components"]["schemas"].items()
                     if "paused_reason" in s.get("properties", {}))
    assert {"paused_at", "paused_reason"} <= set(described["required"]), described


def test_destinations_report_state_and_health(sink: Sink) -> None:
    world = World(sink)
    sink.script("/crm", [500, 500])
    world.post(1)
    world.post(2)
    world.run_queue()
    world.post(3)
    world.post_api("/api/destinations/backend/pause", {"reason": "maintenance"})
    world.run_queue()
    found = {d["name"]: d for d in world.get("/api/destinations")["destinations"]}
    crm, backend = found["crm"], found["backend"]
    assert crm["state"] == "active" and crm["type"] == "webhook"
    assert crm["success_rate"] == pytest.approx(1 / 3, abs=0.001)
    assert crm["retrying"] == 2 and crm["parked"] == 2 and crm["dead"] == 0
    assert "500" in crm["last_error"]
    # A paused destination's deliveries wait in its lane, in order.
    assert backend["state"] == "paused" and backend["queued"] == 1 and backend["delivered"] == 2
    assert backend["parked"] == 0

    resumed = world.post_api("/api/destinations/backend/resume")
    assert resumed == {"destination": "backend", "state": "active", "released": 1}
    world.run_queue()
    assert len(sink.requests("/backend")) == 3
    assert world.post_api("/api/destinations/nope/pause", status=404)["error"]


def test_erase_endpoint(sink: Sink) -> None:
    world = World(sink)
    event_id = world.post(1)
    world.post(2)
    world.run_queue()
    report = world.post_api("/api/erase", {"email": "Lead1@Example.com"})
    assert report["event_ids"] == [event_id]
    assert report["removed"]["events"] == 1
    assert world.client.get(f"/api/events/{event_id}", headers=AUTH).status_code == 404
    assert world.post_api("/api/erase", {"email": "not an address"}, status=422)


def test_the_delivery_log_stays_bounded_under_a_flood(sink: Sink) -> None:
    # Redis keeps only the work in flight: once the history is written, a delivered event
    # leaves a short dedupe marker and its final states for a few minutes, nothing that lives
    # for the retention period; the database has every delivery and every attempt.
    world = World(sink, settings=Settings(api_keys=(KEY,), retention=120))
    for n in range(25):
        world.post(n)
    world.run_queue()
    for key in world.redis.scan_iter():
        name = key.decode()
        assert not name.startswith(("relay:event:", "relay:log:", "relay:recent:",
                                    "relay:dead")), name
        if name.startswith(("relay:delivery:", "relay:seen:")):
            assert 0 < world.redis.ttl(key) <= 600, name
    listed = world.get("/api/deliveries?destination=crm&limit=500")["deliveries"]
    assert len(listed) == 25
    assert world.redis.xlen("relay:history") == 0
    event_id = listed[0]["event_id"]
    assert [a["outcome"] for a in world.get(f"/api/events/{event_id}")["destinations"]["crm"][
        "attempts_log"]] == ["delivered"]


# -- strict input (issue 12) -------------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "limit=abc", "limit=0", "limit=-1", "limit=100000", "limit=1.5",
    "limit=%205", "limit=1_0", "limit=", "offset=x", "offset=-1", "offset=99999999",
    "offset=1&offset=2", "limit=5&limit=5", "destination=",
])
def test_dead_letter_queries_out_of_bounds_are_400(sink: Sink, query: str) -> None:
    world = World(sink)
    response = world.client.get(f"/api/dead-letters?{query}", headers=AUTH)
    assert response.status_code == 400, query
    body = response.get_json()
    assert set(body) == {"error", "details"} and body["details"]


@pytest.mark.parametrize("query", ["cursor=abc", "cursor=nan", "cursor=inf", "cursor=1e999",
                                   "limit=0", "limit=501", "destination=crm&destination=x"])
def test_delivery_queries_out_of_bounds_are_400(sink: Sink, query: str) -> None:
    world = World(sink)
    target = f"/api/deliveries?{query}" + ("" if "destination" in query else "&destination=crm")
    assert world.client.get(target, headers=AUTH).status_code == 400, query


def test_dead_letter_paging_in_bounds(sink: Sink) -> None:
    world = World(sink, schedule=[])
    sink.script("/crm", [500] * 3)
    for n in range(3):
        world.post(n)
    world.run_queue()
    assert len(world.get("/api/dead-letters?limit=2")["dead_letters"]) == 2
    assert len(world.get("/api/dead-letters?limit=2&offset=2")["dead_letters"]) == 1
    assert len(world.get("/api/dead-letters?destination=crm&offset=0")["dead_letters"]) == 3


@pytest.mark.parametrize("body", [b"{", b"not json", b"[]", b'"paused"', b"\xff\xfe", b"NaN",
                                  b'{"reason": 5}'])
def test_pause_with_a_bad_body_is_refused_and_changes_nothing(sink: Sink, body: bytes) -> None:
    world = World(sink)
    response = world.client.post("/api/destinations/crm/pause", data=body, headers=AUTH,
                                 content_type="application/json")
    assert response.status_code == (422 if body.startswith(b"{\"") else 400), body
    assert set(response.get_json()) == {"error", "details"}
    assert world.get("/api/destinations")["destinations"][1]["state"] == "active"


@pytest.mark.parametrize(("path", "body"), [
    ("/api/dead-letters/replay", b"{"), ("/api/erase", b"[1]"),
    ("/api/destinations/crm/resume", b"{oops"),
])
def test_every_post_refuses_an_unparseable_body(sink: Sink, path: str, body: bytes) -> None:
    world = World(sink)
    response = world.client.post(path, data=body, headers=AUTH, content_type="application/json")
    assert response.status_code == 400


def test_an_empty_pause_body_is_fine(sink: Sink) -> None:
    world = World(sink)
    response = world.client.post("/api/destinations/crm/pause", headers=AUTH)
    assert response.status_code == 200 and response.get_json()["state"] == "paused"


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/api/erase", {"POST", "OPTIONS"}),
    ("DELETE", "/api/dead-letters", {"GET", "HEAD", "OPTIONS"}),
    ("GET", "/api/destinations/crm/pause", {"POST", "OPTIONS"}),
    ("PATCH", "/hooks/kickofflabs", {"POST", "OPTIONS"}),
    ("PUT", "/v2/1/outbound-webhook", {"GET", "HEAD", "POST", "DELETE", "OPTIONS"}),
])
def test_405_carries_allow(sink: Sink, method: str, path: str, allowed: set[str]) -> None:
    world = World(sink)
    response = world.client.open(path, method=method, headers=AUTH)
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == allowed
    body = response.get_json()
    assert set(body) == ({"message"} if path.startswith("/v2/") else {"error", "details"})


def test_the_subscription_api_family_keeps_its_shape_for_flask_errors(sink: Sink) -> None:
    world = World(sink)
    response = world.client.get("/v2/not-a-number/outbound-webhook", headers=AUTH)
    assert response.status_code == 404
    assert set(response.get_json()) == {"message"}


def test_admin_keys_are_compared_exactly(sink: Sink) -> None:
    world = World(sink)
    assert world.client.get(f"/api/destinations?api_key=%20{KEY}").status_code == 401
    assert world.client.get(f"/api/destinations?api_key={KEY}%1C").status_code == 401
    assert world.client.get("/api/destinations?api_key=", headers=AUTH).status_code == 401
    assert world.client.get(f"/api/destinations?api_key={KEY}", headers=AUTH).status_code == 200
