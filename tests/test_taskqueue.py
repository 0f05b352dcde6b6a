"""The queue's safety net for kombu's BRPOP window: a queued task is remembered until it
starts, and put back if it never does (relay.taskqueue)."""

from __future__ import annotations

import json

import fakeredis
from helpers import config, sample

from relay.delivery.engine import Engine
from relay.models import LeadEvent
from relay.settings import Settings
from relay.taskqueue import (
    DELIVER,
    NOT_STARTED_DUE_KEY,
    NOT_STARTED_KEY,
    PROCESS_EVENT,
    QUEUE,
    TaskQueue,
)


def event_message(event_id: str = "evt_1") -> dict[str, object]:
    return LeadEvent(event_id, "kickofflabs", "new_signup", sample("new_signup")).to_json()


def test_a_task_taken_off_the_queue_but_never_started_is_put_back_once_the_queue_is_empty(
) -> None:
    client = fakeredis.FakeRedis()
    queue = TaskQueue(client, grace=10)
    task_id = queue.publish(PROCESS_EVENT, [event_message()], "evt_1")
    assert client.hexists(NOT_STARTED_KEY, task_id)
    message = client.rpop(QUEUE)  # a worker's BRPOP ... and then kill -9
    assert queue.requeue_lost(now=1e12) == 1  # grace over, queue empty: put back
    assert client.lrange(QUEUE, 0, -1) == [message]
    assert queue.requeue_lost(now=1e12) == 0  # not again while it waits in the queue


def test_nothing_is_put_back_before_the_grace_or_while_the_queue_has_work() -> None:
    client = fakeredis.FakeRedis()
    queue = TaskQueue(client, grace=10)
    queue.publish(PROCESS_EVENT, [event_message("evt_1")], "evt_1")
    client.rpop(QUEUE)
    assert queue.requeue_lost() == 0  # within the grace
    queue.publish(PROCESS_EVENT, [event_message("evt_2")], "evt_2")
    assert queue.requeue_lost(now=1e12) == 0  # a backlog is never duplicated


def test_starting_a_task_forgets_it() -> None:
    client = fakeredis.FakeRedis()
    relay = Engine(Settings(), config([]), client)
    task_id = relay.queue.publish(PROCESS_EVENT, [event_message()], "evt_1")
    client.rpop(QUEUE)  # a worker takes it
    relay.process_event(event_message(), task_id)
    assert client.hlen(NOT_STARTED_KEY) == 0 and client.zcard(NOT_STARTED_DUE_KEY) == 0

    relay.queue.park(DELIVER, ["evt_1", "gone"], "x", due=0)
    assert relay.queue.release_due() == 1  # released tasks are remembered as well
    (message,) = client.lrange(QUEUE, 0, -1)
    released_id = json.loads(message)["headers"]["id"]
    assert client.hexists(NOT_STARTED_KEY, released_id)
    relay.deliver("evt_1", "gone", released_id)
    assert client.hlen(NOT_STARTED_KEY) == 0
