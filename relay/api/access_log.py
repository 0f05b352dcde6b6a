"""One log line per ingress request (``POST /hooks/…``): accepted or refused, with the event id,
the status and the latency. The line's format is :mod:`relay.observability.logs`'s."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, g, request

from relay.observability.logs import configure_logging

ingress_log = logging.getLogger("relay.ingress")


def init_app(app: Flask, log_format: str = "text", log_level: str = "INFO") -> None:
    """Configure logging and write one line per ingress request (``POST /hooks/…``)."""
    configure_logging(log_format, log_level)

    @app.after_request
    def _log_ingress(response: Response) -> Response:
        started = g.get("relay_ingress_started")  # set by the ingress blueprint
        if started is None:
            return response
        # The accepted path (the hot one) hands its event id over in ``g``; only refusals,
        # which are rare, have their JSON answer parsed again for the error text.
        body: dict[str, Any] = {"event_id": g.get("relay_event_id")}
        if response.status_code != 202 and response.is_json:
            parsed = response.get_json(silent=True)
            body = parsed if isinstance(parsed, dict) else body
        ingress_log.info(
            "accepted" if response.status_code == 202 else "refused",
            extra={
                "event_id": body.get("event_id"),
                "destination": None,
                "source": request.view_args.get("source") if request.view_args else None,
                "status": response.status_code,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                "error": body.get("error"),
            },
        )
        return response
