"""Running a real gateway (uvicorn, real database) on loopback for tests, on its own thread."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
import yaml

from aiguillage.api.app import AiguillageApp
from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.catalog.config import parse_config
from aiguillage.store.database import Database
from aiguillage.store.keys import KeyRepository
from aiguillage.store.usage import UsageRepository
from tests.fakes.engine import FakeEngine

T = TypeVar("T")


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh loop in another thread (safe inside async tests)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class RunningGateway:
    def __init__(
        self, settings: dict[str, Any], workdir: Path, database_url: str | None = None
    ) -> None:
        self.database_url = (
            database_url
            or settings.get("database_url")
            or f"sqlite+aiosqlite:///{workdir / 'gateway.db'}"
        )
        settings = {"database_url": self.database_url, **settings}
        (workdir / "config.yaml").write_text(yaml.safe_dump(settings))
        self.config_path = workdir / "config.yaml"
        self.config = parse_config(settings, str(self.config_path))
        self.app = AiguillageApp(self.config)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                lifespan="on",
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=5,
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def start(self) -> RunningGateway:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(20)
        self._socket.close()

    def create_key(self, **options: Any) -> tuple[str, ApiKeyRecord]:
        options.setdefault("name", "test")
        options.setdefault("organisation", "test-org")

        async def create() -> tuple[str, ApiKeyRecord]:
            database = Database(self.database_url)
            try:
                await database.upgrade()
                return await KeyRepository(database).create(**options)
            finally:
                await database.dispose()

        return run_sync(create())

    def revoke_key(self, key_id: int) -> None:
        async def revoke() -> None:
            database = Database(self.database_url)
            try:
                await KeyRepository(database).revoke(key_id)
            finally:
                await database.dispose()

        run_sync(revoke())

    def usage_rows(self, key_id: int, expected: int, timeout_s: float = 10.0) -> list[Any]:
        """A key's ledger rows, once at least `expected` of them are written (or the timeout)."""

        async def rows() -> list[Any]:
            database = Database(self.database_url)
            try:
                found = await UsageRepository(database).recent(100_000)
                return [row for row in found if row.key_id == key_id]
            finally:
                await database.dispose()

        deadline = time.monotonic() + timeout_s
        found = run_sync(rows())
        while len(found) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
            found = run_sync(rows())
        return found


def engine_modes_of_next_requests(
    engine: FakeEngine, gateway: RunningGateway, key: str, count: int, model: str = "chat"
) -> set[str]:
    """Send `count` chat requests through the gateway; the fake-engine modes that served them."""
    before = len(engine.log.requests)
    for _ in range(count):
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hello"}]},
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
    return {seen.mode for seen in engine.log.requests[before:]}


def wait_until_answering(
    url: str, process: subprocess.Popen[bytes], path: str = "/readyz", timeout_s: float = 90
) -> None:
    """Wait for a gateway process to answer 200 on `path`; fail at once if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the process at {url} exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer on {path}")
