"""Who may use the console: sign-in with one of ``RELAY_API_KEYS``, the session cookie, CSRF.

- The key is checked by :func:`relay.api.auth.key_matches` (constant time, against every key), the
  check the admin API makes. The session keeps no key, only an HMAC of it under
  ``RELAY_SECRET_KEY``, checked on every request: removing a key from ``RELAY_API_KEYS`` signs
  out everyone who signed in with it.
- The cookie (``relay_console``, path ``/console``) is Flask's signed session: ``HttpOnly``,
  ``SameSite=Lax``, ``Secure`` when the request came over https (gunicorn takes that from
  ``X-Forwarded-Proto`` of a trusted proxy), 12 hours.
- Every state-changing form carries Flask-WTF's CSRF token (:func:`check_csrf`).
- A client that sends :data:`SignInThrottle.limit` wrong keys within the window is answered 429
  until the window ends, whatever it sends (so a right key guessed during the lock-out does not
  tell). The counter is in Redis, so every web process sees the same count.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import redis
from flask import Flask, Request, current_app, request, session
from flask.sessions import SecureCookieSessionInterface, SessionMixin
from flask_wtf.csrf import generate_csrf, validate_csrf
from wtforms import ValidationError

from relay.console import PREFIX
from relay.core.api_keys import key_matches
from relay.store.keys import PREFIX as REDIS_PREFIX

SESSION_KEY = "signed_in_with"


class ConsoleSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, opened for console requests only.

    Flask opens a session for every request; outside ``/console`` (the ingress, the APIs) there
    is none to open, and skipping it keeps the ingress's per-request cost where it was."""

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        path: str = request.environ.get("PATH_INFO", "")  # cheaper than request.path
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            return None
        return super().open_session(app, request)

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or request.is_secure


def enabled() -> str | None:
    """None when the console can be used; else what is missing, for the sign-in page."""
    settings = current_app.extensions["relay"].settings
    if not settings.api_keys:
        return "The console is off: this relay has no API keys (set RELAY_API_KEYS)."
    if not current_app.secret_key:
        return "The console is off: set RELAY_SECRET_KEY to sign its session cookies."
    return None


def _fingerprint(key: str) -> str:
    secret = current_app.secret_key
    assert isinstance(secret, str | bytes)
    secret_bytes = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(secret_bytes, key.encode(), hashlib.sha256).hexdigest()


def _keys() -> Sequence[str]:
    keys: Sequence[str] = current_app.extensions["relay"].settings.api_keys
    return keys


def signed_in() -> bool:
    """Whether this request's session was signed in with a key that is still configured."""
    if enabled() is not None:
        return False
    held = session.get(SESSION_KEY)
    if not isinstance(held, str):
        return False
    matched = False
    for key in _keys():  # no early exit, as in relay.api.auth
        matched |= hmac.compare_digest(held, _fingerprint(key))
    return matched


def sign_in(given: str) -> bool:
    """Start a session if ``given`` is one of the keys."""
    if not key_matches(given, _keys()):
        return False
    session.clear()  # a fresh session (and CSRF token) for the signed-in user
    session[SESSION_KEY] = _fingerprint(given)  # given is one of the keys: the same HMAC
    session.permanent = True
    return True


def sign_out() -> None:
    session.clear()


def csrf_token() -> str:
    token: str = generate_csrf()
    return token


def check_csrf() -> str | None:
    """None when the form carries this session's CSRF token; else why not."""
    try:
        validate_csrf(request.form.get("csrf_token"))
    except ValidationError as exc:
        return str(exc)
    return None


class SignInThrottle:
    """Counts wrong keys per client address in a fixed window."""

    limit = 5
    window = 900  # seconds

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @staticmethod
    def _key(client_id: str) -> str:
        digest = hashlib.sha256(client_id.encode()).hexdigest()[:32]  # no address in Redis
        return f"{REDIS_PREFIX}console:signin-failures:{digest}"

    def retry_after(self, client_id: str) -> int:
        """Seconds this client must wait before trying again (0: it may try now)."""
        key = self._key(client_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.ttl(key)
        count, ttl = pipe.execute()
        if count is None or int(count) < self.limit:
            return 0
        return max(int(ttl), 1)

    def failed(self, client_id: str) -> None:
        key = self._key(client_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.ttl(key)
        _, ttl = pipe.execute()
        if int(ttl) < 0:  # the first failure starts the window
            self.redis.expire(key, self.window)

    def succeeded(self, client_id: str) -> None:
        self.redis.delete(self._key(client_id))
