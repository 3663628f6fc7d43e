"""The shared scheduler on a real Redis: several instances (replicas) on one Redis.

Each test uses its own key prefix on the local Redis (127.0.0.1:6379) and removes its
keys afterwards; the tests skip, saying why, when no Redis answers there. The outage test
runs its own redis-server on a free port, so that it can stop it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as redis

from aiguillage.backends.local_engine import free_port
from aiguillage.catalog.catalog import Catalog, ModelEntry
from aiguillage.catalog.config import parse_config
from aiguillage.dispatch.dispatcher import QueueFull, QueueTimeout, SchedulerUnavailable
from aiguillage.dispatch.redis_scheduler import RedisScheduler
from aiguillage.dispatch.tickets import Lease, Ticket

REDIS_URL = "redis://127.0.0.1:6379/0"

Replica = tuple[RedisScheduler, ModelEntry]
MakeReplica = Callable[..., Awaitable[Replica]]


async def _redis_answers(url: str) -> bool:
    client = redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


@pytest.fixture
async def replicas() -> AsyncIterator[MakeReplica]:
    """Make scheduler instances sharing one key prefix, as gateway replicas would."""
    if not await _redis_answers(REDIS_URL):
        pytest.skip("no Redis answers on 127.0.0.1:6379 (.ci/run starts one)")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    made: list[RedisScheduler] = []

    async def make(*servers: dict[str, Any], url: str = REDIS_URL, **model: Any) -> Replica:
        config = parse_config(
            {
                "models": [
                    {
                        "name": "m",
                        "servers": [{"max_concurrency": 1, **server} for server in servers],
                        **model,
                    }
                ]
            }
        )
        catalog = Catalog.from_config(config)
        scheduler = RedisScheduler(catalog, url, prefix=prefix, lease_ttl_s=1.5)
        await scheduler.start()
        made.append(scheduler)
        entry = catalog.resolve("m")
        assert entry is not None
        return scheduler, entry

    yield make
    for scheduler in made:
        await scheduler.close()
    client = redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=f"{{{prefix}}}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def ticket(entry: ModelEntry, org: str = "org", priority: int = 0, **extra: Any) -> Ticket:
    return Ticket(model=entry, organisation=org, priority=priority, **extra)


async def one_by_one(coroutines: list[Awaitable[None]]) -> list[asyncio.Task[None]]:
    """Start each request after the previous one reached the queue (its arrival order)."""
    tasks = []
    for coroutine in coroutines:
        tasks.append(asyncio.ensure_future(coroutine))
        await asyncio.sleep(0.03)
    return tasks


SERVER = {"url": "http://a.example:8000"}


async def test_a_backend_cap_holds_across_replicas_under_concurrent_acquires(
    replicas: MakeReplica,
) -> None:
    one, entry_one = await replicas({**SERVER, "max_concurrency": 3}, queue_timeout_s=30)
    two, entry_two = await replicas({**SERVER, "max_concurrency": 3}, queue_timeout_s=30)
    backend = entry_one.backends[0]
    holding = 0
    most = 0

    async def request(scheduler: RedisScheduler, entry: ModelEntry) -> None:
        nonlocal holding, most
        lease = await scheduler.acquire(ticket(entry))
        holding += 1
        most = max(most, holding)
        await asyncio.sleep(0.005)
        holding -= 1
        scheduler.release(lease, ok=True)

    await asyncio.gather(
        *(request(*((one, entry_one) if i % 2 else (two, entry_two))) for i in range(120))
    )
    assert most == 3  # the cap was reached, never passed
    for _ in range(100):  # releases reach Redis in the background
        if await one.in_flight(backend) == 0:
            break
        await asyncio.sleep(0.01)
    assert await one.in_flight(backend) == 0


async def test_a_burst_of_requests_shares_a_bounded_set_of_connections(
    replicas: MakeReplica,
) -> None:
    """More simultaneous requests than Redis connections: they wait for one, none fails."""
    one, entry = await replicas({**SERVER, "max_concurrency": 10_000})

    async def request() -> None:
        lease = await one.acquire(ticket(entry))
        await asyncio.sleep(0.001)
        one.release(lease, ok=True)

    await asyncio.gather(*(request() for _ in range(500)))
    await one.releases_done()
    assert await one.in_flight(entry.backends[0]) == 0


async def test_priority_order_holds_across_replicas(replicas: MakeReplica) -> None:
    """A high-priority ticket queued at one replica overtakes low ones queued at another."""
    one, entry_one = await replicas(SERVER, queue_timeout_s=30)
    two, entry_two = await replicas(SERVER, queue_timeout_s=30)
    held = await one.acquire(ticket(entry_one))
    served: list[str] = []

    async def request(
        scheduler: RedisScheduler, entry: ModelEntry, name: str, priority: int
    ) -> None:
        lease = await scheduler.acquire(ticket(entry, priority=priority))
        served.append(name)
        await asyncio.sleep(0.01)
        scheduler.release(lease, ok=True)

    low = await one_by_one([request(one, entry_one, f"low{i}", 1) for i in range(3)])
    high = asyncio.create_task(request(two, entry_two, "high", 10))
    await asyncio.sleep(0.1)
    one.release(held, ok=True)
    await asyncio.wait_for(asyncio.gather(*low, high), timeout=10)
    assert served == ["high", "low0", "low1", "low2"]


async def test_organisations_take_turns_within_a_level(replicas: MakeReplica) -> None:
    one, entry = await replicas(SERVER, queue_timeout_s=30)
    held = await one.acquire(ticket(entry))
    served: list[str] = []

    async def request(org: str, n: int) -> None:
        lease = await one.acquire(ticket(entry, org=org))
        served.append(f"{org}{n}")
        await asyncio.sleep(0.01)
        one.release(lease, ok=True)

    tasks = await one_by_one(
        [*(request("flood", i) for i in range(4)), *(request("small", i) for i in range(2))]
    )
    one.release(held, ok=True)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    assert served == ["flood0", "small0", "flood1", "small1", "flood2", "flood3"]


async def test_a_dead_replicas_leases_expire_and_go_to_waiters_elsewhere(
    replicas: MakeReplica,
) -> None:
    dead, entry_dead = await replicas(SERVER, queue_timeout_s=30)
    alive, entry_alive = await replicas(SERVER, queue_timeout_s=30)
    await dead.acquire(ticket(entry_dead))
    await dead.close()  # killed: it neither releases nor renews
    started = asyncio.get_running_loop().time()
    lease = await asyncio.wait_for(alive.acquire(ticket(entry_alive)), timeout=10)
    waited = asyncio.get_running_loop().time() - started
    assert lease.backend.name == entry_alive.backends[0].name
    assert waited >= 1.0  # it came back by expiry (TTL 1.5 s), not by a release


async def test_renewed_leases_outlive_the_ttl(replicas: MakeReplica) -> None:
    one, entry = await replicas(SERVER, queue_timeout_s=0.5)
    await one.acquire(ticket(entry))
    await asyncio.sleep(2.5)  # longer than the TTL: the owner keeps renewing it
    with pytest.raises(QueueTimeout):
        await one.acquire(ticket(entry))


async def test_queue_timeout_and_threshold(replicas: MakeReplica) -> None:
    one, entry = await replicas(SERVER, queue_timeout_s=0.3)
    held = await one.acquire(ticket(entry))
    waiting = asyncio.create_task(one.acquire(ticket(entry, key_id=7, queue_threshold=1)))
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFull):
        await one.acquire(ticket(entry, key_id=7, queue_threshold=1))
    with pytest.raises(QueueTimeout):
        await waiting
    one.release(held, ok=True)
    lease = await one.acquire(ticket(entry, key_id=7, queue_threshold=1))  # the slot is free
    assert isinstance(lease, Lease)


async def test_a_client_leaving_the_queue_loses_nothing(replicas: MakeReplica) -> None:
    one, entry = await replicas(SERVER, queue_timeout_s=30)
    held = await one.acquire(ticket(entry))
    leaving = asyncio.create_task(one.acquire(ticket(entry)))
    await asyncio.sleep(0.05)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    one.release(held, ok=True)
    lease = await asyncio.wait_for(one.acquire(ticket(entry)), timeout=5)
    assert lease.backend is entry.backends[0]


@pytest.fixture
def private_redis() -> Any:
    """A redis-server of this test's own, which it may stop and start again."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    port = free_port()

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        return process

    server = {"process": start(), "url": f"redis://127.0.0.1:{port}/0", "start": start}
    yield server
    server["process"].terminate()
    server["process"].wait(10)


async def test_redis_down_fails_fast_then_recovers_with_the_leases_still_counted(
    replicas: MakeReplica, private_redis: dict[str, Any]
) -> None:
    url = private_redis["url"]
    for _ in range(50):
        if await _redis_answers(url):
            break
        await asyncio.sleep(0.1)
    one, entry = await replicas({**SERVER, "max_concurrency": 2}, url=url, queue_timeout_s=5)
    held = await one.acquire(ticket(entry))
    private_redis["process"].terminate()
    private_redis["process"].wait(10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SchedulerUnavailable):
        await one.acquire(ticket(entry))
    assert loop.time() - started < 3  # fast, not after the queue timeout
    assert not one.available
    private_redis["process"] = private_redis["start"]()  # back, empty
    for _ in range(100):
        if one.available and await _redis_answers(url) and await one.in_flight(held.backend) == 1:
            break
        await asyncio.sleep(0.1)
    # the lease still running was re-registered: one slot left of two, not two
    assert await one.in_flight(held.backend) == 1
    await one.acquire(ticket(entry))
    with pytest.raises(QueueTimeout):
        await asyncio.wait_for(one.acquire(ticket(entry)), timeout=10)
