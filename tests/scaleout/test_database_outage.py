"""PostgreSQL away for 30 s: the gateway keeps serving known keys and loses no usage row.

The shared PostgreSQL is never stopped: the gateway reaches it through a TCP proxy this
test owns, and "PostgreSQL down" is the proxy refusing and dropping every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.engine import FakeEngine
from tests.harness import RunningGateway, run_sync
from tests.store import pg

OUTAGE_S = 30.0


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL; `cut()` drops everything until `restore()`."""

    def __init__(self, target_port: int = 5432) -> None:
        self._target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def start(self) -> CuttableProxy:
        self._thread.start()
        self._run(self._listen())
        return self

    def cut(self) -> None:
        self._run(self._cut())

    def restore(self) -> None:
        self._run(self._listen())

    def stop(self) -> None:
        self._run(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture
def database() -> Iterator[str]:
    dsn = pg.create_database()  # skips, saying why, when PostgreSQL does not answer
    yield dsn
    pg.drop_database(dsn)


@pytest.fixture
def proxy() -> Iterator[CuttableProxy]:
    running = CuttableProxy().start()
    yield running
    running.stop()


def test_usage_rows_written_during_a_30_s_outage_are_all_kept(
    tmp_path: Path, fake_engine: FakeEngine, database: str, proxy: CuttableProxy
) -> None:
    name = database.rsplit("/", 1)[1]
    through_proxy = f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{name}"
    settings = {
        "key_cache_ttl_s": 2,  # expires during the outage: the stale entry must answer
        "ledger_flush_interval_s": 0.5,
        "models": [{"name": "fake", "servers": [{"url": fake_engine.url("ok")}]}],
    }
    gateway = RunningGateway(settings, tmp_path, through_proxy).start()
    try:
        secret, record = gateway.create_key(name="outage", organisation="o")
        sent = 0

        def send(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                response = httpx.post(
                    f"{gateway.url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {secret}"},
                    json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
                    timeout=10,
                )
                assert response.status_code == 200, response.text
                sent += 1

        send(10)
        proxy.cut()
        ends = time.monotonic() + OUTAGE_S
        while time.monotonic() < ends:  # half a minute of traffic with no database
            send(5)
            time.sleep(0.25)
        count = "SELECT count(*) AS n FROM usage WHERE key_id = $1"
        during = run_sync(pg.fetch(database, count, record.id))[0]["n"]
        assert during <= 10 < sent  # the gateway could write nothing while cut off
        proxy.restore()
        rows = gateway.usage_rows(record.id, expected=sent, timeout_s=60)
        assert len(rows) == sent
        assert run_sync(pg.fetch(database, count, record.id)) == [{"n": sent}]
    finally:
        gateway.stop()
