"""Three gateway processes sharing Redis and PostgreSQL behave as one gateway.

These need the Redis scheduler (`scheduler_url`); each test runs its own
redis-server and PostgreSQL database, and skips, saying why, where either
cannot be had.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.engine import FakeEngine
from tests.scaleout.cluster import RedisServer, Replicas
from tests.store.pg import create_database, drop_database

CAP = 8
REQUESTS = 10_000
CLIENTS = 200
KILLED_CAPACITY_BACK_S = 10.0
CHAT = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    """An engine of the test's own, so that its concurrency counters start at zero."""
    started = FakeEngine().start()
    yield started
    started.stop()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Settings that point at a fresh PostgreSQL database and a private redis-server."""
    redis = RedisServer(tmp_path).start()
    dsn = create_database()
    try:
        yield {
            "database_url": dsn.replace("postgresql://", "postgresql+asyncpg://", 1),
            "scheduler_url": redis.url,
            "key_cache_ttl_s": 600,
            "scheduler_lease_ttl_s": 4,
            "_redis": redis,
        }
    finally:
        redis.kill()
        drop_database(dsn)


def _replicas(shared: dict[str, Any], tmp_path: Path, **model: Any) -> Replicas:
    settings = {key: value for key, value in shared.items() if not key.startswith("_")}
    settings["models"] = [{"name": "chat", "queue_timeout_s": 60, **model}]
    return Replicas(settings, tmp_path)


async def _chat(
    client: httpx.AsyncClient, url: str, key: str, timeout_s: float = 60
) -> httpx.Response:
    return await client.post(
        f"{url}/v1/chat/completions",
        json={"model": "chat", "messages": CHAT},
        headers={"authorization": f"Bearer {key}"},
        timeout=timeout_s,
    )


async def _engine_saw(engine: FakeEngine, requests: int, within_s: float) -> None:
    """Wait until the engine has received `requests` requests; fail after `within_s`."""
    for _ in range(int(within_s / 0.05)):
        if len(engine.log.requests) >= requests:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the engine saw {len(engine.log.requests)} requests, not {requests}")


def test_a_backend_cap_holds_across_replicas_over_10000_requests(
    shared: dict[str, Any], engine: FakeEngine, tmp_path: Path
) -> None:
    replicas = _replicas(
        shared, tmp_path, servers=[{"url": engine.url("slow-0.005"), "max_concurrency": CAP}]
    )
    try:
        key = replicas.create_key(threshold=str(REQUESTS))
        statuses: dict[int, int] = {}

        async def client(share: int) -> None:
            async with httpx.AsyncClient() as http:
                for _ in range(share):
                    response = await _chat(http, random.choice(replicas.urls), key)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        async def load() -> None:
            await asyncio.gather(*(client(REQUESTS // CLIENTS) for _ in range(CLIENTS)))

        asyncio.run(load())
        assert statuses == {200: REQUESTS}
        assert engine.log.max_in_flight <= CAP
        assert engine.log.max_in_flight == CAP  # the cap was reached, so it was tested
    finally:
        replicas.stop()


def test_a_high_priority_request_at_one_replica_overtakes_low_ones_waiting_at_others(
    shared: dict[str, Any], engine: FakeEngine, tmp_path: Path
) -> None:
    replicas = _replicas(
        shared, tmp_path, servers=[{"url": engine.url("slow-0.3"), "max_concurrency": 1}]
    )
    try:
        low = replicas.create_key(priority="0")
        high = replicas.create_key(priority="100")
        done: list[str] = []

        async def request(url: str, key: str, label: str) -> None:
            async with httpx.AsyncClient() as http:
                response = await _chat(http, url, key)
                assert response.status_code == 200
                done.append(label)

        async def scenario() -> None:
            lows = [
                asyncio.create_task(request(replicas.urls[i % 2], low, f"low-{i}"))
                for i in range(6)
            ]
            await asyncio.sleep(0.5)  # the first low runs, the other five wait at replicas 0, 1
            await request(replicas.urls[2], high, "high")
            await asyncio.gather(*lows)

        asyncio.run(scenario())
        # at most the low running when "high" arrived and the one granted next finish first
        assert done.index("high") <= 2, done
    finally:
        replicas.stop()


def test_kill_9_of_a_replica_holding_leases_gives_the_capacity_back_within_10s(
    shared: dict[str, Any], engine: FakeEngine, tmp_path: Path
) -> None:
    replicas = _replicas(
        shared, tmp_path, servers=[{"url": engine.url("slow-60"), "max_concurrency": 2}]
    )
    try:
        key = replicas.create_key()

        async def scenario() -> float:
            async with httpx.AsyncClient() as http:
                held = [asyncio.create_task(_chat(http, replicas.urls[0], key)) for _ in range(2)]
                await _engine_saw(engine, 2, within_s=10)  # replica 0 holds both slots
                waiting = asyncio.create_task(_chat(http, replicas.urls[1], key))
                await asyncio.sleep(1)
                assert len(engine.log.requests) == 2  # the cap holds: replica 1 waits
                replicas.kill(0)
                killed_at = time.monotonic()
                await _engine_saw(engine, 3, within_s=KILLED_CAPACITY_BACK_S)
                elapsed = time.monotonic() - killed_at
                for task in (*held, waiting):
                    task.cancel()
                await asyncio.gather(*held, waiting, return_exceptions=True)
                return elapsed

        assert asyncio.run(scenario()) < KILLED_CAPACITY_BACK_S
    finally:
        replicas.stop()


def test_redis_restarted_under_load_gives_fast_503s_then_recovers(
    shared: dict[str, Any], engine: FakeEngine, tmp_path: Path
) -> None:
    redis: RedisServer = shared["_redis"]
    replicas = _replicas(
        shared, tmp_path, servers=[{"url": engine.url("slow-0.01"), "max_concurrency": 4}]
    )
    try:
        key = replicas.create_key()

        async def burst(http: httpx.AsyncClient) -> list[tuple[int, float]]:
            async def one(url: str) -> tuple[int, float]:
                started = time.monotonic()
                response = await _chat(http, url, key, timeout_s=10)
                return response.status_code, time.monotonic() - started

            return await asyncio.gather(*(one(url) for url in replicas.urls * 3))

        async def scenario() -> None:
            async with httpx.AsyncClient() as http:
                assert {status for status, _ in await burst(http)} == {200}
                redis.kill()
                for status, took_s in await burst(http):
                    assert status in (200, 503)
                    assert status == 200 or took_s < 1.0  # a 503 comes fast, not a hang
                redis.start()
                deadline = time.monotonic() + 10
                while {status for status, _ in await burst(http)} != {200}:
                    assert time.monotonic() < deadline, "no recovery 10 s after Redis came back"
                    await asyncio.sleep(0.2)

        asyncio.run(scenario())
    finally:
        replicas.stop()
