"""Probes and counters: ``/healthz`` (the process is up), ``/readyz`` (Redis answers),
``/metrics`` (Prometheus text, :mod:`relay.observability.metrics`) and the ingress counters."""

from __future__ import annotations

import time

import redis
from flask import Blueprint, Flask, Response, current_app, g, jsonify
from sqlalchemy.exc import SQLAlchemyError

from relay.history import reader
from relay.history.database import reading
from relay.observability.metrics import CONTENT_TYPE, metrics_for, render
from relay.store.history import HistoryOutbox

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Ready when Redis answers (the ingress needs nothing else). The history writer's lag is
    shown, not judged: deliveries go on while the database is away, and the ingress's
    high-water mark bounds how far behind it may fall."""
    client = current_app.extensions["relay"].redis
    try:
        client.ping()
        backlog, oldest = HistoryOutbox(client).lag()
    except redis.RedisError as exc:
        return jsonify({"status": "unavailable", "redis": str(exc)}), 503
    lag = round(max(0.0, time.time() - oldest), 3) if oldest else 0.0
    return jsonify({"status": "ready", "history": {"backlog": backlog,
                                                   "lag_seconds": lag}}), 200


_REJECT_REASONS = {400: "bad_request", 401: "unauthorized", 404: "unknown_source",
                   413: "too_large", 415: "unsupported_media_type", 422: "invalid",
                   503: "unavailable"}


def init_metrics(app: Flask) -> None:
    """``GET /metrics`` and the ingress counters (before/after request hooks on /hooks/)."""

    @app.after_request
    def _count_ingress(response: Response) -> Response:
        started = g.get("relay_ingress_started")  # set by the ingress blueprint
        if started is None:
            return response
        metrics = metrics_for(current_app.extensions["relay"].redis)
        metrics.observe("ingress_latency_seconds", time.perf_counter() - started)
        if response.status_code == 202:
            metrics.inc("events_accepted")
        else:
            reason = _REJECT_REASONS.get(response.status_code, str(response.status_code))
            metrics.inc("events_rejected", {"reason": reason})
        return response

    @app.get("/metrics")
    def _metrics() -> Response:
        ctx = current_app.extensions["relay"]
        metrics_for(ctx.redis).flush()  # this process's latest counts, at least

        def destinations() -> list[str]:
            return [d.name for d in ctx.config.destinations]

        def dead_letters() -> dict[str, int]:
            try:
                with reading(ctx.database) as connection:
                    return dict(reader.dead_letter_counts(connection))
            except SQLAlchemyError:
                return {}  # the database away: relay_history_lag_seconds says so

        return Response(render(ctx.redis, destinations, dead_letters,
                               ctx.settings.metrics_subscriptions),
                        content_type=CONTENT_TYPE)
