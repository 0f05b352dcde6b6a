"""The Celery app: ``celery -A workers.celery_app worker`` (what ``relay worker`` runs).

The one module that builds at import time. Settings are chosen for SPEC §4 (at least once) and
the delivery lanes (:mod:`relay.delivery`):

- A task is a batch: ``relay.admit`` drains the intake stream, ``relay.drain`` one
  destination's lane, each until its stream is empty or its budget is spent. The streams hold
  every event and delivery until its outcome is recorded, so what a lost or failed task did
  not finish stays in its stream for the next one.
- The **threads** pool: ``--concurrency`` tasks (lanes) at once in one process, and every
  drain sends on the process's pool of ``RELAY_MAX_IN_FLIGHT`` threads, so a destination
  that takes 2 s to answer holds its own share of those and nothing else. Time limits are the
  engine's own (a drain hands over after its budget and gives up on a send past
  ``RELAY_TASK_TIME_LIMIT``; each request is cut at its destination's ``timeout``): Celery's
  threads pool enforces none.
- JSON only, results ignored (the delivery log is the record), ``task_acks_late`` with
  ``task_reject_on_worker_lost``, ``visibility_timeout`` (RELAY_VISIBILITY_TIMEOUT) above the
  task time limit. Retry delays never use ETAs or countdowns: they are parked in Redis.
- prefetch 1 per thread: kicks are cheap to fetch, and a SIGTERM-ed worker hands back little.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init
from kombu import Queue

from relay.config.relay_yaml import load_config
from relay.config.settings import Settings
from relay.delivery.kicks import QUEUE
from relay.observability.logs import configure_logging, lean_records
from workers import broker
from workers.scheduler import SchedulerStep


def create_celery(settings: Settings) -> Celery:
    celery = Celery("leadrelay", include=["workers.tasks"])
    celery.conf.update(
        broker_url=settings.redis_url,
        broker_transport_options={
            "visibility_timeout": int(settings.visibility_timeout),
            # kombu sweeps for expired unacknowledged messages every interval x throttle
            # seconds (100 s by default); sweep every few seconds instead, so a killed
            # worker's tasks are back soon after the visibility timeout.
            "unacked_restore_interval": max(1, min(10, int(settings.visibility_timeout // 5))),
            "unacked_restore_throttle": 1,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 25,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep reconnecting while Redis is away
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_pool="threads",
        task_default_queue=QUEUE,
        task_queues=(Queue(QUEUE),),
        worker_prefetch_multiplier=1,
        # Off by default (a quarter of a delivery's CPU): Flower turns them on while it runs,
        # `relay worker --task-events` from the start.
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    celery.steps["worker"].add(SchedulerStep)
    return celery


@setup_logging.connect
def _configure_logging(loglevel: Any = None, **_: Any) -> None:
    # Connected, so Celery leaves logging to us: the relay's format (RELAY_LOG_FORMAT) for the
    # worker's own lines too.
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else loglevel
    configure_logging(settings.log_format, level or settings.log_level)
    lean_records()  # a line per attempt: nothing in it that no line shows
    # Celery's "Task … received" and "Task … succeeded" lines repeat, less readably, the
    # relay's own line per attempt (and dump the whole message or the task's return value:
    # a tenth of the consumer's CPU); failures still show at WARNING and above, and Flower
    # shows every task.
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)


broker.install()
settings = Settings.from_env()
app = create_celery(settings)


@worker_init.connect
def _check_config(**_: object) -> None:
    """Fail at start-up on a bad config rather than requeueing every task forever."""
    load_config(settings.config_path)
