"""Three `aiguillage serve` processes sharing Redis and PostgreSQL behave as one gateway.

They need the local Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432), which
.ci/run starts; each test skips, saying why, when one does not answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from aiguillage.backends.local_engine import free_port
from tests.fakes.engine import FakeEngine
from tests.store import pg

AIGUILLAGE = [sys.executable, "-m", "aiguillage.cli"]
REDIS_URL = "redis://127.0.0.1:6379/0"
CAP = 4  # the shared backend's max_concurrency
LEASE_TTL_S = 3.0


@dataclass
class Cluster:
    urls: list[str]
    processes: list[subprocess.Popen[bytes]]
    keys: dict[str, str]
    engine: FakeEngine


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    fake = FakeEngine().start()  # its own, so that its concurrency record is this test's
    yield fake
    fake.stop()


def _redis_prefix() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        pytest.skip(f"no Redis answers on 127.0.0.1:6379 (.ci/run starts one): {error}")
    prefix = f"replicas-{uuid.uuid4().hex[:10]}"
    yield prefix
    keys = list(client.scan_iter(match=f"{{{prefix}}}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def cluster(tmp_path: Path, engine: FakeEngine) -> Iterator[Cluster]:
    prefix_source = _redis_prefix()
    prefix = next(prefix_source)
    dsn = pg.create_database()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": pg.sqlalchemy_url(dsn),
                "scheduler_url": REDIS_URL,
                "scheduler_prefix": prefix,
                "scheduler_lease_ttl_s": LEASE_TTL_S,
                "models": [
                    {
                        "name": "fast",
                        "queue_timeout_s": 120,
                        "servers": [{"url": engine.url("slow-0.005"), "max_concurrency": CAP}],
                    },
                    {
                        "name": "one-slot",
                        "queue_timeout_s": 120,
                        "servers": [{"url": engine.url("slow-1.0"), "max_concurrency": 1}],
                    },
                ],
            }
        )
    )
    keys = {}
    for name, priority in (("low", 1), ("high", 10)):
        created = subprocess.run(
            [*AIGUILLAGE, "keys", "create", "--name", name, "--org", name, "--priority",
             str(priority), "--threshold", "100000", "--json", "--config", str(config)],
            check=True, capture_output=True,
        )  # fmt: skip
        keys[name] = json.loads(created.stdout)["key"]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    processes, urls = [], []
    for _ in range(3):
        port = free_port()
        command = [*AIGUILLAGE, "serve", "--config", str(config), "--port", str(port)]
        processes.append(
            subprocess.Popen(
                [*command, "--log-level", "warning"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, process in zip(urls, processes, strict=True):
            _wait_ready(url, process)
        yield Cluster(urls, processes, keys, engine)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        pg.drop_database(dsn)
        next(prefix_source, None)


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"a replica exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not become ready")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        timeout=120, limits=httpx.Limits(max_connections=200, max_keepalive_connections=200)
    ) as http:
        yield http


async def _chat(http: httpx.AsyncClient, url: str, key: str, model: str) -> httpx.Response:
    return await http.post(
        f"{url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )


async def test_a_backend_cap_holds_across_ten_thousand_requests_through_random_replicas(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    total, clients = 10_000, 48
    statuses: list[int] = []
    left = iter(range(total))

    async def user() -> None:
        for _ in left:
            url = random.choice(cluster.urls)
            response = await _chat(client, url, cluster.keys["low"], "fast")
            statuses.append(response.status_code)

    await asyncio.gather(*(user() for _ in range(clients)))
    assert len(statuses) == total
    assert set(statuses) == {200}
    assert cluster.engine.log.most_in_flight == CAP  # reached, never passed


async def test_a_high_priority_request_overtakes_low_ones_waiting_at_another_replica(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    first, second, third = cluster.urls
    finished: list[str] = []

    async def send(url: str, key: str, name: str) -> None:
        response = await _chat(client, url, cluster.keys[key], "one-slot")
        assert response.status_code == 200
        finished.append(name)

    tasks = [asyncio.create_task(send(first, "low", "holder"))]
    await asyncio.sleep(0.3)  # it holds the only slot for 1 s
    for i in range(3):
        tasks.append(asyncio.create_task(send(second, "low", f"low{i}")))
        await asyncio.sleep(0.1)
    tasks.append(asyncio.create_task(send(third, "high", "high")))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    assert finished == ["holder", "high", "low0", "low1", "low2"]


async def test_a_killed_replicas_capacity_comes_back_within_ten_seconds(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    doomed, survivor, _ = cluster.urls
    holder = asyncio.create_task(_chat(client, doomed, cluster.keys["low"], "one-slot"))
    await asyncio.sleep(0.3)  # its replica holds the only slot's lease
    cluster.processes[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    response = await asyncio.wait_for(
        _chat(client, survivor, cluster.keys["low"], "one-slot"), timeout=30
    )
    served_after = time.monotonic() - killed_at
    assert response.status_code == 200
    assert served_after < 10 + 1.0  # the lease expired (TTL 3 s), then 1 s of answer
    with pytest.raises(httpx.TransportError):
        await holder  # the killed replica's own client lost its connection
