"""The ``relay`` command: a click group whose commands each import what they need when they
run, so ``relay --help`` and ``relay worker`` (which only execs Celery) stay light, and none of
them builds the web app: ``relay web`` hands that to gunicorn (:mod:`relay.wsgi`), and the
operator commands (:mod:`relay.cli.operator`) talk to Redis, even with a broken YAML.

While ``relay dev`` runs, its state folder (``.relay/``) holds ``dev.json``: the Redis (its
embedded one) and the history it runs on. The operator commands run from the same directory
without ``RELAY_REDIS_URL`` (``RELAY_DATABASE_URL``) use those (:func:`use_running_dev`);
``relay web`` and ``relay worker`` never do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import click

from relay.cli.operator import commands as operator_commands
from relay.core.errors import ConfigError
from relay.core.events import EVENTS, canonical_event_name


class _Relay(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # The history database away: one line, not a traceback (sqlalchemy is imported
            # only by the commands that use it, so it is recognised by its module).
            if type(exc).__module__.startswith("sqlalchemy."):
                raise click.ClickException(
                    f"cannot use the history database (RELAY_DATABASE_URL): {exc}") from None
            raise


@click.group(cls=_Relay)
@click.pass_context
def main(ctx: click.Context) -> None:
    """leadrelay: a queue-backed relay for KickoffLabs lead-event webhooks."""
    # Operator commands beside a running relay dev use its Redis and history; dev chooses
    # its own, and a web or worker process is never silently joined to a dev's.
    if ctx.invoked_subcommand not in {"dev", "web", "worker"}:
        use_running_dev()


#: ``relay dev``'s state file, in its --data-dir while it runs.
DEV_STATE = "dev.json"
DEV_DATA_DIR = ".relay"


def use_running_dev(data_dir: str | os.PathLike[str] = DEV_DATA_DIR) -> dict[str, Any] | None:
    """Point this process at the Redis and history of the ``relay dev`` running from this
    directory (its ``dev.json``), where ``RELAY_REDIS_URL`` / ``RELAY_DATABASE_URL`` are not
    set: what ``relay status`` in a second terminal expects. A file left by a ``relay dev``
    that is gone (killed) is ignored."""
    state = read_dev_state(Path(data_dir))
    if state is None:
        return None
    for variable, key in (("RELAY_REDIS_URL", "redis_url"),
                          ("RELAY_DATABASE_URL", "database_url")):
        if not os.environ.get(variable) and state.get(key):
            os.environ[variable] = str(state[key])
    return state


def read_dev_state(data_dir: Path) -> dict[str, Any] | None:
    """The running ``relay dev``'s state, or None. A live ``relay dev`` holds a lock on its
    file (:func:`hold_dev_state`): a file nobody holds was left by one that was killed (a pid
    would not do: it may be another process's by now)."""
    try:
        with (data_dir / DEV_STATE).open("rb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                state = json.loads(file.read())  # held: its relay dev runs
            else:
                return None  # nobody holds it: that relay dev is gone
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def hold_dev_state(path: Path, state: dict[str, Any]) -> IO[bytes]:
    """Write ``relay dev``'s state file and hold a lock on it for as long as the returned
    file stays open (the lock goes with the process, however it ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("wb")
    fcntl.flock(file, fcntl.LOCK_EX)
    file.write((json.dumps(state, indent=2) + "\n").encode())
    file.flush()
    return file


for _command in operator_commands.commands.values():  # status, events, dlq, pause, resume, erase
    main.add_command(_command)


@main.command("check-config")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
def check_config(path: str | None) -> None:
    """Validate the YAML config (default: $RELAY_CONFIG); print it with secrets masked."""
    import yaml

    from relay.cli.operator import configure_redaction
    from relay.config.relay_yaml import load_config, masked

    path = path or os.environ.get("RELAY_CONFIG") or "config/relay.yaml"
    try:
        config = load_config(path)
    except ConfigError as exc:
        click.secho(f"{path}: invalid", fg="red", err=True)
        for problem in exc.problems:
            click.echo(f"  - {problem}", err=True)
        sys.exit(1)
    configure_redaction()  # ?api_key= in URLs, and the names of RELAY_REDACT_FIELDS
    click.echo(yaml.safe_dump(masked(config), sort_keys=False), nl=False)
    for warning in config.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    click.secho(f"{path}: OK ({len(config.destinations)} destinations)", fg="green", err=True)


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=None, type=int, help="gunicorn processes [default: cores + 1]")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 1000),
              help="requests each process runs at once (its green threads in the app; "
              "connections being read or written hold none)")
@click.option("--timeout", default=30, show_default=True, type=click.IntRange(1, 3600),
              help="seconds a request body may take to arrive (then 408); a worker silent "
              "this long is restarted")
def web(host: str, port: int, workers: int | None, threads: int, timeout: int) -> None:
    """Serve the ingress and APIs with gunicorn (gevent workers that read whole requests).

    A connection is a greenlet: slow or stalled clients (a body trickling in, headers a line a
    second) wait on their sockets without holding the app, which is called once a request's
    body is in (relay.cli.web_server). Headers must arrive within the keep-alive time (5 s),
    a body within --timeout. Defaults measured with ``python -m bench.ingress`` on 2 cores:
    cores + 1 processes; ``--reuse-port`` gives each process its own listening socket, so
    keep-alive connections spread evenly instead of piling onto one process.
    """
    _single_machine_history()
    workers = workers or (os.cpu_count() or 1) + 1
    args = [
        sys.executable, "-m", "gunicorn", "relay.wsgi:app",
        "--config", "python:relay.cli.web_server",
        "--bind", f"{host}:{port}",
        "--reuse-port",
        "--worker-class", "gevent",
        "--workers", str(workers),
        "--threads", str(threads),
        "--worker-connections", "1000",
        "--keep-alive", "5",
        "--timeout", str(timeout),
        "--graceful-timeout", "20",
    ]
    if os.environ.get("RELAY_ACCESS_LOG"):
        # Without an access log gunicorn formats nothing (a /dev/null log still costs 8 %).
        # %(U)s is the path without the query string: ?token= and ?api_key= stay out.
        args += ["--access-logfile", "-",
                 "--access-logformat", '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)s']
    os.execv(sys.executable, args)


@main.command()
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
    _single_machine_history()
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


@main.group()
def db() -> None:
    """The history database (RELAY_DATABASE_URL: PostgreSQL, or an SQLite file by default)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Bring the history database's schema up to date (Alembic migrations; safe to repeat)."""
    from relay.config.settings import Settings
    from relay.history.database import current_revision, upgrade

    url = _settings_or_exit(Settings).database_url
    try:
        upgrade(url, revision)
    except Exception as exc:  # noqa: BLE001 - any driver's error: one line, not a traceback
        raise click.ClickException(f"cannot upgrade the history database: {exc}") from None
    click.echo(f"history database at revision {current_revision(url)}")


def _settings_or_exit(settings_class: Any) -> Any:
    try:
        return settings_class.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _single_machine_history() -> None:
    """``relay web`` and ``relay worker`` on the default SQLite history bring its schema up to
    date themselves: one machine, no migration step to forget. PostgreSQL is migrated by
    ``relay db upgrade`` (docker compose runs it before the relay starts)."""
    from relay.config.settings import Settings

    url = _settings_or_exit(Settings).database_url
    if url.startswith("sqlite"):
        from relay.history.database import upgrade

        upgrade(url)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers set)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@main.command("send-sample")
@click.argument("event", type=click.Choice(sorted([*EVENTS, "fraudulent"])))
@click.option("--url", default="http://127.0.0.1:8000/hooks/kickofflabs", show_default=True)
@click.option("--token", default=None, help="the source's token (sent as X-Relay-Token)")
@click.option("--form", "as_form", is_flag=True, help="send form-encoded, as legacy senders do")
def send_sample(event: str, url: str, token: str | None, as_form: bool) -> None:
    """POST a sample KickoffLabs payload for EVENT."""
    import urllib3

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
    from importlib import resources

    text = resources.files("relay").joinpath("samples", f"{event}.json").read_text()
    payload: dict[str, object] = json.loads(text)
    return payload


@main.command()
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--concurrency", default=8, show_default=True, type=int)
@click.option("--flower", is_flag=True, help="also run Flower on port 5555")
@click.option(
    "--data-dir", default=DEV_DATA_DIR, show_default=True,
    help="where the embedded Redis keeps its AOF, and the SQLite history its file"
)
def dev(port: int, concurrency: int, flower: bool, data_dir: str) -> None:
    """Everything in one process tree: embedded Redis (unless RELAY_REDIS_URL is set), web,
    worker, and the /dev/inbox destination the example config delivers to.

    While it runs, DATA_DIR/dev.json says which Redis and history it uses: relay status,
    events, dlq ... run from the same directory find them there."""
    import importlib.util

    if flower and importlib.util.find_spec("flower") is None:
        # Refused before anything starts: Flower failing at start-up would stop it all.
        raise click.ClickException(
            "--flower needs Flower, which is not installed: pip install 'leadrelay[flower]' "
            "(or run relay dev without --flower)")
    from relay.cli.embedded_redis import EmbeddedRedis
    from relay.cli.processes import ProcessTree
    from relay.config.relay_yaml import load_config

    env = dict(os.environ)
    env.setdefault("RELAY_CONFIG", "config/relay.yaml")
    env["RELAY_DEV_INBOX"] = "1"
    env["RELAY_PORT"] = str(port)
    env.setdefault("RELAY_SECRET_KEY", os.urandom(32).hex())  # the console's sessions, this run
    try:
        load_config(env["RELAY_CONFIG"], env)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    from relay.history.database import upgrade

    # The history beside the embedded Redis's data, unless RELAY_DATABASE_URL says otherwise.
    history = env.setdefault("RELAY_DATABASE_URL",
                             f"sqlite:///{(Path(data_dir) / 'history.sqlite3').resolve()}")
    upgrade(history)  # the migrations, on every start (safe to repeat)
    click.echo(f"history         {history}")
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
    where = "" if Path(data_dir).resolve() == Path(DEV_DATA_DIR).resolve() else (
        f" (with RELAY_REDIS_URL={env['RELAY_REDIS_URL']} RELAY_DATABASE_URL={history})")
    click.echo(f"  operators   relay status, relay events show ... from this directory{where}")
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
    state = Path(data_dir) / DEV_STATE
    held = hold_dev_state(state, {"pid": os.getpid(), "redis_url": env["RELAY_REDIS_URL"],
                                  "database_url": history, "url": base})
    try:
        why = tree.wait()
        if why == "exited":
            click.secho("a child process exited; stopping", fg="red", err=True)
        else:
            click.echo("\nstopping…")
        tree.stop()
    finally:
        with contextlib.suppress(OSError):
            state.unlink()
        held.close()
    click.echo("stopped.")
    if why == "exited":
        sys.exit(1)  # it did not run as asked


def _dev_redis_port() -> int:
    from relay.cli.embedded_redis import free_port

    return int(os.environ.get("RELAY_DEV_REDIS_PORT") or free_port())
