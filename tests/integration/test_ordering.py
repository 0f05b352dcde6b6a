"""``ordering: per_lead`` with real ``relay worker`` processes and a real receiver: each lead's
events arrive in the order the ingress received them, through failed first attempts and their
retries, and never two of one lead at once. The rules one by one are in
tests/unit/test_ordering.py."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler
from typing import Any

import redis

from relay.store.keys import ORDER_PREFIX, stats_key
from tests.support.deployment import RelayDeployment
from tests.support.helpers import wait_for
from tests.support.loopback import LoopbackHTTPServer
from tests.support.samples import sample

LEADS = 100
STEPS = 5


class OrderedReceiver:
    """A loopback receiver that records each request's (lead, step) as it arrives, answers 503
    to the first attempt of the events in ``fail`` and 200 to everything else, and counts how
    many requests of one lead it ever had at once."""

    def __init__(self, fail: set[tuple[str, int]]) -> None:
        self.fail = set(fail)
        self.arrived: dict[str, list[tuple[int, int]]] = defaultdict(list)  # lead: (step, status)
        self.open: Counter[str] = Counter()
        self.most_open = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                lead, step = body["email"], body["step"]
                with receiver.lock:
                    receiver.open[lead] += 1
                    receiver.most_open = max(receiver.most_open, receiver.open[lead])
                    status = 503 if (lead, step) in receiver.fail else 200
                    receiver.fail.discard((lead, step))
                    receiver.arrived[lead].append((step, status))
                time.sleep(0.005)  # an answer takes a moment: a second request would overlap
                with receiver.lock:
                    receiver.open[lead] -= 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = LoopbackHTTPServer(Handler)

    def delivered(self) -> int:
        with self.lock:
            return sum(status == 200 for steps in self.arrived.values() for _, status in steps)


def test_100_leads_x_5_events_arrive_in_order_per_lead_through_failed_first_attempts(
        deployment: RelayDeployment) -> None:
    leads = [f"lead{n}@example.com" for n in range(LEADS)]
    # Some events fail their first attempt: their lead's later events must wait for the retry.
    fail = {(lead, n % STEPS) for n, lead in enumerate(leads) if n % 4 == 0}
    fail |= {(lead, STEPS - 1) for lead in leads[1::10]}
    receiver = OrderedReceiver(fail)
    with receiver.server:
        deployment.configure({"destinations": [{
            "name": "crm", "type": "webhook", "url": f"{receiver.server.url}/crm",
            "ordering": "per_lead", "retry": {"schedule": ["1s", "1s", "1s"]}}]})
        deployment.start_worker(processes=2)  # two admitters and two drainers at once
        client = deployment.web_client()
        for step in range(STEPS):  # the leads' events interleaved, as a campaign sends them
            for n, lead in enumerate(leads):
                response = client.post("/hooks/kickofflabs", headers={
                    "Idempotency-Key": f"{n}-{step}"}, json=sample(
                        "score_change", email=lead, social_id=f"s{n}", id=n, step=step))
                assert response.status_code == 202
        wait_for(lambda: receiver.delivered() == LEADS * STEPS, timeout=90, interval=0.2,
                 message="every event delivered")
    for lead in leads:
        failed = sorted(step for (who, step) in fail if who == lead)
        expected = sorted([*range(STEPS), *failed])
        assert [step for step, _ in receiver.arrived[lead]] == expected, lead
        assert [status for step, status in receiver.arrived[lead]] == [
            503 if step in failed and seen == 0 else 200
            for step, seen in _with_seen(expected)], lead
    assert receiver.most_open == 1  # never two events of one lead at once
    client_redis = redis.Redis.from_url(deployment.redis_url)
    assert list(client_redis.scan_iter(match=ORDER_PREFIX + "*")) == []
    assert int(client_redis.hget(stats_key("crm"), "waiting") or 0) == 0


def _with_seen(steps: list[int]) -> list[tuple[int, int]]:
    """Each step with how many times it came before."""
    seen: Counter[int] = Counter()
    out = []
    for step in steps:
        out.append((step, seen[step]))
        seen[step] += 1
    return out
