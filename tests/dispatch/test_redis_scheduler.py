"""The Redis engine where it differs from one process: several replicas, lease expiry, outages.

Replicas are several `RedisScheduler`s in one test process, each with its own
connections and grant channel, exactly as separate gateway processes would be.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from aiguillage.backends.circuit import CircuitState
from aiguillage.catalog.catalog import Catalog, ModelEntry
from aiguillage.catalog.config import parse_config
from aiguillage.dispatch.dispatcher import QueueTimeout, SchedulerUnavailable
from aiguillage.dispatch.redis_scheduler import RedisScheduler
from aiguillage.dispatch.tickets import Lease, Ticket
from tests.dispatch.engines import (
    SHARED_REDIS,
    delete_prefix,
    free_port,
    own_redis,
    redis_reachable,
    unique_prefix,
)

pytestmark = pytest.mark.skipif(
    not redis_reachable(), reason="no Redis on 127.0.0.1:6379 for the Redis engine"
)


def catalog(max_concurrency: int, queue_timeout_s: float = 30) -> Catalog:
    config = parse_config(
        {
            "models": [
                {
                    "name": "m",
                    "queue_timeout_s": queue_timeout_s,
                    "servers": [
                        {"url": "http://a.example:8000", "max_concurrency": max_concurrency}
                    ],
                }
            ]
        }
    )
    return Catalog.from_config(config)


def ticket(entry: ModelEntry, priority: int = 0, org: str = "org") -> Ticket:
    return Ticket(model=entry, organisation=org, priority=priority)


def model(scheduler: RedisScheduler) -> ModelEntry:
    entry = scheduler.catalog.resolve("m")
    assert entry is not None
    return entry


@pytest.fixture
async def replicas() -> AsyncIterator[list[RedisScheduler]]:
    """Three replicas on the shared Redis, under one key prefix of their own."""
    prefix = unique_prefix()
    made = [
        RedisScheduler(
            catalog(2),
            SHARED_REDIS,
            prefix=prefix,
            lease_ttl_s=1.5,
            renew_interval_s=0.3,
            reap_interval_s=0.2,
        )
        for _ in range(3)
    ]
    for replica in made:
        await replica.start()
    yield made
    for replica in made:
        await replica.close()
    await delete_prefix(SHARED_REDIS, prefix)


async def eventually(condition: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_high_priority_request_at_one_replica_overtakes_low_ones_at_another(
    replicas: list[RedisScheduler],
) -> None:
    a, b, c = replicas
    held = [await a.acquire(ticket(model(a))) for _ in range(2)]
    lows = [asyncio.ensure_future(a.acquire(ticket(model(a), priority=0))) for _ in range(3)]
    await a.settled()
    high = asyncio.ensure_future(b.acquire(ticket(model(b), priority=10)))
    await b.settled()
    assert not high.done() and not any(low.done() for low in lows)
    a.release(held[0], ok=True)  # freed at replica a: the grant goes to b's waiter
    await eventually(high.done)
    assert not any(low.done() for low in lows)
    c_ticket = asyncio.ensure_future(c.acquire(ticket(model(c), priority=5)))
    await c.settled()
    a.release(held[1], ok=True)
    await eventually(c_ticket.done)
    assert not any(low.done() for low in lows)
    b.release(high.result(), ok=True)
    c.release(c_ticket.result(), ok=True)
    for low in lows:  # then the low ones, in their order of arrival
        await eventually(low.done)
        a.release(low.result(), ok=True)


async def test_explain_counts_the_tickets_waiting_at_every_replica(
    replicas: list[RedisScheduler],
) -> None:
    a, b, _ = replicas
    held = [await a.acquire(ticket(model(a))) for _ in range(2)]
    waiting = [asyncio.ensure_future(a.acquire(ticket(model(a)))) for _ in range(2)]
    waiting.append(asyncio.ensure_future(b.acquire(ticket(model(b)))))
    await a.settled()
    await b.settled()
    report = (await b.explain())["models"]["m"]
    assert (report["waiting"], report["waiting_all_replicas"]) == (1, 3)
    for lease in held:
        a.release(lease, ok=True)
    for task in waiting:
        lease = await asyncio.wait_for(task, 5)
        (a if task in waiting[:2] else b).release(lease, ok=True)
    await a.settled()
    assert (await a.explain())["models"]["m"]["waiting_all_replicas"] == 0


async def test_the_cap_holds_across_replicas_under_concurrent_acquires(
    replicas: list[RedisScheduler],
) -> None:
    holding = 0
    most = 0

    async def one(replica: RedisScheduler, i: int) -> None:
        nonlocal holding, most
        lease = await replica.acquire(ticket(model(replica), priority=i % 3, org=f"o{i % 4}"))
        holding += 1
        most = max(most, holding)
        await asyncio.sleep(0.001)
        holding -= 1
        replica.release(lease, ok=True)

    await asyncio.gather(*(one(replicas[i % 3], i) for i in range(300)))
    assert most == 2  # the cap of 2 was used, never exceeded
    for replica in replicas:
        await replica.settled()
    assert replicas[0].in_flight(model(replicas[0]).backends[0]) == 0


async def test_a_dead_replicas_leases_go_to_the_waiters_of_another(
    replicas: list[RedisScheduler],
) -> None:
    dead, alive, _ = replicas
    for _ in range(2):
        await dead.acquire(ticket(model(dead)))  # and never released
    await dead.close()  # stops renewing, like a killed process
    started = time.monotonic()
    waiter = asyncio.ensure_future(alive.acquire(ticket(model(alive))))
    await eventually(waiter.done, within_s=10)
    assert time.monotonic() - started < 10
    alive.release(waiter.result(), ok=True)


async def test_a_queued_ticket_times_out_and_leaves_the_global_queue() -> None:
    prefix = unique_prefix()
    a, b = (
        RedisScheduler(catalog(2, queue_timeout_s=0.2), SHARED_REDIS, prefix=prefix)
        for _ in range(2)
    )
    try:
        held = [await a.acquire(ticket(model(a))) for _ in range(2)]
        with pytest.raises(QueueTimeout):
            await b.acquire(ticket(model(b)))
        assert (await b.explain())["models"]["m"]["waiting"] == 0
        for lease in held:
            a.release(lease, ok=True)
        await a.settled()
        assert a.in_flight(model(a).backends[0]) == 0  # nobody was granted the freed slots
        lease = await b.acquire(ticket(model(b)))  # the global queue is empty: at once
        b.release(lease, ok=True)
    finally:
        await a.close()
        await b.close()
        await delete_prefix(SHARED_REDIS, prefix)


class SlowRenewal(RedisScheduler):
    """Its renewal reaches Redis 50 ms after it read the leases: a release overtakes it."""

    async def _call(self, op: str, *args: str) -> tuple[str, str, str]:
        if op == "renew":
            await asyncio.sleep(0.05)
        return await super()._call(op, *args)


async def test_a_lease_released_while_a_renewal_is_on_its_way_is_not_brought_back() -> None:
    prefix = unique_prefix()
    scheduler = SlowRenewal(catalog(1), SHARED_REDIS, prefix=prefix, renew_interval_s=3600)
    counts = redis.Redis.from_url(SHARED_REDIS, decode_responses=True)
    try:
        await scheduler.start()
        lease = await scheduler.acquire(ticket(model(scheduler)))
        renewal = asyncio.ensure_future(scheduler._renew())
        await asyncio.sleep(0)  # the renewal has read the lease and is on its way
        scheduler.release(lease, ok=True)
        await renewal
        await scheduler.settled()
        assert counts.zcard(f"{prefix}leases") == 0
        assert counts.hget(f"{prefix}in", lease.backend.name) == "0"
        again = await asyncio.wait_for(scheduler.acquire(ticket(model(scheduler))), 1)
        scheduler.release(again, ok=True)  # the cap of 1 is free at once, not a TTL later
    finally:
        await scheduler.close()
        counts.close()
        await delete_prefix(SHARED_REDIS, prefix)


# --- Redis itself going away ----------------------------------------------------------------


async def acquire_after_recovery(scheduler: RedisScheduler) -> asyncio.Task[Lease]:
    """Acquire, retrying while Redis refuses (fast) during its recovery window."""
    deadline = time.monotonic() + 10
    while True:
        task = asyncio.ensure_future(scheduler.acquire(ticket(model(scheduler))))
        await scheduler.settled()
        if not (task.done() and isinstance(task.exception(), SchedulerUnavailable)):
            return task
        assert time.monotonic() < deadline, "still refused after the recovery window"
        await asyncio.sleep(0.1)


async def test_redis_restart_answers_unavailable_fast_then_recovers_with_caps_intact() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    states: list[bool] = []
    options: dict[str, Any] = {"lease_ttl_s": 1.5, "renew_interval_s": 0.3, "reap_interval_s": 0.2}
    with own_redis(port) as server:
        a = RedisScheduler(catalog(1), url, on_availability=states.append, **options)
        b = RedisScheduler(catalog(1), url, **options)
        try:
            # a Redis started just now: a short recovery window first (other replicas' leases)
            held: Lease = await (await acquire_after_recovery(a))
            queued = asyncio.ensure_future(a.acquire(ticket(model(a))))
            await a.settled()
            server.kill()
            server.wait()
            started = time.monotonic()
            with pytest.raises(SchedulerUnavailable):
                await a.acquire(ticket(model(a)))
            assert time.monotonic() - started < 3  # fast, not a hang
            assert states == [False]
            with pytest.raises(SchedulerUnavailable):
                await asyncio.wait_for(queued, 3)  # a waiting request is not left hanging
            with own_redis(port):  # back, empty: it lost every key
                await eventually(lambda: states[-1] is True)  # reconnected by itself
                counts = redis.Redis(port=port, decode_responses=True)
                await eventually(  # a's renewal put its live lease back into the empty Redis
                    lambda: counts.hget(f"{a.prefix}in", held.backend.name) == "1"
                )
                counts.close()
                waiter = await acquire_after_recovery(b)
                assert not waiter.done()  # the cap of 1 still counts a's request
                a.release(held, ok=True)
                await eventually(waiter.done)
                b.release(waiter.result(), ok=True)
        finally:
            await a.close()
            await b.close()


async def test_a_circuit_opened_by_one_replica_is_open_at_the_others(
    replicas: list[RedisScheduler],
) -> None:
    a, b, _ = replicas
    for _ in range(3):  # the default circuit_failures
        lease = await a.acquire(ticket(model(a)))
        a.release(lease, ok=False)
    await a.settled()
    assert not model(a).backends[0].usable()
    await eventually(lambda: not model(b).backends[0].usable(), within_s=5)  # within a reap


# --- shared circuits -------------------------------------------------------------------------


async def test_failures_seen_by_different_replicas_open_the_circuit_for_all(
    replicas: list[RedisScheduler],
) -> None:
    a, b, c = replicas
    for replica, ok in ((a, False), (b, False), (c, True), (a, False), (b, False)):
        lease = await replica.acquire(ticket(model(replica)))
        replica.release(lease, ok=ok)  # c's success resets the count: 2 in a row so far
        await replica.settled()
    await a.explain()  # any reply carries the shared circuits
    assert model(a).backends[0].circuit.state is CircuitState.CLOSED
    lease = await c.acquire(ticket(model(c)))
    c.release(lease, ok=False)  # the third in a row, each replica having seen one or two
    await c.settled()
    await a.explain()
    assert model(a).backends[0].circuit.state is CircuitState.OPEN
    assert not model(a).backends[0].usable()


@pytest.fixture
async def pair() -> AsyncIterator[list[RedisScheduler]]:
    """Two replicas of a model on backends x and y, whose circuits open after one failure;
    the second calls Redis only when asked (no renewal or reap during a test)."""
    config = parse_config(
        {
            "circuit_failures": 1,
            "circuit_open_s": 0.5,
            "models": [
                {
                    "name": "m",
                    "routing_strategy": "round-robin",
                    "servers": [
                        {"url": "http://x.example:8000", "max_concurrency": 4},
                        {"url": "http://y.example:8000", "max_concurrency": 4},
                    ],
                }
            ],
        }
    )
    prefix = unique_prefix()
    quiet = {"lease_ttl_s": 60, "renew_interval_s": 20, "reap_interval_s": 20}  # b calls rarely
    made = [
        RedisScheduler(Catalog.from_config(config), SHARED_REDIS, prefix=prefix, **options)
        for options in ({"reap_interval_s": 0.1}, quiet)
    ]
    for replica in made:
        await replica.start()
    await asyncio.sleep(0.2)  # their first renewal and reap (at start) are done
    yield made
    for replica in made:
        await replica.close()
    await delete_prefix(SHARED_REDIS, prefix)


def backend(scheduler: RedisScheduler, name: str) -> Any:
    return next(b for b in model(scheduler).backends if b.name == f"{name}.example:8000")


def only_x_ticket(replica: RedisScheduler) -> Ticket:
    only_x = frozenset({backend(replica, "y")})
    return Ticket(model=model(replica), organisation="o", priority=0, exclude=only_x)


async def open_x(replica: RedisScheduler) -> None:
    """One failure on x at this replica: its breaker opens, and with it the shared circuit."""
    lease = await replica.acquire(only_x_ticket(replica))
    replica.release(lease, ok=False)
    await replica.settled()
    assert backend(replica, "x").circuit.state is CircuitState.OPEN


async def test_a_replica_that_has_not_heard_of_an_open_circuit_still_places_nothing_there(
    pair: list[RedisScheduler],
) -> None:
    a, b = pair
    await open_x(a)
    assert backend(b, "x").circuit.state is CircuitState.CLOSED  # b has not called Redis since
    leases = [await b.acquire(ticket(model(b))) for _ in range(4)]  # round-robin would use x
    assert {lease.backend for lease in leases} == {backend(b, "y")}
    assert backend(b, "x").circuit.state is CircuitState.OPEN  # b's breaker follows the shared one
    for lease in leases:
        b.release(lease, ok=True)


async def test_a_half_open_circuit_lets_one_trial_through_across_replicas_and_its_success_closes_it(
    pair: list[RedisScheduler],
) -> None:
    a, b = pair
    await open_x(a)
    await asyncio.sleep(0.6)  # the open time is over: half-open
    trial = await a.acquire(only_x_ticket(a))
    assert trial.token.endswith("\ttrial")
    others = [asyncio.ensure_future(b.acquire(only_x_ticket(b))) for _ in range(2)]
    await b.settled()
    assert not any(other.done() for other in others)  # one trial at a time, whichever replica
    a.release(trial, ok=True)  # the trial succeeded: the circuit closes for every replica
    for other in others:
        await eventually(other.done, within_s=3)
        assert not other.result().token.endswith("\ttrial")
        b.release(other.result(), ok=True)
    await b.settled()
    assert backend(b, "x").circuit.state is CircuitState.CLOSED


async def test_a_failed_trial_opens_the_circuit_again_for_every_replica(
    pair: list[RedisScheduler],
) -> None:
    a, b = pair
    await open_x(a)
    await asyncio.sleep(0.6)
    trial = await b.acquire(only_x_ticket(b))  # b had never seen x fail
    b.release(trial, ok=False)
    await b.settled()
    waiting = asyncio.ensure_future(a.acquire(only_x_ticket(a)))
    await a.settled()
    assert not waiting.done()  # open again: a's request waits for the next trial
    assert backend(a, "x").circuit.state is CircuitState.OPEN
    lease = await asyncio.wait_for(waiting, 3)  # half-open again: the reaper's pump grants it
    assert lease.token.endswith("\ttrial")
    a.release(lease, ok=True)
