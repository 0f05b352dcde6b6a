"""One redaction policy for the admin API, the console, the CLI and the logs (issue 18, point 6),
and every renderer safe for a deeply nested payload in the history (point 2)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from relay.cli import main
from relay.config.relay_yaml import load_config, masked
from relay.core import redaction
from relay.core.nesting import MAX_DEPTH
from relay.core.redaction import redact
from relay.history.schema import attempts, deliveries
from relay.observability.logs import JsonFormatter, TextFormatter
from relay.store.keys import stats_key
from tests.support.operator_world import OperatorWorld
from tests.support.samples import sample

REDACTED = "[redacted]"
TOO_DEEP = "[nested too deeply]"
SECRET = "s3cr3t-value-8d41"
URL_KEY = "url-key-77aa19"


@pytest.fixture(autouse=True)
def _default_policy() -> Any:
    yield
    redaction.configure()  # a test's RELAY_REDACT_FIELDS does not outlive it


def secret_lead(**extra: Any) -> dict[str, Any]:
    return sample("new_signup", email="ada@example.com", social_id="ada1", api_key=SECRET,
                  password=SECRET, token=SECRET,
                  custom_fields={"link": f"https://crm.example/x?a=1&api_key={URL_KEY}&b=2",
                                 "access_token": SECRET, "ssn": "078-05-1120"},
                  **extra)


# -- the policy ------------------------------------------------------------------------------


def test_texts_lose_every_secret_query_parameter_and_header_credential() -> None:
    text = (f"GET /v2/1/outbound-webhook?url=x&api_key={SECRET}&access_token={SECRET}"
            f"&custom_fields[password]={SECRET}&page=2 Authorization: Bearer {SECRET}")
    cleaned = redact(text)
    assert SECRET not in cleaned
    assert "url=x&api_key=[redacted]&access_token=[redacted]" in cleaned
    assert "custom_fields[password]=[redacted]&page=2" in cleaned
    assert redact("retry in 5s, status=503 from crm") == "retry in 5s, status=503 from crm"
    assert redact("?api_key=&a=1") == "?api_key=&a=1"  # nothing to hide


def test_a_long_text_is_redacted_in_linear_time() -> None:
    # The name pattern starts only where a name can start: no quadratic backtracking.
    assert redact("a" * 200_000 + "=1") == "a" * 200_000 + "=1"
    assert redact("x" * 200_000) == "x" * 200_000


def test_configured_names_are_secret_whole_besides_the_words() -> None:
    redaction.configure(["SSN", " date_of_birth "])
    value = {"ssn": "078-05-1120", "lessons": 3, "Date_Of_Birth": "1815-12-10",
             "note": "see https://x.example/?ssn=078-05-1120"}
    assert redaction.redacted(value) == {
        "ssn": REDACTED, "lessons": 3, "Date_Of_Birth": REDACTED,
        "note": f"see https://x.example/?ssn={REDACTED}"}
    redaction.configure()
    assert redaction.redacted(value)["ssn"] == "078-05-1120"


def test_the_setting_reaches_every_process_through_settings() -> None:
    from relay.config.settings import Settings, apply_process_settings

    settings = Settings.from_env({"RELAY_REDACT_FIELDS": "ssn, phone_number"})
    assert settings.redact_fields == ("ssn", "phone_number")
    apply_process_settings(settings)
    assert redaction.is_secret_name("phone_number") and not redaction.is_secret_name("phone")


def test_redaction_walks_without_recursion_and_shows_a_bounded_depth() -> None:
    deep: Any = "leaf"
    for _ in range(5000):  # far past Python's recursion limit
        deep = {"custom_fields": [deep]}
    shown = redaction.redacted(deep)
    assert json.dumps(shown).count(TOO_DEEP) == 1
    accepted: Any = {"token": SECRET}
    for _ in range(MAX_DEPTH - 1):  # the deepest payload the ingress accepts: shown whole
        accepted = {"a": accepted}
    assert TOO_DEEP not in json.dumps(redaction.redacted({"payload": accepted}))


# -- the same everywhere ---------------------------------------------------------------------


def test_the_api_the_console_and_the_cli_redact_the_same_fields(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = OperatorWorld(monkeypatch, redact_fields=("ssn",))
    event_id = world.post(secret_lead())
    world.process()

    detail = world.api("get", f"/api/events/{event_id}")
    assert detail.status_code == 200
    payload = detail.get_json()["payload"]
    assert payload["api_key"] == payload["password"] == payload["token"] == REDACTED
    assert payload["custom_fields"]["access_token"] == REDACTED
    assert payload["custom_fields"]["ssn"] == REDACTED  # RELAY_REDACT_FIELDS
    assert payload["custom_fields"]["link"] == (
        f"https://crm.example/x?a=1&api_key={REDACTED}&b=2")
    assert payload["email"] == "ada@example.com"
    assert detail.get_json()["destinations"]["crm"]["status"] == "dead"  # names are not fields

    page = world.console().get(f"/console/events/{event_id}")
    assert page.status_code == 200
    shown = world.cli("events", "show", event_id, "--json").output
    assert json.loads(shown)["payload"] == payload
    for text in (detail.get_data(as_text=True), page.text, shown,
                 world.cli("events", "show", event_id).output):
        assert SECRET not in text and URL_KEY not in text and "078-05-1120" not in text


def test_error_texts_are_redacted_in_every_admin_list(monkeypatch: pytest.MonkeyPatch) -> None:
    # A destination's answer may echo the request's URL, key and all.
    world = OperatorWorld(monkeypatch)
    event_id = world.post(secret_lead())
    world.process()
    error = f"HTTP 400 from https://crm.example/?api_key={URL_KEY}"
    with world.app.extensions["relay"].database.begin() as connection:
        connection.execute(deliveries.update().values(error=error))
        connection.execute(attempts.update().values(error=error))
    world.redis.hset(stats_key("crm"), "last_error", error)
    for path in ("/api/dead-letters", "/api/deliveries?destination=crm",
                 f"/api/events/{event_id}", "/api/destinations"):
        body = world.api("get", path).get_data(as_text=True)
        assert URL_KEY not in body and "api_key=[redacted]" in body, path
    for command in (["dlq", "list"], ["status"], ["status", "--json"],
                    ["events", "show", event_id]):
        output = world.cli(*command).output
        assert URL_KEY not in output and "api_key=[redacted]" in output, command


def test_check_config_masks_a_key_in_a_destination_url(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"destinations": [{
        "name": "backend", "type": "webhook",
        "url": f"https://api.example.com/leads?api_key={URL_KEY}&list=7",
        "base_url": f"https://proxy.example.com/?token={URL_KEY}"}]}))
    view = masked(load_config(path))
    assert view["destinations"][0]["url"] == (
        f"https://api.example.com/leads?api_key={REDACTED}&list=7")
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert URL_KEY not in result.output and "list=7" in result.output


def test_log_lines_follow_the_configured_names() -> None:
    redaction.configure(["ssn"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    log = logging.getLogger("tests.one_redaction")
    log.addHandler(handler)
    try:
        log.warning("refused ?ssn=078-05-1120", extra={"ssn": "078-05-1120", "note": "ssn=1"})
    finally:
        log.removeHandler(handler)
    assert "078-05-1120" not in stream.getvalue()
    assert "ssn=[redacted]" in stream.getvalue()


@pytest.mark.parametrize("formatter", [TextFormatter, JsonFormatter])
def test_both_log_formats_hide_the_secrets_in_an_extras_text(formatter: type) -> None:
    # An attempt's error quotes the destination's answer or URL (compose logs JSON).
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter())
    log = logging.getLogger("tests.one_redaction.formats")
    log.addHandler(handler)
    try:
        log.warning("attempt failed", extra={
            "error": "HTTP 401 from https://api.example.com/leads?api_key=sk_live_123&list=7"})
    finally:
        log.removeHandler(handler)
    assert "sk_live_123" not in stream.getvalue()
    assert "list=7" in stream.getvalue()


# -- point 2: a payload deeper than the ingress takes now, already in the history --------------


def test_every_renderer_shows_a_deep_stored_payload(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # 490 levels of custom_fields: accepted before the limit, then a RecursionError (a 500 and
    # thousands of log lines) on each view of the console's event page.
    world = OperatorWorld(monkeypatch)
    inner: Any = {"leaf": SECRET, "token": SECRET}
    for _ in range(490):
        inner = {"custom_fields": inner}
    event_id = world.store("evt_deep", {**secret_lead(), "custom_fields": inner})
    world.process()
    caplog.clear()  # the dead letter's line: what follows are the views
    caplog.set_level(logging.ERROR)

    page = world.console().get(f"/console/events/{event_id}")
    assert page.status_code == 200
    assert TOO_DEEP in page.text
    api = world.api("get", f"/api/events/{event_id}")
    assert api.status_code == 200 and TOO_DEEP in api.get_data(as_text=True)
    assert TOO_DEEP in world.cli("events", "show", event_id, "--json").output
    assert "ada@example.com" in world.cli("events", "show", event_id).output
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
