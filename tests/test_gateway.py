"""The gateway's own checks, without HTTP: critical models, readiness, run-time servers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from aiguillage.accounting.usage import UsageRecord
from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.backends.backend import Backend
from aiguillage.backends.http_client import UpstreamError
from aiguillage.catalog.config import ServerConfig, parse_config
from aiguillage.gateway import Gateway
from aiguillage.store.database import Database
from aiguillage.store.servers import ServerOverrides
from tests.fakes.engine import FakeEngine


async def _no_key(key_hash: str) -> ApiKeyRecord | None:
    return None


async def _drop(rows: Sequence[UsageRecord]) -> None:
    return None


def test_a_critical_model_below_its_minimum_is_reported_degraded() -> None:
    config = parse_config(
        {
            "models": [
                {
                    "name": "vital",
                    "critical": True,
                    "min_healthy_backends": 2,
                    "servers": [{"url": "http://127.0.0.1:9"}, {"url": "http://127.0.0.1:10"}],
                },
                {"name": "chat", "servers": [{"url": "http://127.0.0.1:9"}]},
            ]
        }
    )
    gateway = Gateway(config, key_lookup=_no_key, usage_sink=_drop)
    assert gateway.critical_degraded() == {"vital": False}  # only critical models are watched
    vital = gateway.catalog.resolve("vital")
    assert vital is not None
    vital.backends[1].healthy = False
    assert gateway.critical_degraded() == {"vital": True}
    assert gateway.ready() == {"vital": True, "chat": True}  # still served, but under minimum
    vital.backends[0].healthy = False
    assert gateway.ready() == {"vital": False, "chat": False}


async def _health_status(backend: Backend) -> int:
    response = await backend.pool.request("GET", backend.root_path("/health"), backend.auth_headers)
    await response.read()
    response.release()  # back to the pool: a keep-alive connection stays open
    return response.status


async def test_a_server_removed_at_run_time_has_its_pool_closed_and_comes_back_fresh(
    tmp_path: Path, fake_engine: FakeEngine
) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    await database.upgrade()
    config = parse_config(
        {"models": [{"name": "chat", "servers": [{"url": fake_engine.url("a")}]}]}
    )
    gateway = Gateway(
        config, key_lookup=_no_key, usage_sink=_drop, servers=ServerOverrides(database)
    )
    second = ServerConfig(url=fake_engine.url("b"))  # type: ignore[arg-type]
    try:
        await gateway.add_server("chat", second)
        added = gateway.catalog.backends()[1]
        assert await _health_status(added) == 200

        await gateway.remove_server("chat", added.name)
        assert added not in gateway.catalog.backends()
        with pytest.raises(UpstreamError):  # its pool is closed, not left open until shutdown
            await _health_status(added)

        await gateway.add_server("chat", second)
        again = gateway.catalog.backends()[1]
        assert again is not added  # a fresh backend, with a pool of its own
        assert await _health_status(again) == 200
    finally:
        for backend in gateway.catalog.backends():
            await backend.close()
        await database.dispose()
