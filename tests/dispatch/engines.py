"""The two dispatcher engines the conformance suite runs against, and a Redis to use."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from aiguillage.catalog.catalog import Catalog
from aiguillage.dispatch.scheduler import LocalScheduler

SHARED_REDIS = "redis://127.0.0.1:6379/0"


class Engine(Protocol):
    def __call__(
        self,
        catalog: Catalog,
        *,
        site: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> LocalScheduler: ...


def redis_reachable(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def unique_prefix() -> str:
    """Keys of one test only: tests share the local Redis with others (never FLUSHALL)."""
    return f"aiguillage-test:{uuid.uuid4().hex[:10]}:"


async def delete_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def clock_args(clock: Callable[[], float] | None) -> dict[str, Any]:
    return {} if clock is None else {"clock": clock}
