"""The one exception tree of leadrelay.

::

    RelayError
    ├── ConfigError                  bad YAML / environment; names the destination and field
    ├── IngressError                 an HTTP request we refuse; carries status and details
    │   ├── BadRequest               400  body cannot be parsed
    │   ├── Unauthorized             401  missing / wrong token or API key
    │   ├── NotFound                 404
    │   ├── Conflict                 409  (subscription API: invalid event type)
    │   ├── PayloadTooLarge          413
    │   ├── UnsupportedMediaType     415
    │   └── ValidationFailed         422  parsed, but not a lead event / not a valid request
    ├── QueueUnavailable             Redis unreachable or refusing writes -> 503 + Retry-After
    └── DeliveryError                raised by drivers; the task decides what happens next
        ├── RetryableDeliveryError   timeouts, connection errors, 408/425/429/5xx (retry_after)
        │   └── BudgetSpentError     the vendor says the account's day is spent: wait, no attempt
        └── PermanentDeliveryError   other 3xx/4xx, bad payload for the API, refused address
            └── UnsafeURLError       an API-registered URL resolves to a non-public address

Library errors (redis, urllib3, SQLAlchemy) are translated into these at the boundary where
they happen; nothing above that boundary catches a library exception.
"""

from __future__ import annotations

import time
from typing import Any


class RelayError(Exception):
    """Base of every error leadrelay raises on purpose."""


class ConfigError(RelayError):
    """The configuration (YAML or environment) is invalid."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class IngressError(RelayError):
    status_code = 400

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(IngressError):
    status_code = 400


class Unauthorized(IngressError):
    status_code = 401


class NotFound(IngressError):
    status_code = 404


class Conflict(IngressError):
    status_code = 409


class PayloadTooLarge(IngressError):
    status_code = 413


class UnsupportedMediaType(IngressError):
    status_code = 415


class ValidationFailed(IngressError):
    status_code = 422


class QueueUnavailable(RelayError):
    """Redis could not take the event; the sender must try again later (503)."""

    retry_after = 5


class DeliveryError(RelayError):
    """A delivery attempt failed. ``status_code`` is the destination's answer, if any."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class RetryableDeliveryError(DeliveryError):
    """Try again later; ``retry_after`` (seconds) is a floor when the destination said so."""

    def __init__(
        self, message: str, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status_code)
        self.retry_after = retry_after


class BudgetSpentError(RetryableDeliveryError):
    """The vendor refused the request because the account's budget is spent until ``until``
    (an epoch time: HubSpot's ``DAILY`` 429, until its day's reset). Nothing is worth sending
    to the account before then: the budget is held for every destination that shares it, and
    the deliveries of the request wait for ``until`` without an attempt counted."""

    def __init__(self, message: str, until: float, status_code: int | None = 429,
                 now: float | None = None) -> None:
        wait = max(0.0, until - (time.time() if now is None else now))
        super().__init__(message, status_code, wait)
        self.until = until


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help; the delivery becomes a dead letter with this reason."""

    def __init__(
        self, message: str, status_code: int | None = None, gone: bool = False
    ) -> None:
        super().__init__(message, status_code)
        # True for a 410 Gone: an API subscription answering it is removed.
        self.gone = gone


class UnsafeURLError(PermanentDeliveryError):
    """The URL (or the address it connected to) is not allowed for API-registered hooks."""
