"""`engine`: every dispatcher test runs on the in-process engine and on the Redis engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from aiguillage.catalog.catalog import Catalog
from aiguillage.dispatch.redis_scheduler import RedisScheduler
from aiguillage.dispatch.scheduler import LocalScheduler
from tests.dispatch.engines import (
    SHARED_REDIS,
    Engine,
    clock_args,
    delete_prefix,
    redis_reachable,
    unique_prefix,
)


@pytest.fixture(params=["local", "redis"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    if request.param == "local":

        def local(
            catalog: Catalog,
            *,
            site: str | None = None,
            clock: Callable[[], float] | None = None,
        ) -> LocalScheduler:
            return LocalScheduler(catalog, site=site, **clock_args(clock))

        yield local
        return
    if not redis_reachable():
        pytest.skip("no Redis on 127.0.0.1:6379 for the Redis engine")
    prefix = unique_prefix()
    made: list[RedisScheduler] = []

    def shared(
        catalog: Catalog, *, site: str | None = None, clock: Callable[[], float] | None = None
    ) -> LocalScheduler:
        scheduler = RedisScheduler(
            catalog, SHARED_REDIS, site=site, prefix=prefix, **clock_args(clock)
        )
        made.append(scheduler)
        return scheduler

    yield shared
    for scheduler in made:
        await scheduler.close()
    await delete_prefix(SHARED_REDIS, prefix)
