"""docker-compose.yml and the Dockerfile, checked against the code (no Docker engine here)."""

from __future__ import annotations

import importlib
import re
from typing import Any

import click
import pytest
import yaml

from relay.cli import main as relay_cli
from tests.support import ROOT


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _check_relay_command(args: list[str]) -> click.Command:
    """Parse the service's command with the real CLI, as `relay` would at start-up."""
    assert args[0] == "relay"
    command = relay_cli.commands.get(args[1])
    assert command is not None, f"relay has no command {args[1]!r}"
    command.make_context(args[1], list(args[2:]))  # raises on an unknown option
    return command


def test_services_are_the_documented_ones(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "postgres", "migrate", "web", "worker",
                                        "flower"}


def test_the_history_is_postgresql_migrated_before_the_relay_starts(
        compose: dict[str, Any]) -> None:
    from sqlalchemy.engine import make_url

    services = compose["services"]
    postgres = services["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in postgres["healthcheck"]["test"]
    migrate = services["migrate"]
    assert _check_relay_command(migrate["command"]).name == "db"
    assert migrate["command"][1:] == ["db", "upgrade"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = postgres["environment"]
    for service in ("migrate", "web", "worker", "flower"):
        url = make_url(services[service]["environment"]["RELAY_DATABASE_URL"].replace(
            "${POSTGRES_PASSWORD:-relay}", env["POSTGRES_PASSWORD"].split(":-")[-1].rstrip("}")))
        assert url.get_backend_name() == "postgresql" and url.host == "postgres"
        assert (url.username, url.database) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
    for service in ("web", "worker", "flower"):
        condition = services[service]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully"


def test_redis_is_durable_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "healthcheck" in redis


def test_web_and_worker_commands_exist_in_the_cli(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert _check_relay_command(services["web"]["command"]).name == "web"
    assert _check_relay_command(services["worker"]["command"]).name == "worker"
    assert "8000:8000" in services["web"]["ports"]


def test_web_faces_clients_with_the_server_that_reads_whole_requests(
        compose: dict[str, Any]) -> None:
    """What the web service's `relay web` execs: gevent workers with relay's whole-request
    layer (slow clients cost a greenlet, not the ingress), its timeouts, on the exposed port."""
    from unittest import mock

    import relay.cli

    args = compose["services"]["web"]["command"]
    with mock.patch.object(relay.cli.os, "execv", side_effect=SystemExit) as execv, \
            mock.patch.object(relay.cli, "_single_machine_history"), \
            pytest.raises(SystemExit):
        relay_cli.main(args=args[1:], prog_name="relay")
    argv = execv.call_args.args[1]
    option = {name: value for name, value in zip(argv, argv[1:], strict=False)}
    assert option["--worker-class"] == "gevent"
    assert option["--config"] == "python:relay.cli.web_server"
    assert importlib.import_module("relay.cli.web_server").post_worker_init
    assert int(option["--keep-alive"]) > 0  # gevent workers read headers within it
    assert int(option["--timeout"]) > 0
    assert option["--bind"] == "0.0.0.0:8000"
    assert "8000:8000" in compose["services"]["web"]["ports"]


@pytest.mark.parametrize("service", ["web", "worker", "flower"])
def test_every_relay_service_uses_the_same_redis_and_config(
    compose: dict[str, Any], service: str
) -> None:
    spec = compose["services"][service]
    env = spec["environment"]
    assert env["RELAY_REDIS_URL"] == "redis://redis:6379/0"
    assert env["RELAY_CONFIG"].startswith("/app/config/")
    assert "./config:/app/config:ro" in spec["volumes"]
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    assert spec["build"] == "."


def test_flower_points_at_the_workers_celery_app(compose: dict[str, Any]) -> None:
    command = compose["services"]["flower"]["command"]
    assert command[:4] == ["celery", "-A", "workers.celery_app", "flower"]
    assert "--port=5555" in command
    assert any(arg.startswith("--basic-auth=${FLOWER_BASIC_AUTH") for arg in command)
    assert "5555:5555" in compose["services"]["flower"]["ports"]
    module = importlib.import_module("workers.celery_app")
    # Flower reads the broker from the app, which reads RELAY_REDIS_URL like the workers.
    assert module.app.conf.broker_url == module.settings.redis_url
    # Workers send task events once Flower enables them (its default): it must not opt out.
    assert not any(arg.startswith("--enable_events=") or arg.startswith("--enable-events=")
                   for arg in command)


def test_dockerfile_installs_what_the_services_run() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for path in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        for part in path.split():
            assert (ROOT / part).exists(), f"Dockerfile copies missing {part}"
    assert 'pip install ".[flower]"' in dockerfile
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd is not None
    _check_relay_command(yaml.safe_load(cmd.group(1)))


def test_config_mounted_into_the_image_is_valid() -> None:
    from relay.config.relay_yaml import load_config

    config = load_config(ROOT / "config" / "relay.yaml", {})
    assert config.sources["kickofflabs"]
