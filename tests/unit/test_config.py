"""The YAML configuration: ``${VAR}`` substitution, validation errors that name the destination
and the field, the default source, masking of secrets (SPEC §3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from relay.config.relay_yaml import DEFAULT_SOURCE, load_config, masked, parse_config
from relay.core.durations import format_duration, parse_duration, parse_rate_limit
from relay.core.errors import ConfigError
from relay.core.models import RateLimit, RetryPolicy
from tests.support import ROOT as REPO


def webhook(**overrides: Any) -> dict[str, Any]:
    return {"name": "backend", "type": "webhook", "url": "https://api.example.com/leads",
            **overrides}


def problems_of(raw: Any, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, environ or {})
    return caught.value.problems


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return path


# -- the repository's own config ----------------------------------------------------------------


def test_repository_config_loads_without_any_environment() -> None:
    config = load_config(REPO / "config" / "relay.yaml", {})
    assert config.path and config.path.endswith("relay.yaml")
    assert DEFAULT_SOURCE in config.sources
    assert config.destinations, "the example config delivers somewhere"
    inbox = config.destinations[0]
    assert inbox.type == "webhook"
    assert inbox.options["url"] == "http://127.0.0.1:8000/dev/inbox"
    assert "*" in inbox.events


def test_repository_config_takes_values_from_the_environment() -> None:
    config = load_config(
        REPO / "config" / "relay.yaml", {"RELAY_PORT": "9123", "KICKOFFLABS_TOKEN": "t0k"}
    )
    assert config.destinations[0].options["url"] == "http://127.0.0.1:9123/dev/inbox"
    assert config.sources[DEFAULT_SOURCE].token == "t0k"


# -- ${VAR} substitution ------------------------------------------------------------------------


def test_variables_are_substituted_everywhere(tmp_path: Path) -> None:
    path = write(tmp_path, """
sources:
  kickofflabs: {token: "${KL_TOKEN}", dedupe_window: "${WINDOW:-1h}"}
destinations:
  - name: backend
    type: webhook
    url: https://${HOST}/leads?k=${KEY:-none}
    headers: {X-Api-Key: "${BACKEND_KEY}"}
    signing_secret: ${SECRET}
""")
    env = {"KL_TOKEN": "tok", "HOST": "api.example.com", "BACKEND_KEY": "k1", "SECRET": "s3"}
    config = load_config(path, env)
    assert config.sources["kickofflabs"].token == "tok"
    assert config.sources["kickofflabs"].dedupe_window == 3600
    [backend] = config.destinations
    assert backend.options["url"] == "https://api.example.com/leads?k=none"
    assert backend.options["headers"] == {"X-Api-Key": "k1"}
    assert backend.options["signing_secret"] == "s3"


def test_default_is_used_when_the_variable_is_empty() -> None:
    # As in the shell and docker compose: ${VAR:-default} falls back when VAR is unset *or*
    # empty, so `RELAY_PORT= relay dev` still gets a usable URL.
    raw = {"destinations": [webhook(url="http://127.0.0.1:${PORT:-8000}/hook")]}
    unset = parse_config(raw, {})
    assert unset.destinations[0].options["url"] == "http://127.0.0.1:8000/hook"
    empty = parse_config(raw, {"PORT": ""})
    assert empty.destinations[0].options["url"] == "http://127.0.0.1:8000/hook"


def test_missing_variable_is_an_error_naming_it_and_the_destination() -> None:
    raw = {"destinations": [webhook(headers={"X-Api-Key": "${BACKEND_KEY}"})]}
    [problem] = problems_of(raw)
    assert "BACKEND_KEY" in problem
    assert "destinations[0]" in problem and "backend" in problem and "headers" in problem


def test_missing_variable_in_a_source_is_an_error_naming_it() -> None:
    [problem] = problems_of({"sources": {"kickofflabs": {"token": "${KL_TOKEN}"}}})
    assert "KL_TOKEN" in problem and "kickofflabs" in problem


def test_missing_variable_through_load_config(tmp_path: Path) -> None:
    path = write(tmp_path, "destinations:\n  - {name: a, type: webhook, url: '${NOPE_URL}'}\n")
    with pytest.raises(ConfigError, match="NOPE_URL"):
        load_config(path, {})


# -- validation errors name the destination and the field ---------------------------------------


@pytest.mark.parametrize(
    ("destination", "field", "words"),
    [
        ({"name": "backend", "type": "webhook"}, "url", "Missing data"),
        (webhook(url="ftp://example.com/x"), "url", ""),
        (webhook(type="carrier-pigeon"), "type", "webhook"),
        (webhook(timeout="10 parsecs"), "timeout", "not a duration"),
        (webhook(timeout="0s"), "timeout", ""),
        (webhook(retry={"schedule": ["10s", "soon"]}), "retry.schedule.1", "not a duration"),
        (webhook(retry={"schedlue": ["10s"]}), "retry", ""),
        (webhook(rate_limit="fast"), "rate_limit", "not a rate limit"),
        (webhook(rate_limit="0/s"), "rate_limit", ""),
        (webhook(events=["new_signup", "lead_exploded"]), "events.1", "lead_exploded"),
        (webhook(events=[]), "events", ""),
        (webhook(format="xml"), "format", ""),
        (webhook(urll="https://typo.example.com"), "urll", ""),
        (webhook(name="my backend"), "name", "letters"),
        ({"name": "crm", "type": "hubspot"}, "access_token", "Missing data"),
    ],
)
def test_destination_error_names_index_name_and_field(
    destination: dict[str, Any], field: str, words: str
) -> None:
    raw = {"destinations": [webhook(name="ok"), destination]}
    label = f"destinations[1] ({destination['name']}): "
    problems = problems_of(raw)
    assert all(p.startswith(label) for p in problems), problems
    assert any(p.startswith(f"{label}{field}") and words in p for p in problems), problems


@pytest.mark.parametrize("secret", [
    "whsec_not base64!",  # the case: it passed check-config, then failed every delivery
    "whsec_c2lnbmluZw",  # padding missing
    "whsec_c2lnbmluZw==x",
    "whsec_c2ln\nbmluZw==",
    "whsec_",  # no key at all
])
def test_a_signing_secret_that_does_not_decode_is_a_config_error(secret: str) -> None:
    [problem] = problems_of({"destinations": [webhook(signing_secret=secret)]})
    assert problem.startswith("destinations[0] (backend): signing_secret: ")
    assert "whsec_" in problem and "base64" in problem or "empty" in problem
    assert secret == "whsec_" or secret not in problem  # a secret is not printed


@pytest.mark.parametrize("secret", [
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # Standard Webhooks' own test vector
    "whsec_c2lnbmluZy1zZWNyZXQtdmFsdWU=",
    "a plain secret, used as it is",
])
def test_a_signing_secret_that_decodes_is_taken(secret: str) -> None:
    [destination] = parse_config({"destinations": [webhook(signing_secret=secret)]},
                                 {}).destinations
    assert destination.options["signing_secret"] == secret


def test_every_broken_destination_is_reported_at_once() -> None:
    raw = {"destinations": [{"name": "a", "type": "webhook"},
                            webhook(name="b", timeout="x", rate_limit="y")]}
    problems = problems_of(raw)
    assert len(problems) == 3
    assert any(p.startswith("destinations[0] (a): url:") for p in problems)
    assert any(p.startswith("destinations[1] (b): timeout:") for p in problems)
    assert any(p.startswith("destinations[1] (b): rate_limit:") for p in problems)


def test_duplicate_names_are_refused() -> None:
    raw = {"destinations": [webhook(), webhook(url="https://other.example.com/")]}
    [problem] = problems_of(raw)
    assert problem.startswith("destinations[1] (backend): name:")
    assert "twice" in problem


@pytest.mark.parametrize(
    "raw",
    [["not", "a", "mapping"], {"destinations": {"name": "x"}}, {"destination": []},
     {"sources": ["kickofflabs"]}, {"destinations": ["just a string"]}],
)
def test_malformed_documents_are_config_errors(raw: Any) -> None:
    with pytest.raises(ConfigError):
        parse_config(raw, {})


def test_unreadable_and_invalid_yaml_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", {})
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "destinations: [\n"), {})


# -- what a valid config means ------------------------------------------------------------------


def test_common_keys_are_typed() -> None:
    config = parse_config({"destinations": [webhook(
        events=["new_signup", "fraudulent"], campaigns=[135544, "99"],
        where={"verified": True, "custom_fields.plan": "pro"}, timeout="2s",
        retry={"schedule": ["10s", "1m", "2h"]}, rate_limit="20/s",
    )]}, {})
    [backend] = config.destinations
    assert backend.events == {"new_signup", "marked_as_fraudulent"}
    assert backend.campaigns == {"135544", "99"}
    assert backend.where == {"verified": True, "custom_fields.plan": "pro"}
    assert backend.timeout == 2.0
    assert backend.retry.schedule == (10.0, 60.0, 7200.0)
    assert backend.retry.max_attempts == 4
    assert backend.rate_limit == RateLimit(20, 1.0)


def test_defaults_for_a_minimal_destination() -> None:
    [backend] = parse_config({"destinations": [webhook()]}, {}).destinations
    assert backend.events == {"*"}
    assert backend.campaigns is None
    assert backend.where == {}
    assert backend.timeout == 10.0
    assert backend.retry == RetryPolicy()
    assert sum(backend.retry.schedule) > 30 * 3600  # "about 33 hours"
    assert backend.rate_limit is None


def test_sources_left_out_give_the_kickofflabs_source_with_a_warning() -> None:
    config = parse_config({"destinations": [webhook()]}, {})
    assert list(config.sources) == [DEFAULT_SOURCE]
    assert config.sources[DEFAULT_SOURCE].token is None
    assert any(DEFAULT_SOURCE in w for w in config.warnings)


def test_source_without_token_warns_and_with_token_does_not() -> None:
    open_ = parse_config({"sources": {"kickofflabs": {"token": ""}}}, {})
    assert open_.sources["kickofflabs"].token is None
    assert any("token" in w for w in open_.warnings)
    closed = parse_config({"sources": {"kickofflabs": {"token": "t", "dedupe_window": "2h"}}}, {})
    assert closed.sources["kickofflabs"].token == "t"
    assert closed.sources["kickofflabs"].dedupe_window == 7200
    assert not closed.warnings


def test_masked_hides_every_secret() -> None:
    secrets = ["tok-SOURCE-1", "whsec-SIGN-2", "hdr-KEY-3", "hdr-AUTH-4", "pat-HUBSPOT-5"]
    config = parse_config({
        "sources": {"kickofflabs": {"token": secrets[0]}},
        "destinations": [
            webhook(signing_secret=secrets[1],
                    headers={"X-Api-Key": secrets[2], "Authorization": f"Bearer {secrets[3]}"}),
            {"name": "crm", "type": "hubspot", "access_token": secrets[4]},
        ],
    }, {})
    view = masked(config)
    text = json.dumps(view)
    for secret in secrets:
        assert secret not in text
    assert view["sources"]["kickofflabs"]["token"] == "***"
    backend, crm = view["destinations"]
    assert backend["signing_secret"] == "***"
    assert backend["headers"] == {"X-Api-Key": "***", "Authorization": "***"}
    assert crm["access_token"] == "***"
    # What is not secret stays readable.
    assert backend["url"] == "https://api.example.com/leads"
    assert backend["name"] == "backend" and crm["type"] == "hubspot"


# -- durations and rate limits ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("1m", 60), ("5m", 300), ("2h", 7200), ("7d", 604800), ("500ms", 0.5),
     ("1.5h", 5400), (" 30 s ", 30), ("45", 45), (5, 5), (2.5, 2.5), (0, 0)],
)
def test_durations(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "-1s", "10x", "1h30m", True, -5])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [("20/s", 20, 1), ("600/m", 600, 60), ("1000/h", 1000, 3600), ("5/10s", 5, 10),
     ("100/day", 100, 86400), ("3 / minute", 3, 60)],
)
def test_rate_limits(text: str, count: int, per: float) -> None:
    assert parse_rate_limit(text) == RateLimit(count, per)


@pytest.mark.parametrize("text", ["fast", "20", "0/s", "20/fortnight", "-1/s", "/s"])
def test_bad_rate_limits(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate_limit(text)


@pytest.mark.parametrize(("seconds", "text"), [(10, "10s"), (60, "1m"), (7200, "2h"),
                                               (86400, "1d"), (90, "90s"), (0.5, "0.5s")])
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


# -- the console's sessions and the proxies in front of relay web -----------------------------


def test_console_sessions_and_trusted_proxies_from_the_environment() -> None:
    from relay.config.settings import Settings

    default = Settings.from_env({})
    assert default.console_idle_timeout == 3600 and default.console_session_lifetime == 43200
    assert default.trusted_proxies == 0
    settings = Settings.from_env({"RELAY_CONSOLE_IDLE_TIMEOUT": "15m",
                                  "RELAY_CONSOLE_SESSION_LIFETIME": "8h",
                                  "RELAY_TRUSTED_PROXIES": "2"})
    assert settings.console_idle_timeout == 900 and settings.console_session_lifetime == 28800
    assert settings.trusted_proxies == 2


@pytest.mark.parametrize(("name", "value"), [
    ("RELAY_CONSOLE_IDLE_TIMEOUT", "0"), ("RELAY_CONSOLE_SESSION_LIFETIME", "soon"),
    ("RELAY_TRUSTED_PROXIES", "-1"), ("RELAY_TRUSTED_PROXIES", "yes")])
def test_console_and_proxy_settings_refuse_nonsense(name: str, value: str) -> None:
    from relay.config.settings import Settings

    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})
