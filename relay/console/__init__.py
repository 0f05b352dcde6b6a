"""The operator console under ``/console``: server-rendered pages for "what happened to this
lead", dead letters and destination health.

Reads come from the code the admin API and ``relay status`` use (:mod:`relay.operations.status`,
:mod:`relay.api.admin`, :mod:`relay.store.deliveries`, :mod:`relay.store.lead_index`,
:mod:`relay.observability.timeseries`);
actions (replay, pause, resume) call the same functions. Jinja templates, plain CSS and htmx
(vendored in ``static/``) for the pages that refresh themselves; no JavaScript build step.

- :mod:`relay.console.auth`: sign-in with one of ``RELAY_API_KEYS``, sessions (kept in Redis,
  their id in a cookie signed with ``RELAY_SECRET_KEY``), CSRF tokens, and the count of wrong
  keys.
- :mod:`relay.console.forms`: the marshmallow schemas of the pages' queries and forms.
- :mod:`relay.console.present`: what the templates show: redacted payloads, times in UTC, the
  chart.
- :mod:`relay.console.views`: the pages.
"""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, Flask

from relay.config.settings import Settings

PREFIX = "/console"

bp = Blueprint("console", __name__, url_prefix=PREFIX, template_folder="templates",
               static_folder="static", static_url_path="/static")


def init_app(app: Flask, settings: Settings) -> None:
    """Register the console: its blueprint, and the session it alone uses."""
    from relay.console import auth, views  # noqa: F401  (views registers the pages on bp)

    if settings.secret_key:
        app.secret_key = settings.secret_key
    app.session_interface = auth.ConsoleSessionInterface()
    app.config.update(
        SESSION_COOKIE_NAME="relay_console",
        SESSION_COOKIE_PATH=PREFIX,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        # The cookie lasts as long as a session may; the session itself ends earlier on the
        # server (sign-out, idle timeout), and the cookie is not rewritten by every request.
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=settings.console_session_lifetime),
        SESSION_REFRESH_EACH_REQUEST=False,
        # A form stays valid for the session (a dead-letter page may be left open for a while);
        # the token is bound to the session, which ends on the server (relay.console.auth).
        WTF_CSRF_TIME_LIMIT=None,
    )
    app.register_blueprint(bp)
