"""What both benches share: the machine, the embedded Redis, the servers' command lines, the
sinks, child processes and tables.

Every server runs on 127.0.0.1 only. Child processes are started in their own session and
stopped by their own pid (SIGTERM, then SIGKILL after a bound), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any
from unittest import mock

import psutil
import redis

from relay.cli.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


# -- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(client: redis.Redis | None = None) -> dict[str, str]:
    info = {
        "cores": str(os.cpu_count()),
        "cpu": cpu_model(),
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    if client is not None:
        server = client.info("server")
        persistence = client.config_get("appendfsync")
        info["redis"] = (f"{server['redis_version']} (appendonly "
                         f"{client.config_get('appendonly')['appendonly']}, appendfsync "
                         f"{persistence['appendfsync']})")
    return info


def print_machine(info: Mapping[str, str]) -> None:
    print("machine: " + ", ".join(f"{key} {value}" for key, value in info.items()))


# -- Redis -------------------------------------------------------------------------------------


def start_redis(data_dir: Path) -> tuple[EmbeddedRedis, redis.Redis]:
    """The project's embedded Redis (AOF everysec, noeviction), as ``relay dev`` runs it."""
    server = EmbeddedRedis(data_dir).start()
    return server, redis.Redis.from_url(server.url)


def reset_redis(client: redis.Redis, timeout: float = 60.0) -> None:
    """Empty Redis between runs and shrink its AOF, so neither memory nor disk fills up and
    no run pays for the previous one's data."""
    client.flushall()
    deadline = time.monotonic() + timeout
    while client.info("persistence").get("aof_rewrite_in_progress"):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    with contextlib.suppress(redis.ResponseError):  # one is already scheduled
        client.bgrewriteaof()
    while time.monotonic() < deadline:
        persistence = client.info("persistence")
        if not (persistence.get("aof_rewrite_in_progress")
                or persistence.get("aof_rewrite_scheduled")):
            break
        time.sleep(0.05)


# -- the relay's own command lines -------------------------------------------------------------


class _Captured(Exception):
    pass


def relay_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """The argv ``relay <args>`` would exec and the environment variables it sets for the
    exec'd program (``relay worker --max-in-flight N`` sets ``RELAY_MAX_IN_FLIGHT``), captured
    instead of run: the benches start exactly the documented production command (``relay
    web`` / ``relay worker``) with its defaults. This process's environment is left as it was."""
    from relay import cli

    captured: list[tuple[list[str], dict[str, str]]] = []

    def fake_execv(path: str, argv: Sequence[str]) -> None:
        changed = {k: v for k, v in os.environ.items() if before.get(k) != v}
        captured.append((list(argv), changed))
        raise _Captured

    with mock.patch.dict(os.environ):
        before = dict(os.environ)
        with mock.patch.object(cli.os, "execv", fake_execv), contextlib.suppress(_Captured):
            cli.main.main(args=list(args), prog_name="relay", standalone_mode=False)
    if not captured:
        raise RuntimeError(f"relay {' '.join(args)} did not exec anything")
    return captured[0]


def relay_argv(*args: str) -> list[str]:
    """The argv of :func:`relay_command` alone."""
    return relay_command(*args)[0]


def web_argv(app: str, port: int, workers: int | None = None,
             threads: int | None = None) -> list[str]:
    """``relay web``'s gunicorn command, serving ``app`` (so a baseline gets identical flags)."""
    args = ["web", "--host", HOST, "--port", str(port)]
    if workers:
        args += ["--workers", str(workers)]
    if threads:
        args += ["--threads", str(threads)]
    argv = relay_argv(*args)
    return [app if part == "relay.wsgi:app" else part for part in argv]


def argv_option(argv: Sequence[str], name: str) -> str:
    return argv[list(argv).index(name) + 1]


# -- child processes ---------------------------------------------------------------------------


def spawn(argv: Sequence[str], env: Mapping[str, str] | None = None,
          log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the child)
    try:
        return subprocess.Popen(list(argv), cwd=ROOT, env={**os.environ, **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def stop(process: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGTERM the child (and, for gunicorn/celery, its own children through it)."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        for child in _children(process.pid):
            child.kill()
        process.kill()
        process.wait(10)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def process_tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its live descendants."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and all its live descendants."""
    total = 0.0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class CpuWatch:
    """How much CPU the rest of the machine used while a run went on.

    The benches share the machine with whatever else runs on it; the CPU used by processes that
    are not this bench (nor its children: servers, Redis, wrk, sinks, reaped or alive) is printed
    with each run, because a busy neighbour changes the figures more than most tuning does."""

    def __init__(self) -> None:
        self.started = 0.0
        self.busy = 0.0
        self.steal = 0.0
        self.ours = 0.0
        self.wall = 0.0

    @staticmethod
    def _busy() -> tuple[float, float]:
        """(CPU time not idle, of which stolen by the hypervisor), summed over the cores."""
        times = psutil.cpu_times()
        steal = float(getattr(times, "steal", 0.0))
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0)), steal

    @staticmethod
    def _ours() -> float:
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return process_tree_cpu(os.getpid()) + reaped.ru_utime + reaped.ru_stime

    def __enter__(self) -> CpuWatch:
        self.started = time.monotonic()
        self.busy, self.steal = self._busy()
        self.ours = self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.started
        busy, steal = self._busy()
        self.busy, self.steal = busy - self.busy, steal - self.steal
        self.ours = self._ours() - self.ours

    @property
    def foreign_cores(self) -> float:
        """Cores used on average by other processes during the run."""
        return max(0.0, self.busy - self.steal - self.ours) / self.wall if self.wall else 0.0

    @property
    def steal_cores(self) -> float:
        """Cores' worth of time the hypervisor gave to other guests while we wanted it."""
        return self.steal / self.wall if self.wall else 0.0

    def note(self) -> str:
        noisy = max(self.foreign_cores, self.steal_cores) > NOISY_CORES
        return (f"other processes used {self.foreign_cores:.2f} cores, steal "
                f"{self.steal_cores:.2f}" + (" (NOISY: figures unreliable)" if noisy else ""))


NOISY_CORES = 0.15


def wait_port(port: int, process: subprocess.Popen[bytes] | None = None,
              timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout:g}s")


# -- payloads --------------------------------------------------------------------------------


def sample_payload(event: str = "new_signup") -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(
        resources.files("relay").joinpath("samples", f"{event}.json").read_text())
    payload["__event"] = event
    return payload


def write_config(path: Path, token: str | None,
                 destinations: Sequence[tuple[str, str] | tuple[str, str, Mapping[str, object]]],
                 ) -> Path:
    """A relay YAML: one kickofflabs source and a JSON webhook per (name, url), with the
    optional third item's keys added to the destination (``{"concurrency": 500}``)."""
    lines = ["sources:", "  kickofflabs:"]
    lines.append(f"    token: {token}" if token else "    token: null")
    lines.append("destinations:")
    for name, url, *more in destinations:
        lines += [f"  - name: {name}", "    type: webhook", f"    url: {url}",
                  '    events: ["*"]', "    timeout: 10s"]
        for key, value in (more[0] if more else {}).items():
            lines.append(f"    {key}: {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


# -- sinks -----------------------------------------------------------------------------------

_NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  client_body_buffer_size 64k;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  server {{
    listen {host}:{port};
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None)


def start_sink(workdir: Path, delay: float = 0.0, prefer_nginx: bool = True,
               fail: str = "", fail_first: int = 0) -> tuple[subprocess.Popen[bytes], int, str]:
    """A loopback HTTP server answering 200 to every POST: nginx when installed and no delay
    is asked for (a fast receiver), else the asyncio sink in :mod:`bench.sinks` (which answers
    503 to a body containing ``fail``, and to the first request of one body in
    ``fail_first``, when given)."""
    port = free_port()
    binary = (nginx_binary() if prefer_nginx and delay == 0 and not fail and not fail_first
              else None)
    if binary:
        conf_dir = workdir / f"nginx-{port}"
        conf_dir.mkdir(parents=True, exist_ok=True)
        conf = conf_dir / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(dir=conf_dir, host=HOST, port=port))
        process = spawn([binary, "-c", str(conf), "-p", str(conf_dir)],
                        log=conf_dir / "stdout.log")
        what = "nginx (1 worker process)"
    else:
        process = spawn([sys.executable, "-m", "bench.sinks", "--port", str(port),
                         "--delay", str(delay), *(["--fail", fail] if fail else []),
                         *(["--fail-first", str(fail_first)] if fail_first else [])],
                        log=workdir / f"sink-{port}.log")
        what = ("Python asyncio sink" + (f", {delay * 1000:g} ms per answer" if delay else "")
                + ("" if delay or not prefer_nginx else " (nginx not installed)"))
    wait_port(port, process)
    return process, port, what


# -- output ------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into the README)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.2f} ms"  # NaN → "-"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
