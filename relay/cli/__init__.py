"""The ``relay`` command (click, through Flask's CLI group)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import click
import urllib3
import yaml
from flask.cli import FlaskGroup

from relay.config.relay_yaml import load_config, masked
from relay.core.errors import ConfigError
from relay.core.events import EVENTS, canonical_event_name


def _create_app():  # type: ignore[no-untyped-def]
    from relay.app import create_app

    return create_app()


@click.group(
    cls=FlaskGroup,
    create_app=_create_app,
    add_default_commands=False,
    add_version_option=False,
    load_dotenv=False,
)
def main() -> None:
    """leadrelay: a queue-backed relay for KickoffLabs lead-event webhooks."""


@main.command("check-config", with_appcontext=False)
@click.argument("path", required=False, type=click.Path(dir_okay=False))
def check_config(path: str | None) -> None:
    """Validate the YAML config (default: $RELAY_CONFIG); print it with secrets masked."""
    path = path or os.environ.get("RELAY_CONFIG") or "config/relay.yaml"
    try:
        config = load_config(path)
    except ConfigError as exc:
        click.secho(f"{path}: invalid", fg="red", err=True)
        for problem in exc.problems:
            click.echo(f"  - {problem}", err=True)
        sys.exit(1)
    click.echo(yaml.safe_dump(masked(config), sort_keys=False), nl=False)
    for warning in config.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    click.secho(f"{path}: OK ({len(config.destinations)} destinations)", fg="green", err=True)


@main.command(with_appcontext=False)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=None, type=int, help="gunicorn processes [default: cores + 1]")
@click.option("--threads", default=2, show_default=True, type=int, help="threads per process")
def web(host: str, port: int, workers: int | None, threads: int) -> None:
    """Serve the ingress and APIs with gunicorn (gthread workers).

    Defaults measured with ``python -m bench.ingress`` on 2 cores: cores + 1 processes x 2
    threads beat x 1 and x 4; ``--reuse-port`` gives each process its own listening socket, so
    keep-alive connections spread evenly instead of piling onto one process.
    """
    workers = workers or (os.cpu_count() or 1) + 1
    args = [
        sys.executable, "-m", "gunicorn", "relay.wsgi:app",
        "--bind", f"{host}:{port}",
        "--reuse-port",
        "--worker-class", "gthread",
        "--workers", str(workers),
        "--threads", str(threads),
        "--keep-alive", "5",
        "--timeout", "30",
        "--graceful-timeout", "20",
    ]
    if os.environ.get("RELAY_ACCESS_LOG"):
        # Without an access log gunicorn formats nothing (a /dev/null log still costs 8 %).
        # %(U)s is the path without the query string: ?token= and ?api_key= stay out.
        args += ["--access-logfile", "-",
                 "--access-logformat", '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)s']
    os.execv(sys.executable, args)


@main.command(with_appcontext=False)
@click.option(
    "--processes",
    "-p",
    default=None,
    type=click.IntRange(1, 256),
    help="worker processes, each a Celery worker with its own tasks and send threads "
    "[default: the cores this process may use]",
)
@click.option(
    "--concurrency",
    "-c",
    default=8,
    show_default=True,
    type=click.IntRange(1, 256),
    help="tasks (lanes drained, intake batches) at once in each worker process",
)
@click.option(
    "--max-in-flight",
    default=None,
    type=click.IntRange(1, 10_000),
    help="deliveries in flight at once in each worker process "
    "[default: RELAY_MAX_IN_FLIGHT or 100]",
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--task-events/--no-task-events", default=False, show_default=True,
              help="send task events from the start (Flower turns them on when it runs)")
def worker(processes: int | None, concurrency: int, max_in_flight: int | None, loglevel: str,
           task_events: bool) -> None:
    """Run the Celery workers (each carries the retry scheduler and the lane sweep): one
    process per core by default, each sending on a pool of --max-in-flight threads. Python
    runs one thread at a time per process, so against fast receivers throughput comes from
    processes; a dead process is started again, and SIGTERM stops them all warmly."""
    if max_in_flight is not None:
        os.environ["RELAY_MAX_IN_FLIGHT"] = str(max_in_flight)
    args = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--queues", "relay",
        "--loglevel", loglevel,
        "--pool", "threads",
        "--concurrency", str(concurrency),
        # No remote-control sync is used (no revokes, no autoscale): skip the start-up
        # mingle and the gossip chatter, which cost a second and constant Redis traffic.
        "--without-mingle", "--without-gossip",
    ]
    if task_events:
        # Events cost a quarter of a delivery's CPU (bench.delivery); Flower enables them on
        # every worker by remote control while it runs, so they are off by default.
        args.append("--task-events")
    processes = processes or usable_cores()
    if processes == 1:
        os.execv(sys.executable, args)
    from relay.cli.processes import Replicas

    # Each process is its own Celery node (Flower lists them): relay1@host, relay2@host, …
    replicas = Replicas(lambda i: [*args, "--hostname", f"relay{i}@%h"], processes,
                        say=lambda text: click.echo(f"relay worker: {text}", err=True))
    sys.exit(replicas.run())


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers set)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@main.command("send-sample", with_appcontext=False)
@click.argument("event", type=click.Choice(sorted([*EVENTS, "fraudulent"])))
@click.option("--url", default="http://127.0.0.1:8000/hooks/kickofflabs", show_default=True)
@click.option("--token", default=None, help="the source's token (sent as X-Relay-Token)")
@click.option("--form", "as_form", is_flag=True, help="send form-encoded, as legacy senders do")
def send_sample(event: str, url: str, token: str | None, as_form: bool) -> None:
    """POST a sample KickoffLabs payload for EVENT."""
    payload = sample_payload(canonical_event_name(event))
    payload["__event"] = event
    headers = {"User-Agent": "KickoffLabs"}
    if token:
        headers["X-Relay-Token"] = token
    if as_form:
        from relay.core.formdata import encode

        body = encode(payload).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    else:
        body = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    try:
        response = urllib3.request(
            "POST", url, body=body, headers=headers, timeout=10, retries=False
        )
    except urllib3.exceptions.HTTPError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    click.echo(f"{response.status} {response.data.decode(errors='replace')}")
    if response.status >= 300:
        sys.exit(1)


def sample_payload(event: str) -> dict[str, object]:
    text = resources.files("relay").joinpath("samples", f"{event}.json").read_text()
    payload: dict[str, object] = json.loads(text)
    return payload


@main.command(with_appcontext=False)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--concurrency", default=8, show_default=True, type=int)
@click.option("--flower", is_flag=True, help="also run Flower on port 5555")
@click.option(
    "--data-dir", default=".relay", show_default=True, help="where the embedded Redis keeps its AOF"
)
def dev(port: int, concurrency: int, flower: bool, data_dir: str) -> None:
    """Everything in one process tree: embedded Redis (unless RELAY_REDIS_URL is set), web,
    worker, and the /dev/inbox destination the example config delivers to."""
    from relay.cli.embedded_redis import EmbeddedRedis
    from relay.cli.processes import ProcessTree

    env = dict(os.environ)
    env.setdefault("RELAY_CONFIG", "config/relay.yaml")
    env["RELAY_DEV_INBOX"] = "1"
    env["RELAY_PORT"] = str(port)
    env.setdefault("RELAY_SECRET_KEY", os.urandom(32).hex())  # the console's sessions, this run
    try:
        load_config(env["RELAY_CONFIG"], env)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    embedded = None
    if not env.get("RELAY_REDIS_URL"):
        embedded = EmbeddedRedis(Path(data_dir) / "redis", port=_dev_redis_port()).start()
        env["RELAY_REDIS_URL"] = embedded.url
        click.echo(f"embedded Redis  {embedded.url}  (AOF in {data_dir}/redis)")
    relay = [sys.executable, "-m", "relay"]
    children = [
        subprocess.Popen(
            [
                *relay,
                "web",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--threads",
                "8",
            ],
            env=env,
        ),
        # One worker process: a laptop needs no more, and it keeps one log stream.
        subprocess.Popen([*relay, "worker", "--processes", "1", "--concurrency", str(concurrency)],
                         env=env),
    ]
    if flower:
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "workers.celery_app",
                    "flower",
                    "--address=127.0.0.1",
                    "--port=5555",
                ],
                env=env,
            )
        )
    base = f"http://127.0.0.1:{port}"
    click.secho(f"\nleadrelay is running at {base}", fg="green", bold=True)
    click.echo(f"  ingress     POST {base}/hooks/kickofflabs")
    click.echo(f"  dev inbox   {base}/dev/inbox   (where the example config delivers)")
    click.echo(f"  health      {base}/readyz")
    click.echo(f"  console     {base}/console   (sign in with a key of RELAY_API_KEYS)")
    if flower:
        click.echo("  flower      http://127.0.0.1:5555")
    click.echo("\nTry it:")
    click.echo(f"  relay send-sample new_signup --url {base}/hooks/kickofflabs")
    click.echo(
        f"  curl -s -X POST {base}/hooks/kickofflabs -H 'Content-Type: application/json' "
        '-d \'{"__event": "new_signup", "email": "ada@example.com", '
        '"social_id": "abc123"}\''
    )
    click.echo("Press Ctrl-C to stop.\n")
    # SIGTERM, SIGINT and SIGHUP stop the whole tree (Redis last); dev exits after all of it.
    tree = ProcessTree(children, last=[embedded.process if embedded is not None else None])
    if tree.wait() == "exited":
        click.secho("a child process exited; stopping", fg="red", err=True)
    else:
        click.echo("\nstopping…")
    tree.stop()
    click.echo("stopped.")


def _dev_redis_port() -> int:
    from relay.cli.embedded_redis import free_port

    return int(os.environ.get("RELAY_DEV_REDIS_PORT") or free_port())


from relay.cli import operator as cli_ops  # noqa: E402  (status, events, dlq, pause, resume, erase)

for _command in cli_ops.commands.commands.values():
    main.add_command(_command)
