"""What never leaves the relay in clear: API keys in request lines and headers, and fields whose
name says secret. One policy for the logs, the console and the CLI."""

from __future__ import annotations

import functools
import logging
import re

_SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey", "authorization",
                 "authentication", "signature")


@functools.lru_cache(maxsize=1024)  # the same few extra names, on every log line
def is_secret_name(name: str) -> bool:
    """Whether a field called ``name`` holds a secret (``token``, ``api_key``, ``password`` …):
    what the log lines redact, and the console too."""
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


_KEY_IN_TEXT = re.compile(r"(?i)(api_key=)[^&\s\"']*")
_KEY_IN_HEADER = re.compile(r"(?i)((?:authorization|authentication):\s*(?:\S+\s+)?)\S+")


def redact(text: str) -> str:
    """``…?api_key=SECRET&…`` → ``…?api_key=[redacted]&…`` (and header values likewise)."""
    if "=" in text:
        text = _KEY_IN_TEXT.sub(r"\1[redacted]", text)
    if ":" in text:  # every line passes through here: most have neither
        text = _KEY_IN_HEADER.sub(r"\1[redacted]", text)
    return text


class RedactApiKeys(logging.Filter):
    """Rewrites log records that would print an API key (access logs print query strings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
