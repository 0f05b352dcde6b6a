"""A relay deployment of real processes, as the integration tests run it: a config file, the
environment every relay process gets (a real ``redis-server``'s URL), and ``relay worker``
processes started and killed at will. The ``deployment`` fixture (tests/integration/conftest.py)
builds one per test.

::

    def test_delivery(deployment: RelayDeployment, sink: Sink) -> None:
        deployment.configure({"destinations": [{"name": "crm", "type": "webhook",
                                                "url": f"{sink.url}/crm"}]})
        deployment.start_worker()
        deployment.web_client().post("/hooks/kickofflabs", json=sample("new_signup"))
        wait_for(lambda: sink.requests("/crm"))
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT
from tests.support.helpers import wait_for


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
