"""The Flask app factory: ``create_app()`` builds the ingress (and, later, the APIs).

The web side never imports Celery: it publishes tasks by name (:mod:`relay.delivery.kicks`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, Response, jsonify, request
from sqlalchemy import Engine as Database
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from relay.config.relay_yaml import RelayConfig, load_config
from relay.config.settings import Settings, apply_process_settings
from relay.core.errors import IngressError, QueueUnavailable
from relay.history.database import shared_database
from relay.ingress.intake import Intake
from relay.store.connection import connect

log = logging.getLogger("relay.web")
KICKOFFLABS_PREFIX = "/v2/"  # the subscription API's family of error bodies


@dataclass
class WebContext:
    """What the request handlers share, kept in ``app.extensions["relay"]``."""

    settings: Settings
    config: RelayConfig
    redis: redis.Redis
    intake: Intake
    database: Database


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the web app. ``test_config`` may carry ``RELAY_SETTINGS`` (a Settings),
    ``RELAY_CONFIG_OBJECT`` (a RelayConfig), ``RELAY_REDIS`` (a client, e.g. fakeredis) and
    ``RELAY_DATABASE`` (an SQLAlchemy engine of the history database)."""
    app = Flask(__name__)
    test_config = test_config or {}
    settings: Settings = test_config.get("RELAY_SETTINGS") or Settings.from_env()
    config: RelayConfig = test_config.get("RELAY_CONFIG_OBJECT") or load_config(
        settings.config_path
    )
    apply_process_settings(settings)
    if settings.trusted_proxies:  # the client's address and scheme as the proxies saw them
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
    client = test_config.get("RELAY_REDIS") or connect(settings.redis_url,
                                                           max_connections=settings.redis_pool)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        MAX_FORM_PARTS=1000,
        JSON_SORT_KEYS=False,
    )
    app.config.update({k: v for k, v in test_config.items() if not k.startswith("RELAY_")})
    database = test_config.get("RELAY_DATABASE") or shared_database(settings.database_url)
    app.extensions["relay"] = WebContext(
        settings, config, client, Intake(client, high_water=settings.redis_high_water), database
    )

    from relay.api import health as ops
    from relay.api import openapi
    from relay.api import subscriptions as subscriptions_api
    from relay.ingress import view as ingress

    app.register_blueprint(ingress.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(subscriptions_api.bp)
    app.register_blueprint(openapi.bp)
    if settings.dev_inbox:
        from relay.api import dev_inbox as devinbox

        app.register_blueprint(devinbox.bp)
    from relay.api import access_log
    from relay.api import admin as admin_api

    access_log.init_app(app, settings.log_format, settings.log_level)  # a line per request
    ops.init_metrics(app)  # /metrics and the ingress counters
    app.register_blueprint(admin_api.bp)
    from relay import console

    console.init_app(app, settings)  # /console: the operator's pages
    _register_error_handlers(app)
    return app


def error_response(status: int, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> Response:
    """The relay's error body, ``{"error": …, "details": …}``: the ingress, the admin API and
    the operational endpoints. The subscription API (``/v2/…``) answers in KickoffLabs' shape,
    ``{"message": …, "errors"?: …}``, whoever raised the error (a view, or Flask's routing
    for an unknown path or method)."""
    if request.path.startswith(KICKOFFLABS_PREFIX):
        from relay.api.subscriptions import message_response

        response = message_response(status, message, details)
    else:
        response = jsonify({"error": message, "details": details})
        response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(IngressError)
    def _ingress_error(exc: IngressError) -> Response:
        return error_response(exc.status_code, exc.message, exc.details)

    @app.errorhandler(QueueUnavailable)
    def _queue_down(exc: QueueUnavailable) -> Response:
        log.error("queue unavailable: %s", exc)
        return error_response(503, "the relay cannot store events right now; retry later",
                              None, {"Retry-After": str(exc.retry_after)})

    @app.errorhandler(SQLAlchemyError)
    def _database_down(exc: SQLAlchemyError) -> Response:
        # Only what reads the history needs the database: the ingress never does.
        log.error("history database unavailable: %s", exc)
        return error_response(503, "the history database is unavailable; retry later", None,
                              {"Retry-After": "5"})

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        # Keep the headers werkzeug puts on its own answer: Allow on a 405 above all.
        headers = {name: value for name, value in exc.get_headers()
                   if name.lower() != "content-type"}
        return error_response(exc.code or 500, exc.description or exc.name, None, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if isinstance(exc, redis.RedisError):
            return _queue_down(QueueUnavailable(str(exc)))
        if type(exc).__module__ == "gunicorn.http.errors":
            # Bad chunked framing (InvalidChunkSize, NoMoreData, ...) surfaces only when the
            # app reads the body: the client's fault, not ours.
            return error_response(400, f"malformed request body: {type(exc).__name__}")
        log.exception("unhandled error")
        return error_response(500, "internal error")
