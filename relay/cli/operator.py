"""Operator commands of ``relay``: ``status``, ``events show``, ``dlq list|replay``, ``pause``,
``resume``, ``erase``. They talk to Redis directly (``RELAY_REDIS_URL``), so they work with no web
process running, and with a YAML that does not load (they fall back to what Redis knows).
:mod:`relay.cli` adds :data:`commands` to ``relay``.

Each command imports the operations it runs when it runs: ``relay --help`` and ``relay worker``
load this module too, and need none of them.

What they print from stored data (a lead's fields, a destination's error, a reason) goes
through :func:`shown`: redacted by the relay's one policy, as the admin API and the console show
it, and with its control characters escaped, so a lead's email cannot drive the terminal
(clear it, set its title); the only line breaks and colours are the CLI's own.

Tests point them at fakeredis by replacing :func:`redis_client` (and :func:`relay_config`).
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from relay.config.settings import Settings
from relay.core import redaction
from relay.core.errors import ConfigError
from relay.core.printable import escaped

if TYPE_CHECKING:
    import redis
    from sqlalchemy import Engine as Database

    from relay.config.relay_yaml import RelayConfig
    from relay.operations.context import OperatorContext

#: The operations commands; :mod:`relay.cli` adds each to ``relay`` (this module imports
#: nothing of it, so the two do not import each other).
commands = click.Group("operations")


def redis_client() -> redis.Redis:
    """The Redis the relay uses (``RELAY_REDIS_URL``)."""
    from relay.store.connection import connect

    return connect(Settings.from_env().redis_url, timeout=5)


def relay_config() -> RelayConfig | None:
    """The YAML config (``RELAY_CONFIG``), or None when it cannot be read: the commands still
    work from what Redis knows."""
    from relay.config.relay_yaml import load_config

    try:
        return load_config(Settings.from_env().config_path)
    except (ConfigError, OSError):
        return None


def _client() -> redis.Redis:
    import redis

    try:
        client = redis_client()
    except ConfigError as exc:  # a bad RELAY_* setting
        raise click.ClickException(str(exc)) from None
    try:
        client.ping()
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot reach Redis: {exc}") from None
    return client


def history_database() -> Database:
    """The history database (``RELAY_DATABASE_URL``)."""
    from relay.history.database import shared_database

    return shared_database(Settings.from_env().database_url)


def _ops(client: redis.Redis | None = None) -> OperatorContext:
    from relay.operations.context import OperatorContext

    settings = Settings.from_env()
    redaction.configure(settings.redact_fields)
    return OperatorContext(client or _client(), history_database(), settings.retention)


def configure_redaction() -> None:
    """The redaction policy with ``RELAY_REDACT_FIELDS``, for a command that needs no other
    setting (``check-config``): with an environment that does not load, the default one."""
    try:
        redaction.configure(Settings.from_env().redact_fields)
    except ConfigError:
        redaction.configure()


def shown(value: object) -> str:
    """A value from stored data as the CLI prints it: redacted (``?api_key=…``), control
    characters escaped."""
    return escaped(redaction.redact(str(value)))


def _json(value: Any) -> str:
    # JSON's encoder escapes every control character (and non-ASCII) itself.
    return json.dumps(value, indent=2, default=str)


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(epoch)))


def _table(rows: list[list[str]], headers: list[str]) -> None:
    # Widths from the visible text: styled cells carry ANSI codes.
    def width(cell: str) -> int:
        return len(click.unstyle(cell))

    widths = [max(width(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c + " " * (w - width(c))
                         for c, w in zip(cells, widths, strict=True)).rstrip()

    click.echo(line([h.upper() for h in headers]))
    for row in rows:
        click.echo(line(row))


_STATE_COLOURS = {"active": "green", "paused": "yellow", "half-open": "yellow",
                  "slowed": "yellow", "open": "red"}


@commands.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(as_json: bool) -> None:
    """Queue depth, parked tasks, dead letters and the health of each destination."""
    from relay.operations.status import relay_status

    overview = relay_status(_ops(), relay_config())
    if as_json:
        click.echo(_json(redaction.redacted(overview, by_name=False)))
        return
    health = overview["destinations"]
    click.echo(f"queue {overview['queue_depth']}   retries waiting "
               f"{overview['scheduled']}   dead letters {overview['dead_letters']}")
    if not health:
        click.echo("no destinations")
        return
    click.echo()
    rows = []
    for d in health:
        rate = "-" if d["success_rate"] is None else f"{d['success_rate'] * 100:.1f}%"
        state = click.style(shown(d["state"]), fg=_STATE_COLOURS.get(d["state"]))
        rows.append([shown(d["name"]), shown(d["type"] or "-"), state, rate,
                     str(d["delivered"]), str(d["queued"]), str(d["retrying"]), str(d["dead"]),
                     _latency(d["latency_p50_ms"]), _latency(d["latency_p95_ms"]),
                     _cut(shown(d["last_error"] or "-"), 60)])
    _table(rows, ["destination", "type", "state", "success", "delivered", "queued", "retrying",
                  "dead", "p50", "p95", "last error"])
    for d in health:  # why each paused one is
        if d.get("paused_at") is not None:
            reason = d["paused_reason"]
            why = f"reason: {shown(reason)}" if reason else "no reason given"
            click.echo(f"paused: {shown(d['name'])} since {_when(d['paused_at'])}, "
                       f"{_cut(why, 100)}")


def _latency(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}ms"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@commands.group()
def events() -> None:
    """Look up events."""


@events.command("show")
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="the full record as JSON")
def events_show(event_id: str, as_json: bool) -> None:
    """Where EVENT_ID went: each destination's state and every attempt."""
    from relay.operations import events as event_ops

    detail = event_ops.event_detail(_ops(), event_id)
    if detail is None:
        raise click.ClickException(f"no event {event_id} (never received, expired or erased)")
    detail = redaction.redacted_record(detail)  # as the admin API answers it
    if as_json:
        click.echo(_json(detail))
        return
    payload = detail["payload"] if isinstance(detail["payload"], dict) else {}
    lead = payload.get("email") or payload.get("social_id") or payload.get("id") or "-"
    click.echo(f"event     {shown(event_id)}")
    click.echo(f"name      {shown(detail['name'] or '-')}   lead {shown(lead)}   "
               f"campaign {shown(payload.get('campaign_id', '-'))}")
    click.echo(f"received  {_when(detail['received_at'])}   duplicates {detail['duplicates']}")
    if not detail["destinations"]:
        click.echo("no delivery yet (not processed, or routed to no destination)")
    for name, entry in detail["destinations"].items():
        click.echo()
        head = (f"{shown(name)}: {shown(entry.get('status'))} after "
                f"{shown(entry.get('attempts', 0))} attempt(s)")
        click.secho(head, bold=True)
        if entry.get("next_attempt_at"):
            click.echo(f"  next attempt {_when(entry['next_attempt_at'])}")
        if "dead_letter" in entry:
            click.echo(f"  dead letter: {shown(entry['dead_letter'].get('reason'))}")
        for attempt in entry["attempts_log"]:
            status_code = attempt.get("status_code", "-")
            latency = attempt.get("latency_ms")
            click.echo(f"  #{attempt['attempt']} {_when(attempt.get('at'))} "
                       f"{shown(attempt['outcome']):<9} HTTP {shown(status_code)} "
                       f"{'' if latency is None else f'{latency:.0f} ms '}"
                       f"{shown(attempt.get('error') or '')}".rstrip())


@commands.group()
def dlq() -> None:
    """Dead letters: list and replay."""


@dlq.command("list")
@click.option("--destination", "-d", default=None, help="only this destination's")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
def dlq_list(destination: str | None, limit: int) -> None:
    """Dead letters, newest first."""
    from relay.operations import dead_letters as letters_ops

    letters = letters_ops.dead_letters_page(_ops(), destination, limit)
    if not letters:
        click.echo("no dead letters")
        return
    rows = [[shown(f"{d['event_id']}|{d['destination']}"), _when(d.get("dead_at")),
             shown(d.get("attempts", "-")), shown(d.get("status_code") or "-"),
             _cut(shown(d.get("reason") or "-"), 70)] for d in letters]
    _table(rows, ["id", "dead since", "attempts", "status", "reason"])


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--destination", "-d", default=None, help="every dead letter of a destination")
@click.option("--all", "everything", is_flag=True, help="every dead letter")
def dlq_replay(ids: tuple[str, ...], destination: str | None, everything: bool) -> None:
    """Queue dead letters for delivery again: IDS (EVENT_ID|DESTINATION, or an event id for all
    of its dead letters), --destination D, or --all."""
    if sum(bool(x) for x in (ids, destination, everything)) != 1:
        raise click.UsageError("give dead-letter IDS, --destination D or --all (one of them)")
    from relay.operations import dead_letters as letters_ops
    from relay.operations import destinations as destination_ops

    ops = _ops()
    if destination and not letters_ops.has_dead_letters(ops, destination):
        config = relay_config()
        configured = [d.name for d in config.destinations] if config else []
        if destination not in destination_ops.known_destinations(ops.redis, configured):
            raise click.ClickException(f"unknown destination '{shown(destination)}'")
    targets = letters_ops.replay_targets(ops, ids, destination, everything)
    missing: list[str] = []

    def note(target: Any, queued: bool) -> None:
        if not queued:
            missing.append(f"{target.event_id}|{target.destination}")

    with click.progressbar(targets, label="replaying", show_pos=True, file=sys.stderr) as bar:
        queued = letters_ops.replay_dead_letters(ops, bar, note)
    found = {f"{t.event_id}|{t.destination}" for t in targets} | {t.event_id for t in targets}
    unknown = sum(1 for given in dict.fromkeys(ids) if given not in found)
    click.echo(f"queued {queued} dead letter(s) for delivery"
               + (f"; {len(missing)} no longer dead (replayed already?)" if missing else "")
               + (f"; {unknown} of the ids given are not dead letters" if unknown else ""))
    if ids and not targets:
        raise click.ClickException("no such dead letter")


@commands.command()
@click.argument("destination")
@click.option("--reason", default="", help="shown in relay status and the admin API")
def pause(destination: str, reason: str) -> None:
    """Hold every delivery to DESTINATION until it is resumed."""
    from relay.operations import destinations as destination_ops

    client = _client()
    config = relay_config()
    configured = [d.name for d in config.destinations] if config else []
    if not destination.startswith("sub-") and destination not in (
            destination_ops.known_destinations(client, configured)):
        raise click.ClickException(f"unknown destination '{shown(destination)}'")
    destination_ops.pause(client, destination, reason)
    click.echo(f"{shown(destination)}: paused")


@commands.command()
@click.argument("destination")
def resume(destination: str) -> None:
    """Deliver to DESTINATION again; its held deliveries go first, oldest first."""
    from relay.operations import destinations as destination_ops

    client = _client()
    resumed = destination_ops.resume(client, destination)
    click.echo(f"{shown(destination)}: {resumed['state']}, "
               f"{resumed['released']} held deliveries released")


@commands.command()
@click.option("--email", required=True, help="the lead's email address")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def erase(email: str, yes: bool) -> None:
    """Erase every trace of a lead from the relay (GDPR); destinations keep theirs."""
    if not yes:
        click.confirm(f"Erase everything the relay holds about {shown(email)}?", abort=True)
    from relay.operations import leads as lead_ops

    report = lead_ops.erase(_ops(), email)
    removed = ", ".join(f"{k} {v}" for k, v in sorted(report.removed.items()) if v) or "nothing"
    click.echo(f"{len(report.event_ids)} event(s) of {shown(report.email)}; removed: {removed}")
