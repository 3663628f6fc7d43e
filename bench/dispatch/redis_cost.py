"""What the Redis engine adds to a request: acquire + release, local engine vs Redis.

Run: PYTHONPATH=src .venv/bin/python bench/dispatch/redis_cost.py [redis://127.0.0.1:6379/0]
The target (issue 4, scale-out) is at most 1 ms added at p50. Nobody waits: this
is the path every request takes when capacity is free (acquire's script, then
release's script, awaited so each round sees the previous one's effect).

Besides the latency it reports the CPU each request costs the replica (this
process) and Redis itself (the scripts' time from `INFO commandstats`): Redis
runs scripts one at a time, so its CPU per request bounds how many requests per
second any number of replicas can share it for.
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


async def measure(scheduler: LocalScheduler) -> tuple[list[float], float]:
    """Each round's wall time (ms), and this process's CPU per round (ms)."""
    model = scheduler.catalog.resolve("m")
    assert model is not None
    samples = []
    cpu_started = time.process_time()
    for _ in range(ROUNDS):
        started = time.perf_counter()
        lease = await scheduler.acquire(Ticket(model=model, organisation="org", priority=0))
        scheduler.release(lease, ok=True)
        await scheduler.settled()
        samples.append((time.perf_counter() - started) * 1000)
    return samples, (time.process_time() - cpu_started) * 1000 / ROUNDS


async def script_usec(client: aioredis.Redis) -> float:
    """Microseconds Redis has spent running scripts (EVALSHA and EVAL) since its start."""
    stats = await client.info("commandstats")
    return sum(
        float(stats.get(f"cmdstat_{name}", {}).get("usec", 0)) for name in ("evalsha", "eval")
    )


async def bare_call_cpu_ms(client: aioredis.Redis) -> float:
    """redis-py's own CPU for one call of a script that does nothing (the floor per call)."""
    script = client.register_script("return ARGV[1]")
    await script(args=["warm"])
    started = time.process_time()
    for _ in range(ROUNDS):
        await script(args=["acquire", "aiguillage:", "replica", "8000", "m", "0", "org", "-"])
    return (time.process_time() - started) * 1000 / ROUNDS


def summary(name: str, samples: list[float], cpu_ms: float, redis_ms: float | None) -> str:
    ordered = sorted(samples)
    p99 = ordered[int(len(ordered) * 0.99)]
    on_redis = "-" if redis_ms is None else f"{redis_ms:.3f}"
    return f"| {name} | {statistics.median(ordered):.3f} | {p99:.3f} | {cpu_ms:.3f} | {on_redis} |"


async def main(url: str) -> None:
    local = LocalScheduler(catalog())
    prefix = f"aiguillage-bench:{uuid.uuid4().hex[:8]}:"
    shared = RedisScheduler(catalog(), url, prefix=prefix)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    await shared.start()
    try:
        rows = [summary("local", *await measure(local), None)]
        before = await script_usec(client)
        samples, cpu_ms = await measure(shared)
        redis_ms = (await script_usec(client) - before) / 1000 / ROUNDS
        rows.append(summary("redis", samples, cpu_ms, redis_ms))
        bare_ms = await bare_call_cpu_ms(client)
    finally:
        await shared.close()
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    print(f"acquire + release, {ROUNDS} rounds, ms per request")
    print("| engine | p50 | p99 | replica CPU | Redis CPU (scripts) |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"redis-py alone, one call of a script that does nothing: {bare_ms:.3f} ms of CPU.")
    print(
        f"One Redis thread runs these scripts for at most {1 / redis_ms:.0f} requests/ms"
        f" ({1000 / redis_ms:,.0f} requests/s), whatever the number of replicas."
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"))
