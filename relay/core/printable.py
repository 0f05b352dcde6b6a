"""Text from outside, made safe to print: on a log line, on an operator's terminal.

A lead's fields, a request's path, a destination's error text are data; printed raw, a newline
in them starts a log line of their own making (``GET /x%0a… INFO relay.delivery: delivered …``)
and an escape sequence drives the operator's terminal (clears it, sets its title). So every
log line (:mod:`relay.observability.logs`) and every value the CLI prints from stored data
(:mod:`relay.cli.operator`) goes through :func:`escaped`: C0 and C1 control characters (ESC,
NUL, CR, LF, TAB, DEL …), the Unicode line and paragraph separators and the bidirectional
overrides that reorder what a terminal shows are written as Python escapes (``\\x1b``,
``\\n``, ``\\u202e``). Everything else, accented letters and emoji included, is left as it is.
"""

from __future__ import annotations

import re

_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escaped(text: str, keep: str = "") -> str:
    """``text`` with its control characters escaped, but those in ``keep`` (a traceback
    keeps its line breaks: ``keep="\\n"``)."""
    if text.isprintable():  # the common case: no control character can be in it
        return text
    return _CONTROLS.sub(
        lambda match: match.group() if match.group() in keep else _escape(match.group()), text)
