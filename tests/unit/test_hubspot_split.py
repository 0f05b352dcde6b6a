"""A batch HubSpot refuses whole is split within the send's own timeout: the delivery's lease
is that timeout and a margin, so a split that ran on past it would be taken over by another
worker and sent twice."""

from __future__ import annotations

import json
import time
from typing import Any

from relay.core.errors import RetryableDeliveryError
from relay.core.models import BatchPolicy, Destination, LeadEvent
from relay.drivers.http import HttpResponse
from relay.drivers.hubspot import MIN_REQUEST_TIME, HubSpotDriver


class SlowRefusingHubSpot:
    """Answers a whole-batch 400 naming no input to every request of more than one contact,
    each after ``delay`` seconds (a slow account)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.timeouts: list[float] = []

    def request(self, method: str, url: str, *, body: bytes, headers: Any,
                timeout: float) -> HttpResponse:
        self.timeouts.append(timeout)
        time.sleep(self.delay)
        if len(json.loads(body)["inputs"]) > 1:
            return HttpResponse(400, {}, json.dumps({
                "status": "error", "message": "Invalid input JSON",
                "category": "VALIDATION_ERROR"}).encode())
        return HttpResponse(200, {}, json.dumps({"results": []}).encode())


def test_a_split_batch_stays_within_the_sends_timeout() -> None:
    timeout = 2.0
    destination = Destination(name="crm", type="hubspot", timeout=timeout,
                              batch=BatchPolicy(max=100, wait=0.2),
                              options={"access_token": "pat-secret"})
    vendor = SlowRefusingHubSpot(delay=0.4)
    events = [LeadEvent(event_id=f"evt_{i}", source="kickofflabs", name="new_signup",
                        payload={"email": f"lead{i}@example.com"}, received_at=1.0 + i)
              for i in range(100)]
    answers = HubSpotDriver(destination, http=vendor).send_batch(events)
    # Each request gets what is left of the send's timeout, never a fresh one; with less
    # than MIN_REQUEST_TIME left the rest of the batch is retried, not split further (it was
    # 16 requests of 10 s each, 160 s against a lease of 20 s).
    assert len(vendor.timeouts) <= timeout / vendor.delay
    assert vendor.timeouts[0] <= timeout and vendor.timeouts[-1] >= MIN_REQUEST_TIME
    assert vendor.timeouts == sorted(vendor.timeouts, reverse=True)
    assert len(answers) == 100 and answers.requests == len(vendor.timeouts)
    assert all(isinstance(a, RetryableDeliveryError) for a in answers)
