"""What the shared (Redis) scheduler adds to a request when nobody waits, next to the local one.

Run: .venv/bin/python bench/dispatch/redis_cost.py [--redis redis://127.0.0.1:6379/0]
A request waits for `acquire` (one script on Redis); its release runs after the answer,
off the request's path, but it is measured too (awaited) to show the whole cost.
The scale-out issue's budget is 1 ms p50 added per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import redis.asyncio as redis

from aiguillage.catalog.catalog import Catalog
from aiguillage.catalog.config import parse_config
from aiguillage.dispatch.redis_scheduler import RedisScheduler
from aiguillage.dispatch.scheduler import LocalScheduler
from aiguillage.dispatch.tickets import Ticket

ROUNDS = 5_000


def _catalog() -> Catalog:
    servers = [{"url": f"http://127.0.0.1:{9000 + i}", "max_concurrency": 64} for i in range(4)]
    config = parse_config(
        {"models": [{"name": "m", "routing_strategy": "least-busy", "servers": servers}]}
    )
    return Catalog.from_config(config)


def _summary(name: str, samples: list[float]) -> str:
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[int(len(samples) * 0.99)]
    return f"| {name} | {p50:.0f} | {p99:.0f} |"


async def local() -> list[float]:
    catalog = _catalog()
    scheduler = LocalScheduler(catalog)
    model = catalog.resolve("m")
    assert model is not None
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        lease = await scheduler.acquire(Ticket(model=model, organisation="o", priority=5))
        scheduler.release(lease, ok=True)
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


async def shared(url: str) -> tuple[list[float], list[float]]:
    catalog = _catalog()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    scheduler = RedisScheduler(catalog, url, prefix=prefix)
    await scheduler.start()
    model = catalog.resolve("m")
    assert model is not None
    acquire, whole = [], []
    try:
        for _ in range(ROUNDS):
            started = time.perf_counter()
            lease = await scheduler.acquire(Ticket(model=model, organisation="o", priority=5))
            acquired = time.perf_counter()
            scheduler.release(lease, ok=True)
            await scheduler.releases_done()  # the release reached Redis
            ended = time.perf_counter()
            acquire.append((acquired - started) * 1e6)
            whole.append((ended - started) * 1e6)
    finally:
        await scheduler.close()
        client = redis.from_url(url)
        keys = [key async for key in client.scan_iter(match=f"{{{prefix}}}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return acquire, whole


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    local_samples = await local()
    acquire, whole = await shared(args.redis)
    print(f"{ROUNDS} requests one after another, 4 backends, least-busy, Redis at {args.redis}")
    print()
    print("| scheduler | p50 (µs) | p99 (µs) |")
    print("|---|---:|---:|")
    print(_summary("local: acquire + release", local_samples))
    print(_summary("Redis: acquire (on the request's path)", acquire))
    print(_summary("Redis: acquire + release awaited", whole))


if __name__ == "__main__":
    asyncio.run(main())
