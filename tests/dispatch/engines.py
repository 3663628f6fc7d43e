"""The two dispatcher engines the conformance suite runs against, and a Redis to use."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pytest

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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def own_redis(port: int, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of this test's own (no persistence), stopped at the end.

    `options` are more redis-server arguments (a config file first, `--sentinel`...).
    """
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    process = subprocess.Popen(
        ["redis-server", *options, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not redis_reachable(port=port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield process
    finally:
        process.kill()
        process.wait()
