"""The Redis engine through Sentinel: `redis+sentinel://` finds the master and follows a failover.

A real master, a real replica and a real Sentinel (redis-server in sentinel mode),
each on a port of this test's own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from aiguillage.catalog.catalog import Catalog
from aiguillage.catalog.config import ConfigError, parse_config
from aiguillage.dispatch.dispatcher import SchedulerUnavailable
from aiguillage.dispatch.redis_connection import parse_sentinel_url
from aiguillage.dispatch.redis_scheduler import RedisScheduler
from aiguillage.dispatch.tickets import Lease, Ticket
from tests.dispatch.engines import free_port, own_redis

SERVICE = "aiguillage"


def test_sentinel_urls_are_read_with_every_part() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://:s3cret@10.0.0.1:26379,sentinel-b:26380/aiguillage/2?sentinel_password=x"
    )
    assert target.sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380))
    assert (target.service, target.db, target.password) == ("aiguillage", 2, "s3cret")
    assert target.sentinel_password == "x"
    assert parse_sentinel_url("redis+sentinel://h:1/svc").db == 0


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h:26379",  # no service
        "redis+sentinel://h/svc",  # no port
        "redis+sentinel://h:1/svc/db",  # db not a number
        "http://h:6379/0",
    ],
)
def test_a_wrong_scheduler_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigError, match="scheduler_url"):
        parse_config({"scheduler_url": url})


def catalog() -> Catalog:
    config = {"models": [{"name": "m", "servers": [{"url": "http://a.example:8000"}]}]}
    return Catalog.from_config(parse_config({**config}))


async def wait_until(condition: Callable[[], object], within_s: float, what: str) -> None:
    """Check every 0.1 s, letting the scheduler's own tasks (renewal...) run meanwhile."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


def failover(sentinel: redis.Redis) -> bool:
    try:
        sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
    except redis.ResponseError as error:
        assert "NOGOODSLAVE" in str(error)
        return False
    return True


async def acquire_when_served(scheduler: RedisScheduler, within_s: float) -> Lease:
    """Acquire, retrying the fast 503s of a failover until the new master answers."""
    model = scheduler.catalog.resolve("m")
    assert model is not None
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await scheduler.acquire(Ticket(model=model, organisation="o", priority=0))
        except SchedulerUnavailable:
            assert time.monotonic() < deadline, "no master answered in time"
            await asyncio.sleep(0.2)


async def test_the_scheduler_follows_a_sentinel_failover(tmp_path: Path) -> None:
    master_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    config = tmp_path / "sentinel.conf"  # Sentinel rewrites its file: one of the test's own
    config.write_text(
        f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 5000\n"
    )
    with (
        own_redis(master_port),
        own_redis(replica_port, "--replicaof", "127.0.0.1", str(master_port)),
        own_redis(sentinel_port, str(config), "--sentinel"),
    ):
        master = redis.Redis(port=master_port, decode_responses=True)
        await wait_until(
            lambda: master.info("replication").get("connected_slaves") == 1, 10, "no replica"
        )
        scheduler = RedisScheduler(
            catalog(), f"redis+sentinel://127.0.0.1:{sentinel_port}/{SERVICE}/0", prefix="t:"
        )
        sentinel = redis.Redis(port=sentinel_port, decode_responses=True)
        try:
            before = await acquire_when_served(scheduler, 10)
            assert master.zcard("t:leases") == 1  # the lease is on the master Sentinel named
            scheduler.release(before, ok=True)
            await scheduler.settled()

            # Sentinel learns of the replica, then of its link, from INFO: until then, NOGOODSLAVE
            await wait_until(lambda: failover(sentinel), 20, "Sentinel found no replica to promote")
            promoted = f"{replica_port}"
            await wait_until(
                lambda: (
                    sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1]
                    == promoted
                ),
                15,
                "Sentinel did not promote the replica",
            )
            after = await acquire_when_served(scheduler, 15)
            new_master = redis.Redis(port=replica_port, decode_responses=True)
            assert new_master.info("replication")["role"] == "master"
            # A write in the moment between the promotion and the old master's demotion is
            # lost with the old master; the lease renewal puts live leases back on the new one.
            await wait_until(
                lambda: new_master.zcard("t:leases") == 1, 5, "the lease is not on the new master"
            )
            scheduler.release(after, ok=True)
            # released there too (a renewal on its way may put it back for a moment: the
            # scheduler releases it again right after that renewal)
            await wait_until(lambda: new_master.zcard("t:leases") == 0, 3, "not released")
            new_master.close()
        finally:
            await scheduler.close()
            sentinel.close()
            master.close()
