"""The ``relay`` command: ``check-config`` and ``send-sample`` (SPEC §3), through click's runner
and against loopback servers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from click.testing import CliRunner, Result

from relay.cli import main
from relay.core import formdata as forms
from tests.support import ROOT as REPO
from tests.support.helpers import accepted_events, make_app
from tests.support.loopback import closed_port, serve_app
from tests.support.samples import SAMPLE_EVENTS, sample
from tests.support.vendor_server import VendorServer

REPO_CONFIG = REPO / "config" / "relay.yaml"
# Nothing from the developer's shell may leak into these runs.
CLEAN_ENV: dict[str, str | None] = {
    "RELAY_CONFIG": None, "RELAY_REDIS_URL": "redis://127.0.0.1:1/0", "RELAY_API_KEYS": None,
    "KICKOFFLABS_TOKEN": None, "RELAY_PORT": None, "FLASK_APP": None,
}


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env={**CLEAN_ENV, **(env or {})})


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(REPO)
    return REPO


# -- check-config ---------------------------------------------------------------------------------


def test_repository_config_is_valid(in_repo: Path) -> None:
    result = run("check-config", str(REPO_CONFIG))
    assert result.exit_code == 0, result.output
    printed = result.stdout
    assert "dev-inbox" in printed and "http://127.0.0.1:8000/dev/inbox" in printed
    assert "OK" in result.stderr


def test_default_path_comes_from_relay_config(in_repo: Path) -> None:
    result = run("check-config", env={"RELAY_CONFIG": str(REPO_CONFIG)})
    assert result.exit_code == 0, result.output


def test_check_config_works_from_any_directory(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Checking a file must not need the web app (or its default config) to be loadable.
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "relay.yaml"
    path.write_text("destinations:\n  - {name: backend, type: webhook, url: 'http://x.test/'}\n")
    result = run("check-config", str(path))
    assert result.exit_code == 0, (result.output, result.exception)


BROKEN = """
sources:
  kickofflabs: {token: t}
destinations:
  - name: inbox
    type: webhook
    url: http://127.0.0.1:8000/dev/inbox
  - name: backend
    type: webhook
    timeout: 5s
  - name: crm
    type: hubspot
    access_token: pat-na1-x
    timeout: soon
"""


def test_broken_config_names_destination_and_field(in_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = run("check-config", str(path))
    assert result.exit_code == 1
    assert "destinations[1] (backend): url:" in result.stderr
    assert "destinations[2] (crm): timeout:" in result.stderr
    assert "Traceback" not in result.output


def test_broken_relay_config_is_reported_not_raised(in_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = run("check-config", env={"RELAY_CONFIG": str(path)})
    assert result.exit_code == 1
    assert "destinations[1] (backend): url:" in result.stderr, (result.output,
                                                               result.exception)


def test_missing_variable_is_named(in_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("destinations:\n  - {name: b, type: webhook, url: '${BACKEND_URL}'}\n")
    result = run("check-config", str(path), env={"BACKEND_URL": None})
    assert result.exit_code == 1
    assert "BACKEND_URL" in result.stderr


def test_secrets_are_masked_in_the_output(in_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("""
sources:
  kickofflabs: {token: "${KL_TOKEN}"}
destinations:
  - name: backend
    type: webhook
    url: https://api.example.com/leads
    headers: {X-Api-Key: "${BACKEND_KEY}"}
    signing_secret: ${BACKEND_SECRET}
  - name: crm
    type: hubspot
    access_token: pat-na1-secret-token-value
""")
    env = {"KL_TOKEN": "kl-secret-token-value", "BACKEND_KEY": "key-secret-value",
           "BACKEND_SECRET": "whsec_c2lnbmluZy1zZWNyZXQtdmFsdWU="}
    result = run("check-config", str(path), env=env)
    assert result.exit_code == 0, result.output
    for secret in [*env.values(), "pat-na1-secret-token-value"]:
        assert secret not in result.output
    assert "***" in result.stdout
    assert "https://api.example.com/leads" in result.stdout


def test_no_sources_warns(in_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("destinations:\n  - {name: b, type: webhook, url: 'http://x.test/'}\n")
    result = run("check-config", str(path))
    assert result.exit_code == 0
    assert "warning" in result.stderr and "kickofflabs" in result.stderr


# -- send-sample ----------------------------------------------------------------------------------

ALL_NAMES = [*SAMPLE_EVENTS, "fraudulent"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_send_sample_posts_the_sample(in_repo: Path, vendor: VendorServer, name: str) -> None:
    vendor.reply(202, {"status": "accepted"})
    result = run("send-sample", name, "--url", vendor.url + "/hooks/kickofflabs")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("202")
    [request] = vendor.requests
    assert request.method == "POST" and request.path == "/hooks/kickofflabs"
    assert request.header("Content-Type") == "application/json"
    assert request.header("User-Agent") == "KickoffLabs"
    body: dict[str, Any] = request.json()
    assert body["__event"] == name
    canonical = "marked_as_fraudulent" if name == "fraudulent" else name
    assert body == {**sample(canonical), "__event": name}


def test_send_sample_with_token_and_form(in_repo: Path, vendor: VendorServer) -> None:
    result = run("send-sample", "tagged", "--url", vendor.url + "/h", "--token", "t0k", "--form")
    assert result.exit_code == 0, result.output
    [request] = vendor.requests
    assert request.header("X-Relay-Token") == "t0k"
    assert request.header("Content-Type") == "application/x-www-form-urlencoded"
    decoded = forms.decode(parse_qsl(request.body.decode(), keep_blank_values=True))
    assert decoded["__tagged"] == {"tag_id": "42", "name": "vip", "points": "10"}


def test_send_sample_fails_on_an_error_answer(in_repo: Path, vendor: VendorServer) -> None:
    vendor.reply(401, {"error": "missing or wrong token"})
    result = run("send-sample", "new_signup", "--url", vendor.url + "/h")
    assert result.exit_code == 1
    assert "401" in result.stdout


def test_send_sample_to_nowhere_is_a_clean_error(in_repo: Path) -> None:
    result = run("send-sample", "new_signup", "--url", f"http://127.0.0.1:{closed_port()}/h")
    assert result.exit_code == 1
    assert "cannot reach" in result.output


def test_send_sample_refuses_unknown_events(in_repo: Path) -> None:
    result = run("send-sample", "lead_exploded", "--url", "http://127.0.0.1:9/h")
    assert result.exit_code == 2


@pytest.fixture
def ingress() -> Iterator[tuple[str, Any]]:
    """The real app on fakeredis, served on a loopback port."""
    app = make_app()
    with serve_app(app) as url:
        yield f"{url}/hooks/kickofflabs", app


def test_every_sample_is_accepted_by_the_real_ingress(in_repo: Path,
                                                      ingress: tuple[str, Any]) -> None:
    url, app = ingress
    ids: dict[tuple[str, bool], str] = {}
    for name in ALL_NAMES:
        for as_form in (False, True):
            result = run("send-sample", name, "--url", url, *(["--form"] if as_form else []))
            assert result.exit_code == 0, (name, as_form, result.output)
            status, body = result.stdout.split(" ", 1)
            assert status == "202"
            ids[name, as_form] = json.loads(body)["event_id"]
    for name in ALL_NAMES:
        assert ids[name, False] == ids[name, True], name
    assert ids["fraudulent", False] == ids["marked_as_fraudulent", False]
    assert len({ids[name, False] for name in SAMPLE_EVENTS}) == len(SAMPLE_EVENTS)
    events = accepted_events(app.extensions["relay"].redis)
    assert len(events) == 2 * len(ALL_NAMES)
    assert {e["name"] for e in events} == set(SAMPLE_EVENTS)
