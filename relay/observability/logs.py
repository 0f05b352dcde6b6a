"""Logging for every relay process: one line per ingress request and per delivery attempt.

``RELAY_LOG_FORMAT=json`` writes one JSON object per line (for log shippers); the default
``text`` writes ``time level logger: message key=value …``. Either way the ``extra=`` fields of a
record are shown, and ``event_id`` and ``destination`` are always there (``null`` / ``-`` when a
line has none), so ``grep <event id>`` finds the whole story of one lead event.

Secrets stay out: extras whose name says secret (``token``, ``api_key``, ``authorization``,
``password``, ``secret``…, and the names of ``RELAY_REDACT_FIELDS``) are replaced by
``[redacted]``, and the text of every line goes through :func:`relay.core.redaction.redact`
(``?api_key=…`` and ``Authorization:`` values in access logs).

A line is one line, and printable: :func:`configure_logging` makes every record of the process
a :class:`PrintableRecord`, whose message has its control characters escaped
(:func:`relay.core.printable.escaped`) whichever handler writes it (the relay's, gunicorn's
access log, a library's), and whose traceback keeps its own line breaks but indents every line,
so a line that starts at the left margin always starts a record. The text format escapes the
extras too (the JSON format's encoder escapes every control character).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any

from relay.core.printable import escaped
from relay.core.redaction import Policy, is_secret_name, policy, redact

ALWAYS = ("event_id", "destination")
# Attributes every LogRecord has: anything else came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}
_HANDLER_MARK = "_relay_handler"


def extras(record: logging.LogRecord) -> dict[str, Any]:
    found = {key: value for key, value in vars(record).items()
             if key not in _STANDARD and not key.startswith("_")}
    for key in ALWAYS:
        found.setdefault(key, None)
    # Named like a secret: hidden whole; a text (an error, a destination's answer): its
    # secrets hidden (``?api_key=…``), whichever formatter writes the line.
    return {key: "[redacted]" if is_secret_name(key)
            else redact(value) if isinstance(value, str) else value
            for key, value in found.items()}


class PrintableRecord(logging.LogRecord):
    """A log record that prints as one line of text whatever it carries: a request path with
    ``%0a`` in it, a lead's field with an escape sequence, a NUL byte. Formatters (any of
    them: they all call :meth:`getMessage` and read ``exc_text``) get the message with its
    control characters escaped, and a traceback indented under it."""

    def getMessage(self) -> str:  # noqa: N802 (logging's name)
        return escaped(super().getMessage())

    @property  # type: ignore[override]
    def exc_text(self) -> str | None:  # a formatter caches the formatted traceback here
        return self._exc_text

    @exc_text.setter
    def exc_text(self, text: str | None) -> None:
        self._exc_text = text if not text else _indented(escaped(text, keep="\n"))


def _indented(text: str) -> str:
    return "\n".join("  " + line for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        line.update(extras(record))
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str, separators=(",", ":"))  # escapes every control


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # One line per request: format the date once a second, not once a line.
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, super().formatTime(record, datefmt)[:-4]
        return f"{self._stamp},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        base = redact(super().format(record))
        fields = " ".join(f"{key}={_text(value)}" for key, value in extras(record).items())
        head, sep, rest = base.partition("\n")  # keep tracebacks below the fields
        return f"{head} {fields}{sep}{rest}"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)  # nothing to redact or quote: the common case stays cheap
    return _quoted(value if isinstance(value, str) else json.dumps(value, default=str),
                   policy())


@functools.lru_cache(maxsize=256)  # source names and refusal reasons recur line after line
def _quoted(text: str, redaction: Policy) -> str:
    # Quoted (JSON's string escapes) when it has a space or a control character; the policy
    # is part of the cache's key, so a policy configured later is the one applied.
    plain = text and " " not in text and text.isprintable()
    return redaction.text(text if plain else json.dumps(text))


def configure_logging(log_format: str = "text", level: str = "INFO") -> None:
    """Install the relay's handler on the root logger (idempotent: replaces its own handler,
    leaves others, such as pytest's, alone)."""
    log_format = log_format.lower()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.setLogRecordFactory(PrintableRecord)  # every record, whoever writes it


def lean_records() -> None:
    """Skip the parts of a log record no relay line shows: the caller's file and line (a walk
    up the stack for every record), the thread's and the process's names. These are the
    switches of the logging HOWTO's "Optimization" section; a server process (gunicorn's app,
    a Celery worker) sets them once, where a line per request and per attempt adds up."""
    logging._srcfile = None  # type: ignore[attr-defined]  # documented in the HOWTO
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
