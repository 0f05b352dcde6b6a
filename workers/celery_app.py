"""The Celery app: ``celery -A workers.celery_app worker`` (what ``relay worker`` runs).

The one module that builds at import time. Settings are chosen for SPEC §4 (at least once):

- JSON only, results ignored (nobody reads them; the delivery log is the record).
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after its
  task finished, and comes back if the worker process dies; a per-task run counter in Redis
  turns a task that kills its worker ``RELAY_MAX_TASK_RUNS`` times into a dead letter.
- ``visibility_timeout`` (RELAY_VISIBILITY_TIMEOUT, 5 min) is above the hard time limit
  (RELAY_TASK_TIME_LIMIT, 2 min): a running task is never handed to a second worker, and the
  tasks of a ``kill -9``-ed worker come back within minutes. Long retry delays never use ETAs or
  countdowns (which the visibility timeout would cut short); they are parked in Redis.
- prefetch 4 per process: enough to hide the broker round trip, few enough that a SIGTERM-ed
  worker hands little back (warm shutdown requeues unacknowledged messages at once).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init
from kombu import Queue

from relay.config import load_config
from relay.logs import configure_logging
from relay.settings import Settings
from relay.taskqueue import QUEUE
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
        # A hard time limit kills the pool process mid-task: requeue the message like any
        # lost worker (the run counter turns a repeat offender into a dead letter) instead of
        # acknowledging it, which would drop the event's remaining deliveries unrecorded.
        task_acks_on_failure=True,
        task_acks_on_timeout=False,
        task_time_limit=int(settings.task_time_limit),
        task_soft_time_limit=max(1, int(settings.task_time_limit) - 5),
        task_default_queue=QUEUE,
        task_queues=(Queue(QUEUE),),
        worker_prefetch_multiplier=4,
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
    configure_logging(settings.log_format, logging.getLevelName(loglevel) if isinstance(
        loglevel, int) else loglevel)
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
