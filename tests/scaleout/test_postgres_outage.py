"""PostgreSQL away for 30 s: requests keep being served, their usage rows wait and all land.

The gateway reaches PostgreSQL through a proxy the test controls (the shared
server is never stopped). Keys are in the gateway's cache, so requests keep
working; the ledger buffers their rows and writes every one once the database
is back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.engine import FakeEngine
from tests.harness import RunningGateway
from tests.scaleout.tcp_proxy import TcpProxy
from tests.store.pg import create_database, drop_database, fetch, run_in_thread

OUTAGE_S = 30.0
REQUESTS_PER_S = 10
CHAT = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def proxied_postgres() -> Iterator[tuple[str, TcpProxy]]:
    dsn = create_database()
    proxy = TcpProxy("127.0.0.1", 5432).start()
    try:
        yield dsn, proxy
    finally:
        proxy.stop()
        drop_database(dsn)


def _usage_rows(dsn: str, key_id: int) -> int:
    rows = run_in_thread(fetch(dsn, "SELECT count(*) AS n FROM usage WHERE key_id = $1", key_id))
    return int(rows[0]["n"])


def test_usage_rows_written_during_a_30s_outage_are_all_written_afterwards(
    proxied_postgres: tuple[str, TcpProxy], fake_engine: FakeEngine, tmp_path: Path
) -> None:
    dsn, proxy = proxied_postgres
    host_and_db = dsn.rsplit("@", 1)[1].split("/", 1)[1]
    settings = {
        "database_url": f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{host_and_db}",
        "key_cache_ttl_s": 600,
        "ledger_flush_interval_s": 0.2,
        "models": [{"name": "chat", "servers": [{"url": fake_engine.url("outage")}]}],
    }
    gateway = RunningGateway(settings, tmp_path).start()
    try:
        key, record = gateway.create_key()
        admin = {"authorization": f"Bearer {gateway.create_key(is_admin=True)[0]}"}
        headers = {"authorization": f"Bearer {key}"}
        body = {"model": "chat", "messages": CHAT}
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=10) as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert client.get("/admin/dispatch", headers=admin).status_code == 200  # cached
            deadline = time.monotonic() + 10
            while _usage_rows(dsn, record.id) < 1:  # the key is cached, the ledger works
                assert time.monotonic() < deadline
                time.sleep(0.1)

            proxy.cut()
            sent = 0
            outage_ends = time.monotonic() + OUTAGE_S
            while time.monotonic() < outage_ends:
                response = client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                sent += 1
                time.sleep(1 / REQUESTS_PER_S)
            assert _usage_rows(dsn, record.id) == 1  # nothing could be written meanwhile
            # a route that needs the database answers a retryable 503, not a 500
            added = client.post(
                "/admin/models/chat/servers",
                json={"url": fake_engine.url("late")},
                headers=admin,
            )
            assert added.status_code == 503, added.text
            assert added.json()["error"]["code"] == "store_unavailable"
            assert added.headers["retry-after"]
            proxy.restore()

        deadline = time.monotonic() + 20
        while (written := _usage_rows(dsn, record.id)) < 1 + sent:
            assert time.monotonic() < deadline, f"{written - 1} of {sent} rows written"
            time.sleep(0.2)
        time.sleep(0.5)
        assert _usage_rows(dsn, record.id) == 1 + sent  # every row once, none twice
    finally:
        gateway.stop()
