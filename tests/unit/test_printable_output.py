"""Control characters are escaped in every log line and in every CLI output (issue 18,
point 5): a request path cannot write a log line of its own, a lead's email cannot drive the
operator's terminal."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from relay.core.printable import escaped
from relay.observability.logs import configure_logging
from relay.store.keys import stats_key
from tests.support.helpers import make_app
from tests.support.operator_world import OperatorWorld
from tests.support.samples import sample

FORGED = "1999-12-31 23:59:59,000 INFO relay.delivery: delivered event_id=evt_forged"
#: Clears the screen, sets the window title, rings the bell; then a C1 CSI and an RTL override.
TERMINAL = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202e"


def forged_lines(text: str) -> list[str]:
    """Lines that pass for a record of their own (a real one starts with today's time)."""
    return [line for line in text.splitlines() if line.startswith(FORGED[:10])]


def test_escaped_writes_controls_as_python_escapes() -> None:
    assert escaped("plain text, accents é and emoji 🎉") == "plain text, accents é and emoji 🎉"
    assert escaped("a\nb\rc\td\x00e\x1bf\x7fg\x85h\u2028i\u202ej") == (
        "a\\nb\\rc\\td\\x00e\\x1bf\\x7fg\\x85h\\u2028i\\u202ej")
    assert escaped("line\nnext\x1b", keep="\n") == "line\nnext\\x1b"
    assert escaped("no\u00a0break") == "no\u00a0break"  # not a control: left as it is


# -- log lines ---------------------------------------------------------------------------------


@pytest.fixture
def relay_log() -> Iterator[io.StringIO]:
    """What the relay's handler writes (to stderr, here a buffer)."""
    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        configure_logging("text", "INFO")
        yield sys.stderr
    finally:
        sys.stderr = stderr
        configure_logging("text", "INFO")


def test_a_request_path_cannot_forge_a_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    client = make_app().test_client()  # configures the relay's logging onto captured stderr
    capsys.readouterr()
    # Decoded, the source name carries a newline, a forged line and a NUL byte.
    response = client.post("/hooks/x%0a" + FORGED.replace(" ", "%20") + "%00", json={})
    assert response.status_code == 404
    client.post("/hooks/evil%0aforged%00line%1b[2J", json={})
    err = capsys.readouterr().err
    assert "\x00" not in err and "\x1b" not in err
    assert len(err.splitlines()) == 2, err
    assert not forged_lines(err)
    assert 'source="evil\\nforged\\u0000line\\u001b[2J"' in err  # quoted as JSON


def test_every_handler_gets_escaped_messages_gunicorns_access_log_too(
        relay_log: io.StringIO) -> None:
    # gunicorn's access log: its own handler and formatter, a dict of atoms as the argument.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("tests.gunicorn.access")
    access.propagate = False
    access.addHandler(handler)
    try:
        access.info('%(h)s "%(m)s %(U)s" %(s)s',
                    {"h": "127.0.0.1", "m": "GET", "U": f"/x\n{FORGED}\x00", "s": "404"})
    finally:
        access.removeHandler(handler)
    written = stream.getvalue()
    assert written.count("\n") == 1 and "\x00" not in written
    assert written == f'127.0.0.1 "GET /x\\n{FORGED}\\x00" 404\n'


def test_a_traceback_keeps_its_lines_but_cannot_start_one(relay_log: io.StringIO) -> None:
    try:
        raise ValueError(f"bad input\n{FORGED}\x1b[2J")
    except ValueError:
        logging.getLogger("relay.test").exception("failed for %s", "lead\x00x")
    err = relay_log.getvalue()
    lines = err.splitlines()
    assert "failed for lead\\x00x" in lines[0] and len(lines) > 3  # a traceback, on its lines
    assert all(line.startswith("  ") for line in lines[1:])  # below the record's own line
    assert not forged_lines(err) and "\x1b" not in err


def test_extras_are_escaped_in_the_text_format(relay_log: io.StringIO) -> None:
    logging.getLogger("relay.test").warning("refused", extra={
        "source": "x\nforged", "error": f"a b\n{FORGED}", "note": "\x1b]0;t\x07"})
    err = relay_log.getvalue()
    assert len(err.splitlines()) == 1, err
    assert "\x1b" not in err and "\x07" not in err


# -- CLI output --------------------------------------------------------------------------------


def test_events_show_prints_no_escape_sequence_from_lead_data(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = OperatorWorld(monkeypatch)
    event_id = world.post(sample("new_signup", email=f"{TERMINAL}ada@example.com",
                                 social_id=f"ada{TERMINAL}", campaign_id=135544))
    world.process()
    world.redis.hset(stats_key("crm"), "last_error", f"HTTP 500: {TERMINAL}\nFAKE LINE")
    with world.app.extensions["relay"].database.begin() as connection:
        from relay.history.schema import attempts, deliveries

        connection.execute(deliveries.update().values(error=f"refused {TERMINAL}\nFAKE"))
        connection.execute(attempts.update().values(error=f"refused {TERMINAL}\nFAKE"))
    outputs = {
        "events show": world.cli("events", "show", event_id).output,
        "events show --json": world.cli("events", "show", event_id, "--json").output,
        "dlq list": world.cli("dlq", "list").output,
        "status": world.cli("status").output,
        "status --json": world.cli("status", "--json").output,
    }
    for command, output in outputs.items():
        for char in ("\x1b", "\x07", "\x9b", "\u202e"):
            assert char not in output, (command, output)
        assert not any(line.startswith("FAKE") for line in output.splitlines()), command
    assert "\\x1b[2J\\x1b]0;pwnedada@example.com" not in outputs["events show"]
    assert "lead \\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202eada@example.com" in (
        outputs["events show"])
