"""The Celery floor: what one Celery task per event costs before the relay does anything.

``celery -A bench.celery_floor worker …`` (started by :mod:`bench.delivery` with the exact
``relay worker`` options): the relay's own Celery app and settings (JSON, ``acks_late``,
``reject_on_worker_lost``, prefetch, the Redis transport and its visibility timeout) with one
more task, ``bench.post``, that POSTs its body to each URL of ``BENCH_URLS`` with the bare
consumer's urllib3 ``PoolManager`` and nothing else: no dedupe, no routing, no claim or confirm,
no delivery log. The relay cannot go faster than this on the same machine; ``bench.delivery``
prints it between the bare consumer and the relay, so the gap the relay itself owes is visible.

The bench queues the bodies as ordinary Celery messages (``send_task``) before the worker
starts, and reads the drain from the broker's own keys: the queue and the transport's
unacknowledged-message hash are both empty when every task has finished.
"""

from __future__ import annotations

import os

import urllib3

from relay.taskqueue import QUEUE
from workers.celery_app import app

TASK = "bench.post"
UNACKED_KEY = "unacked"  # kombu's Redis transport: messages taken but not yet acknowledged
_pool = urllib3.PoolManager(num_pools=64, maxsize=4, block=False)


@app.task(name=TASK, ignore_result=True)
def post(body: str) -> None:
    for url in os.environ["BENCH_URLS"].split():
        _pool.request("POST", url, body=body, timeout=urllib3.Timeout(connect=5, read=10),
                      retries=False, redirect=False, preload_content=True,
                      headers={"Content-Type": "application/json", "User-Agent": "KickoffLabs"})


def enqueue(bodies: list[str]) -> None:
    with app.producer_or_acquire() as producer:
        for body in bodies:
            app.send_task(TASK, [body], queue=QUEUE, producer=producer)
