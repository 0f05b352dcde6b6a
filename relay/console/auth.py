"""Who may use the console: sign-in with one of ``RELAY_API_KEYS``, sessions, CSRF.

- The key is checked by :func:`relay.core.api_keys.key_matches` (constant time, against every
  key), the check the admin API makes.
- A session lives in Redis (:class:`Sessions`), the cookie carries only its random id: signing
  out deletes it, so a copy of the cookie taken before is worth nothing. The record keeps no key,
  only an HMAC of it under ``RELAY_SECRET_KEY``, checked on every request: removing a key from
  ``RELAY_API_KEYS`` ends every session signed in with it (and a new ``RELAY_SECRET_KEY`` ends
  them all, as no cookie signature holds).
- A session ends after ``RELAY_CONSOLE_IDLE_TIMEOUT`` (1 hour) without a request from the
  operator, and ``RELAY_CONSOLE_SESSION_LIFETIME`` (12 hours) after sign-in in any case. The
  pages' own refreshes (they send :data:`REFRESH_HEADER`) are not activity: a tab left open
  does not keep its session alive.
- The cookie (``relay_console``, path ``/console``) is Flask's signed session: ``HttpOnly``,
  ``SameSite=Lax``, ``Secure`` when the request came over https.
- Every state-changing form carries Flask-WTF's CSRF token (:func:`check_csrf`).
- Wrong keys are counted per client address (:class:`SignInThrottle`): past
  :data:`SignInThrottle.limit` within the window, a wrong key is answered 429. A right key
  always signs in, so someone else's wrong keys from the same address (everyone behind one
  proxy, unless ``RELAY_TRUSTED_PROXIES`` says how to find the client's own) never lock its
  holder out. The counter is in Redis, so every web process sees the same count.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Sequence

import redis
from flask import Flask, Request, current_app, g, request, session
from flask.sessions import SecureCookieSessionInterface, SessionMixin
from flask_wtf.csrf import generate_csrf, validate_csrf
from wtforms import ValidationError

from relay.console import PREFIX
from relay.core.api_keys import key_matches
from relay.store.keys import console_session_key, signin_failures_key, signin_turn_key

log = logging.getLogger("relay.console")

SESSION_ID = "sid"
#: The header the pages' automatic refreshes send (``hx-headers``): not operator activity.
REFRESH_HEADER = "X-Console-Refresh"


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


class Sessions:
    """Signed-in sessions in Redis: one hash per session, ``key`` (the HMAC of the key it was
    signed in with) and ``created``, whose TTL is the idle timeout. Its name is the SHA-256 of
    the session id, so what Redis holds cannot be replayed as a cookie."""

    def __init__(self, client: redis.Redis, idle: float, lifetime: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.idle = idle
        self.lifetime = lifetime
        self.clock = clock

    @staticmethod
    def _key(session_id: str) -> str:
        return console_session_key(hashlib.sha256(session_id.encode()).hexdigest())

    def _ttl_ms(self, created: float) -> int:
        """The record lives the idle timeout, never past the session's absolute end."""
        left = min(self.idle, created + self.lifetime - self.clock())
        return max(int(left * 1000), 1)

    def start(self, fingerprint: str) -> str:
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._key(session_id), mapping={"key": fingerprint, "created": repr(now)})
        pipe.pexpire(self._key(session_id), self._ttl_ms(now))
        pipe.execute()
        return session_id

    def check(self, session_id: str, fingerprints: Sequence[str], active: bool) -> bool:
        """Whether the session is on and was signed in with one of the keys (given as their
        HMACs); ``active`` (a request the operator made) restarts its idle timeout."""
        key = self._key(session_id)
        held, created = self.redis.hmget(key, "key", "created")
        if held is None or created is None:
            return False
        try:
            began = float(created)
        except ValueError:
            began = float("-inf")
        matched = False
        for fingerprint in fingerprints:  # no early exit, as in relay.core.api_keys
            matched |= hmac.compare_digest(held, fingerprint.encode())
        if not matched or self.clock() >= began + self.lifetime:
            self.redis.delete(key)  # its key was removed, or its time is up
            return False
        if active:
            self.redis.pexpire(key, self._ttl_ms(began))
        return True

    def end(self, session_id: str) -> None:
        self.redis.delete(self._key(session_id))


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


def _sessions() -> Sessions:
    ctx = current_app.extensions["relay"]
    return Sessions(ctx.redis, ctx.settings.console_idle_timeout,
                    ctx.settings.console_session_lifetime)


def _keys() -> Sequence[str]:
    keys: Sequence[str] = current_app.extensions["relay"].settings.api_keys
    return keys


def automatic_refresh() -> bool:
    """Whether this request is a page refreshing itself rather than the operator's."""
    return request.headers.get(REFRESH_HEADER) == "auto"


def signed_in() -> bool:
    """Whether this request belongs to a session that is on, signed in with a key that is still
    configured. Asked once per request (the pages ask again as they render)."""
    if "console_signed_in" not in g:
        g.console_signed_in = _check_session()
    answer: bool = g.console_signed_in
    return answer


def _check_session() -> bool:
    if enabled() is not None:
        return False
    session_id = session.get(SESSION_ID)
    if not isinstance(session_id, str) or not 0 < len(session_id) <= 100:
        return False
    fingerprints = [_fingerprint(key) for key in _keys()]
    return _sessions().check(session_id, fingerprints, active=not automatic_refresh())


def signed_in_for_page() -> bool:
    """:func:`signed_in` for a template: False when Redis cannot say (the page that tells so
    must still render)."""
    try:
        return signed_in()
    except redis.RedisError:
        return False


def sign_in(given: str) -> bool:
    """Start a session if ``given`` is one of the keys."""
    if not key_matches(given, _keys()):
        return False
    sign_out()  # a fresh session (and CSRF token): none that was there before carries on
    session[SESSION_ID] = _sessions().start(_fingerprint(given))  # given is one of the keys
    session.permanent = True
    g.console_signed_in = True
    return True


def sign_out() -> None:
    session_id = session.get(SESSION_ID)
    if isinstance(session_id, str) and session_id:
        _sessions().end(session_id)
    session.clear()
    g.console_signed_in = False


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
    """Counts wrong keys per client address in a fixed window. Past :attr:`limit`, the address
    gets one key checked per :attr:`turn` seconds (:meth:`wait`), the other tries a 429
    without a look at the key: guessing from it slows to a try every few seconds, and the
    person with the right key behind the same address (everyone's, behind a proxy, unless
    ``RELAY_TRUSTED_PROXIES`` says where the client is) waits seconds, never the window."""

    limit = 5
    window = 900  # seconds
    turn = 3.0  # seconds between key checks of an address past the limit

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @staticmethod
    def _digest(client_id: str) -> str:
        return hashlib.sha256(client_id.encode()).hexdigest()[:32]  # no address in Redis

    @classmethod
    def _key(cls, client_id: str) -> str:
        return signin_failures_key(cls._digest(client_id))

    def wait(self, client_id: str) -> float:
        """0 when this client's key may be checked now (under the limit, or its turn);
        else the seconds until its next turn."""
        digest = self._digest(client_id)
        count = self.redis.get(signin_failures_key(digest))
        if count is None or int(count) < self.limit:
            return 0.0
        turn = signin_turn_key(digest)
        if self.redis.set(turn, 1, px=int(self.turn * 1000), nx=True):
            return 0.0
        return max(int(self.redis.pttl(turn)), 1) / 1000

    def failed(self, client_id: str) -> int:
        """Count a wrong key; the seconds this client should wait before the next one (0: it
        is under the limit)."""
        key = self._key(client_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(key, 0, ex=self.window, nx=True)  # the first failure starts the window
        pipe.incr(key)
        pipe.ttl(key)
        _, count, ttl = pipe.execute()
        if int(count) == self.limit:
            log.warning("console sign-in: %d wrong keys from one client within %d s",
                        self.limit, self.window, extra={"client": client_id})
        if int(count) <= self.limit:
            return 0
        return max(int(ttl), 1)

    def succeeded(self, client_id: str) -> None:
        self.redis.delete(self._key(client_id))
