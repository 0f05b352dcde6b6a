"""Process settings from the environment (SPEC §3). Everything but Redis has a default.

This is the one reader of ``RELAY_*`` variables: the modules below take their values as
arguments (a process applies the process-wide ones with :func:`apply_process_settings`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from relay.core.durations import parse_duration
from relay.core.errors import ConfigError
from relay.core.models import LEASE_MARGIN

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
#: The history's default: an SQLite file under the working directory, fit for one machine.
DEFAULT_DATABASE_URL = "sqlite:///.relay/history.sqlite3"


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    database_url: str = DEFAULT_DATABASE_URL
    config_path: str = "config/relay.yaml"
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1024 * 1024
    allowed_networks: tuple[str, ...] = ()
    # Celery: the broker's visibility timeout must exceed the task time limit, or a slow
    # task's message is handed to a second worker while the first still runs it.
    visibility_timeout: float = 300.0
    task_time_limit: float = 120.0
    max_in_flight: int = 100  # deliveries in flight at once per worker process
    max_task_runs: int = 3  # a task that kills its worker this often becomes a dead letter
    # A claimed delivery's lease is its destination's timeout plus this: how soon a dead
    # worker's deliveries are taken over, and how long a live one may take to record them.
    lease_margin: float = LEASE_MARGIN
    retention: float = 7 * 86400.0  # event payloads, delivery log
    scheduler_interval: float = 1.0
    log_format: str = "text"
    log_level: str = "INFO"
    redis_pool: int = 50  # connections per process (the web app's pool)
    metrics_flush_interval: float = 1.0  # seconds between a process's metrics flushes
    # /metrics lists at most this many API subscriptions one by one; more are summed by
    # campaign (relay.observability.metrics.Grouping).
    metrics_subscriptions: int = 50
    # The ingress answers 503 once Redis uses this much memory: a fraction of its maxmemory
    # (read from INFO), or bytes (a Redis without maxmemory needs bytes, else no limit).
    redis_high_water: float = 0.8
    dev_inbox: bool = False
    # Signs the console's session cookie; the console is off without it. Never in a repr.
    secret_key: str = field(default="", repr=False)
    # A console session ends on sign-out, after this long without a request from the operator
    # (the pages' own refreshes do not count), and this long after sign-in in any case.
    console_idle_timeout: float = 3600.0
    console_session_lifetime: float = 12 * 3600.0
    # How many proxies in front of ``relay web`` set X-Forwarded-For / X-Forwarded-Proto: the
    # client's address and scheme are taken from that many hops back; 0 trusts no header.
    trusted_proxies: int = 0
    # Field names redacted besides those named like secrets (relay.core.redaction).
    redact_fields: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        try:
            settings = cls(
                redis_url=env.get("RELAY_REDIS_URL") or DEFAULT_REDIS_URL,
                database_url=env.get("RELAY_DATABASE_URL") or DEFAULT_DATABASE_URL,
                config_path=env.get("RELAY_CONFIG") or "config/relay.yaml",
                api_keys=_split(env.get("RELAY_API_KEYS")),
                max_body_bytes=int(env.get("RELAY_MAX_BODY_BYTES") or 1024 * 1024),
                allowed_networks=_split(env.get("RELAY_ALLOWED_NETWORKS")),
                visibility_timeout=parse_duration(env.get("RELAY_VISIBILITY_TIMEOUT") or 300),
                task_time_limit=parse_duration(env.get("RELAY_TASK_TIME_LIMIT") or 120),
                max_task_runs=int(env.get("RELAY_MAX_TASK_RUNS") or 3),
                lease_margin=parse_duration(env.get("RELAY_LEASE_MARGIN") or LEASE_MARGIN),
                max_in_flight=int(env.get("RELAY_MAX_IN_FLIGHT") or 100),
                retention=parse_duration(env.get("RELAY_RETENTION") or "7d"),
                scheduler_interval=parse_duration(env.get("RELAY_SCHEDULER_INTERVAL") or 1),
                log_format=(env.get("RELAY_LOG_FORMAT") or "text").lower(),
                log_level=(env.get("RELAY_LOG_LEVEL") or "INFO").upper(),
                redis_pool=int(env.get("RELAY_REDIS_POOL") or 50),
                metrics_flush_interval=float(env.get("RELAY_METRICS_FLUSH_INTERVAL") or 1),
                metrics_subscriptions=_count(env.get("RELAY_METRICS_SUBSCRIPTIONS") or "50",
                                             "RELAY_METRICS_SUBSCRIPTIONS"),
                redis_high_water=_high_water(env.get("RELAY_REDIS_HIGH_WATER") or "0.8"),
                dev_inbox=(env.get("RELAY_DEV_INBOX") or "").lower() in {"1", "true", "yes"},
                secret_key=env.get("RELAY_SECRET_KEY") or "",
                console_idle_timeout=_positive(
                    "RELAY_CONSOLE_IDLE_TIMEOUT", env.get("RELAY_CONSOLE_IDLE_TIMEOUT") or "1h"),
                console_session_lifetime=_positive(
                    "RELAY_CONSOLE_SESSION_LIFETIME",
                    env.get("RELAY_CONSOLE_SESSION_LIFETIME") or "12h"),
                trusted_proxies=_hops(env.get("RELAY_TRUSTED_PROXIES") or "0"),
                redact_fields=_split(env.get("RELAY_REDACT_FIELDS")),
            )
        except ValueError as exc:
            raise ConfigError(f"invalid environment setting: {exc}") from None
        if settings.visibility_timeout <= settings.task_time_limit:
            raise ConfigError(
                "RELAY_VISIBILITY_TIMEOUT must be larger than RELAY_TASK_TIME_LIMIT "
                f"({settings.visibility_timeout:g}s <= {settings.task_time_limit:g}s)"
            )
        return settings


def _count(value: str, name: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{name} must be 0 or more, not {value!r}")
    return number


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _positive(name: str, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ValueError(f"{name} must be a duration longer than 0 (e.g. 30m), not {value!r}")
    return seconds


def _hops(value: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 10:
        raise ValueError(f"RELAY_TRUSTED_PROXIES is a number of proxies (0-10), not {value!r}")
    return int(text)


def apply_process_settings(settings: Settings) -> None:
    """The knobs that are process-wide rather than per object: the metrics' flush interval,
    the size of the HTTP client's pool (one connection per delivery in flight) and the field
    names redacted (``RELAY_REDACT_FIELDS``)."""
    from relay.core import redaction
    from relay.drivers import http
    from relay.observability import metrics

    metrics.configure(flush_interval=settings.metrics_flush_interval)
    http.configure(pool_size=settings.max_in_flight)
    redaction.configure(settings.redact_fields)


def _high_water(value: str) -> float:
    """``0.8`` (a fraction of maxmemory), ``800mb``, ``2gb`` or bytes."""
    text = value.strip().lower()
    for suffix, factor in (("gb", 1 << 30), ("mb", 1 << 20), ("kb", 1 << 10)):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * factor
    number = float(text)
    if number <= 0:
        raise ValueError(f"RELAY_REDIS_HIGH_WATER must be positive, not {value!r}")
    return number
