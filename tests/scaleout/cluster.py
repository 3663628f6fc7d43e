"""Several `aiguillage serve` processes on loopback sharing PostgreSQL and Redis.

Each test gets its own PostgreSQL database and its own redis-server (on a
free port, in a temp dir), so that it may kill and restart Redis and never
touches the shared services. Replicas are real processes, so `kill -9` means
what it says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiguillage.backends.local_engine import free_port
from tests.harness import wait_until_answering

AIGUILLAGE = [sys.executable, "-m", "aiguillage.cli"]


class RedisServer:
    """A private redis-server: no persistence, killable and restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self._binary = binary
        self._workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self._process = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True
            ).stdout.strip()
            != b"PONG"
        ):
            if time.monotonic() > deadline:
                pytest.skip(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)


class Replicas:
    """`count` gateway processes on one configuration; the caller stops them."""

    def __init__(self, settings: dict[str, Any], workdir: Path, count: int = 3) -> None:
        self.config = workdir / "config.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.urls: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        for index in range(count):
            port = free_port()
            log = (workdir / f"replica-{index}.log").open("wb")
            self.processes.append(
                subprocess.Popen(
                    [
                        *AIGUILLAGE,
                        "serve",
                        "--config",
                        str(self.config),
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
            self.urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(self.urls, self.processes, strict=True):
            wait_until_answering(url, process, path="/healthz", timeout_s=60)

    def create_key(self, **options: str) -> str:
        """A key made with the CLI, as an operator would; returns its secret."""
        arguments = [f"--{name}={value}" for name, value in options.items()]
        created = subprocess.run(
            [
                *AIGUILLAGE,
                "keys",
                "create",
                "--name",
                "scaleout",
                "--org",
                "o",
                "--json",
                "--config",
                str(self.config),
                *arguments,
            ],
            check=True,
            capture_output=True,
        )
        return str(json.loads(created.stdout)["key"])

    def kill(self, index: int) -> None:
        """`kill -9`: no shutdown, no lease given back."""
        os.kill(self.processes[index].pid, signal.SIGKILL)
        self.processes[index].wait(10)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
