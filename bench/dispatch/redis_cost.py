"""What the Redis engine adds to a request: acquire + release, local engine vs Redis.

Run: PYTHONPATH=src .venv/bin/python bench/dispatch/redis_cost.py [redis://127.0.0.1:6379/0]
The target (issue 4, scale-out) is at most 1 ms added at p50. Nobody waits: this
is the path every request takes when capacity is free (acquire's script, then
release's script, awaited so each round sees the previous one's effect).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid

import redis.asyncio as aioredis

from aiguillage.catalog.catalog import Catalog
from aiguillage.catalog.config import parse_config
from aiguillage.dispatch.redis_scheduler import RedisScheduler
from aiguillage.dispatch.scheduler import LocalScheduler
from aiguillage.dispatch.tickets import Ticket

ROUNDS = 5_000


def catalog() -> Catalog:
    servers = [{"url": f"http://127.0.0.1:{9000 + i}", "max_concurrency": 64} for i in range(4)]
    return Catalog.from_config(
        parse_config(
            {"models": [{"name": "m", "routing_strategy": "least-busy", "servers": servers}]}
        )
    )


async def measure(scheduler: LocalScheduler) -> list[float]:
    model = scheduler.catalog.resolve("m")
    assert model is not None
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        lease = await scheduler.acquire(Ticket(model=model, organisation="org", priority=0))
        scheduler.release(lease, ok=True)
        await scheduler.settled()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[int(len(ordered) * 0.99)]
    return f"| {name} | {statistics.median(ordered):.3f} | {p99:.3f} |"


async def main(url: str) -> None:
    local = LocalScheduler(catalog())
    prefix = f"aiguillage-bench:{uuid.uuid4().hex[:8]}:"
    shared = RedisScheduler(catalog(), url, prefix=prefix)
    await shared.start()
    try:
        rows = [summary("local", await measure(local)), summary("redis", await measure(shared))]
    finally:
        await shared.close()
        client = aioredis.Redis.from_url(url)
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    print(f"acquire + release, {ROUNDS} rounds, ms")
    print("| engine | p50 | p99 |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"))
