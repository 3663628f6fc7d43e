"""The dispatcher, without HTTP: queues, leases, strategies, QoS, owners, circuits.

One conformance suite: every test runs against the in-process engine and the
Redis engine (`engine` fixture, tests/dispatch/conftest.py).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from aiguillage.backends.circuit import CircuitState
from aiguillage.catalog.catalog import Catalog, ModelEntry
from aiguillage.catalog.config import parse_config
from aiguillage.dispatch.dispatcher import (
    NoBackendAvailable,
    NoPrivateBackend,
    QueueFull,
    QueueTimeout,
)
from aiguillage.dispatch.scheduler import LocalScheduler
from aiguillage.dispatch.strategies import LeastBusy, PrefixAffinity, load_of
from aiguillage.dispatch.tickets import Lease, RoutingMode, Ticket
from tests.dispatch.engines import Engine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(
    engine: Engine,
    *servers: dict[str, Any],
    site: str | None = None,
    clock: Clock | None = None,
    **model: Any,
) -> tuple[LocalScheduler, ModelEntry]:
    config = parse_config(
        {
            "site": site,
            "circuit_failures": 2,
            "circuit_open_s": 5,
            "models": [
                {
                    "name": "m",
                    "servers": [{"max_concurrency": 1, **server} for server in servers],
                    **model,
                }
            ],
        }
    )
    clock = clock or Clock()
    catalog = Catalog.from_config(config, clock)
    scheduler = engine(catalog, site=site, clock=clock)
    entry = catalog.resolve("m")
    assert entry is not None
    return scheduler, entry


def url(name: str) -> str:
    return f"http://{name}.example:8000"


def ticket(entry: ModelEntry, org: str = "org", priority: int = 0, **extra: Any) -> Ticket:
    return Ticket(model=entry, organisation=org, priority=priority, **extra)


async def waiting(scheduler: LocalScheduler, tickets: list[Ticket]) -> list[asyncio.Task[Lease]]:
    """Start acquiring each ticket in order; return once all are queued."""
    tasks = []
    for one in tickets:
        tasks.append(asyncio.ensure_future(scheduler.acquire(one)))
        await scheduler.settled()
    return tasks


async def serve_in_order(
    scheduler: LocalScheduler, first: Lease, tasks: list[asyncio.Task[Lease]]
) -> list[Ticket]:
    """Release the held lease, then each granted one in turn; the order tickets got served."""
    order = []
    scheduler.release(first, ok=True)
    for _ in tasks:
        await scheduler.settled()
        done = [task for task in tasks if task.done() and task.result().ticket not in order]
        assert len(done) == 1, "exactly one ticket is granted per freed slot"
        lease = done[0].result()
        order.append(lease.ticket)
        scheduler.release(lease, ok=True)
    return order


# --- queues and priorities ------------------------------------------------------------------


async def test_empty_queue_grants_at_once_without_waiting(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a")})
    lease = await scheduler.acquire(ticket(entry))
    assert lease.backend.in_flight == 1 and lease.ticket.waited_s == 0
    scheduler.release(lease, ok=True)
    scheduler.release(lease, ok=True)  # idempotent
    assert lease.backend.in_flight == 0


async def test_never_more_than_max_concurrency(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a"), "max_concurrency": 3})
    leases = [await scheduler.acquire(ticket(entry)) for _ in range(3)]
    tasks = await waiting(scheduler, [ticket(entry) for _ in range(5)])
    assert not any(task.done() for task in tasks)
    assert leases[0].backend.in_flight == 3
    scheduler.release(leases[0], ok=True)
    await scheduler.settled()
    assert sum(task.done() for task in tasks) == 1
    assert leases[0].backend.in_flight == 3
    for task in tasks:
        task.cancel()


async def test_strict_priority_then_fifo(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a")})
    held = await scheduler.acquire(ticket(entry))
    low1, low2 = ticket(entry, priority=0), ticket(entry, priority=0)
    high, mid = ticket(entry, priority=10), ticket(entry, priority=5)
    tasks = await waiting(scheduler, [low1, low2, high, mid])
    assert await serve_in_order(scheduler, held, tasks) == [high, mid, low1, low2]


async def test_fairness_between_two_organisations_flooding_one_level(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a")})
    held = await scheduler.acquire(ticket(entry))
    flood = [ticket(entry, org="big") for _ in range(6)]
    small = [ticket(entry, org="small") for _ in range(2)]
    tasks = await waiting(scheduler, flood + small)
    order = [t.organisation for t in await serve_in_order(scheduler, held, tasks)]
    assert order[:4] == ["big", "small", "big", "small"]
    assert order[4:] == ["big"] * 4


async def test_a_retried_ticket_keeps_its_place(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a")}, {"url": url("b")})
    first = ticket(entry)
    lease_a = await scheduler.acquire(first)
    lease_b = await scheduler.acquire(ticket(entry))
    (later_task,) = await waiting(scheduler, [ticket(entry)])
    # the first ticket's backend fails before the first byte: the relay retries it elsewhere
    first.exclude = frozenset({lease_a.backend})
    scheduler.release(lease_a, ok=False)
    await scheduler.settled()
    assert later_task.done()  # the freed slot went to the one waiting
    (latecomer,) = await waiting(scheduler, [ticket(entry)])
    (retry,) = await waiting(scheduler, [first])
    scheduler.release(lease_b, ok=True)
    await scheduler.settled()
    assert retry.done() and not latecomer.done()  # `first` arrived before the latecomer
    assert retry.result().backend is lease_b.backend
    latecomer.cancel()


async def test_a_key_over_its_threshold_gets_queue_full_at_once(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a")})
    held = await scheduler.acquire(ticket(entry, key_id=1))
    tasks = await waiting(scheduler, [ticket(entry, key_id=1, queue_threshold=2) for _ in range(2)])
    with pytest.raises(QueueFull):
        await scheduler.acquire(ticket(entry, key_id=1, queue_threshold=2))
    other_key = asyncio.ensure_future(scheduler.acquire(ticket(entry, key_id=2, queue_threshold=2)))
    await scheduler.settled()
    assert not other_key.done()  # another key is not affected
    for task in [*tasks, other_key]:
        task.cancel()
    scheduler.release(held, ok=True)


async def test_a_ticket_waits_at_most_the_queue_timeout(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a")}, queue_timeout_s=0.05)
    held = await scheduler.acquire(ticket(entry))
    with pytest.raises(QueueTimeout):
        await scheduler.acquire(ticket(entry))
    assert (await scheduler.explain())["models"]["m"]["waiting"] == 0
    scheduler.release(held, ok=True)


async def test_a_client_vanishing_while_queued_leaves_no_trace(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a")})
    held = await scheduler.acquire(ticket(entry))
    gone = asyncio.ensure_future(scheduler.acquire(ticket(entry, org="gone")))
    stays = asyncio.ensure_future(scheduler.acquire(ticket(entry, org="stays")))
    await scheduler.settled()
    gone.cancel()
    await scheduler.settled()
    scheduler.release(held, ok=True)
    await scheduler.settled()
    assert stays.done() and stays.result().ticket.organisation == "stays"
    assert held.backend.in_flight == 1


async def test_a_lease_whose_client_vanished_is_reclaimed_by_the_safety_net(engine: Engine) -> None:
    clock = Clock()
    scheduler, entry = setup(engine, {"url": url("a")}, clock=clock)
    lease = await scheduler.acquire(ticket(entry))  # and its holder never releases it
    clock.now += 10
    assert scheduler.reclaim_stale_leases(max_age_s=60) == 0
    lease.renew(clock.now)  # a long stream renews as it goes
    clock.now += 61
    assert scheduler.reclaim_stale_leases(max_age_s=60) == 1
    assert lease.released and lease.backend.in_flight == 0


async def test_priority_inversion_attempt_cannot_raise_above_the_key(engine: Engine) -> None:
    # the ceiling is applied by the endpoint: a ticket carries min(key, asked); here we check that
    # a low ticket cannot jump ahead of a high one already waiting, whatever its arrival
    scheduler, entry = setup(engine, {"url": url("a")})
    held = await scheduler.acquire(ticket(entry))
    high = ticket(entry, priority=9)
    tasks = await waiting(scheduler, [high, ticket(entry, priority=8), ticket(entry, priority=8)])
    assert (await serve_in_order(scheduler, held, tasks))[0] is high


# --- health and circuits --------------------------------------------------------------------


async def test_all_backends_open_circuit_fails_fast(engine: Engine) -> None:
    clock = Clock()
    scheduler, entry = setup(engine, {"url": url("a")}, {"url": url("b")}, clock=clock)
    for backend in entry.backends:
        backend.circuit.on_failure()
        backend.circuit.on_failure()
        assert backend.circuit.state is CircuitState.OPEN
    with pytest.raises(NoBackendAvailable):
        await scheduler.acquire(ticket(entry))
    clock.now += 5  # half-open: one trial each
    lease = await scheduler.acquire(ticket(entry))
    scheduler.release(lease, ok=True)
    assert lease.backend.circuit.state is CircuitState.CLOSED


async def test_failures_open_the_circuit_and_traffic_moves_away(engine: Engine) -> None:
    scheduler, entry = setup(
        engine, {"url": url("a"), "max_concurrency": 5}, {"url": url("b"), "max_concurrency": 5}
    )
    a = entry.backends[0]
    for _ in range(2):
        lease = await scheduler.acquire(ticket(entry, exclude=frozenset(entry.backends[1:])))
        scheduler.release(lease, ok=False)
    assert a.circuit.state is CircuitState.OPEN
    leases = [await scheduler.acquire(ticket(entry)) for _ in range(4)]
    assert {lease.backend for lease in leases} == {entry.backends[1]}


async def test_unhealthy_backend_is_skipped(engine: Engine) -> None:
    scheduler, entry = setup(
        engine, {"url": url("a"), "max_concurrency": 5}, {"url": url("b"), "max_concurrency": 5}
    )
    entry.backends[0].healthy = False
    leases = [await scheduler.acquire(ticket(entry)) for _ in range(4)]
    assert {lease.backend for lease in leases} == {entry.backends[1]}


# --- strategies ------------------------------------------------------------------------------


async def test_round_robin_alternates(engine: Engine) -> None:
    scheduler, entry = setup(
        engine, {"url": url("a"), "max_concurrency": 9}, {"url": url("b"), "max_concurrency": 9}
    )
    names = [(await scheduler.acquire(ticket(entry))).backend.name for _ in range(4)]
    assert names[0] != names[1] and names[0] == names[2] and names[1] == names[3]


async def test_weighted_follows_the_weights(engine: Engine) -> None:
    scheduler, entry = setup(
        engine,
        {"url": url("a"), "max_concurrency": 99, "weight": 3},
        {"url": url("b"), "max_concurrency": 99, "weight": 1},
        routing_strategy="weighted",
    )
    counts = Counter([(await scheduler.acquire(ticket(entry))).backend.name for _ in range(40)])
    assert counts["a.example:8000"] == 30 and counts["b.example:8000"] == 10


async def test_least_busy_uses_engine_signals_and_breaks_ties_at_random(engine: Engine) -> None:
    scheduler, entry = setup(
        engine,
        {"url": url("a"), "max_concurrency": 10},
        {"url": url("b"), "max_concurrency": 10},
        routing_strategy="least-busy",
    )
    a, b = entry.backends
    a.load = SimpleNamespace(running=8, waiting=4, kv_cache_usage=0.9, ttft_p95_s=None)  # type: ignore[assignment]
    lease = await scheduler.acquire(ticket(entry))
    assert lease.backend is b  # a is loaded by other clients: its own metrics say so
    scheduler.release(lease, ok=True)
    a.load = None
    picks = Counter()
    for _ in range(200):
        lease = await scheduler.acquire(ticket(entry))
        picks[lease.backend] += 1
        scheduler.release(lease, ok=True)
    assert picks[a] > 50 and picks[b] > 50  # equal load: both get chosen


async def test_least_busy_prefers_the_local_site_at_equal_load(engine: Engine) -> None:
    scheduler, entry = setup(
        engine,
        {"url": url("far"), "max_concurrency": 10, "site": "paris"},
        {"url": url("near"), "max_concurrency": 10, "site": "rennes"},
        routing_strategy="least-busy",
        site="rennes",
    )
    lease = await scheduler.acquire(ticket(entry))
    assert lease.backend.site == "rennes"
    other = await scheduler.acquire(ticket(entry))
    assert other.backend.site == "paris"  # the local one is now busier: the other site helps


async def test_latency_strategy_picks_the_fastest_recent_ttft(engine: Engine) -> None:
    scheduler, entry = setup(
        engine,
        {"url": url("a"), "max_concurrency": 10},
        {"url": url("b"), "max_concurrency": 10},
        routing_strategy="latency",
    )
    a, b = entry.backends
    a.observe_ttft(0.9)
    b.observe_ttft(0.1)
    assert (await scheduler.acquire(ticket(entry))).backend is b


async def test_prefix_affinity_sticks_and_spills_over_its_bound(engine: Engine) -> None:
    scheduler, entry = setup(
        engine,
        *({"url": url(name), "max_concurrency": 4} for name in "abc"),
        routing_strategy="prefix-affinity",
    )
    first = await scheduler.acquire(ticket(entry, prefix="You are a helpful assistant. " * 5))
    again = await scheduler.acquire(ticket(entry, prefix="You are a helpful assistant. " * 5))
    assert again.backend is first.backend
    scheduler.release(first, ok=True)
    scheduler.release(again, ok=True)
    homes = set()
    for i in range(30):
        lease = await scheduler.acquire(ticket(entry, prefix=f"prompt {i}"))
        homes.add(lease.backend)
        scheduler.release(lease, ok=True)
    assert len(homes) == 3  # different prefixes spread over the ring


def test_prefix_affinity_moves_to_the_next_backend_when_its_home_is_overloaded(
    engine: Engine,
) -> None:
    _, entry = setup(engine, *({"url": url(name), "max_concurrency": 4} for name in "abc"))
    strategy = PrefixAffinity(entry.backends, LeastBusy(rng=random.Random(1)))
    probe = ticket(entry, prefix="shared system prompt")
    home, _ = strategy.choose(probe, entry.backends)
    home.in_flight = 4  # far above the mean
    moved, reason = strategy.choose(probe, entry.backends)
    assert moved is not home and "next on ring" in reason
    assert load_of(moved) == 0


# --- QoS policies and owners ------------------------------------------------------------------


async def test_parallel_threshold_keeps_headroom_for_high_priority(engine: Engine) -> None:
    scheduler, entry = setup(
        engine,
        {"url": url("a"), "max_concurrency": 4},
        qos={
            "policy": "parallel-threshold",
            "shares": [
                {"min_priority": 0, "share": 0.5},
                {"min_priority": 10, "share": 1.0},
            ],
        },
    )
    low = [await scheduler.acquire(ticket(entry, priority=0)) for _ in range(2)]
    blocked = asyncio.ensure_future(scheduler.acquire(ticket(entry, priority=0)))
    await scheduler.settled()
    assert not blocked.done()  # low priority may use 2 of 4 slots
    high = [await scheduler.acquire(ticket(entry, priority=10)) for _ in range(2)]
    assert entry.backends[0].in_flight == 4
    scheduler.release(high[0], ok=True)
    await scheduler.settled()
    assert not blocked.done()  # a freed slot above the low share stays for high priority
    scheduler.release(low[0], ok=True)
    await scheduler.settled()
    assert not blocked.done()  # 2 of 4 in use: still at the low share
    scheduler.release(high[1], ok=True)
    await scheduler.settled()
    assert blocked.done()  # under the share: the held ticket goes
    for lease in [low[1], blocked.result()]:
        scheduler.release(lease, ok=True)


async def test_performance_policy_holds_low_priority_while_the_backend_is_slow(
    engine: Engine,
) -> None:
    scheduler, entry = setup(
        engine,
        {"url": url("a"), "max_concurrency": 8},
        qos={"policy": "performance", "protected_priority": 10, "ttft_target_s": 0.5},
    )
    backend = entry.backends[0]
    busy = await scheduler.acquire(ticket(entry, priority=10))
    backend.observe_ttft(2.0)
    low = asyncio.ensure_future(scheduler.acquire(ticket(entry, priority=0)))
    await scheduler.settled()
    assert not low.done()
    assert (await scheduler.acquire(ticket(entry, priority=10))).backend is backend
    for _ in range(20):
        backend.observe_ttft(0.1)  # the backend recovers
    scheduler.backend_changed(backend)
    await scheduler.settled()
    assert low.done()
    scheduler.release(busy, ok=True)


async def test_owner_goes_first_on_its_own_server(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a"), "owner": "rennes"})
    held = await scheduler.acquire(ticket(entry, org="other"))
    strangers = [ticket(entry, org="other", priority=50) for _ in range(2)]
    owner = ticket(entry, org="rennes", priority=0)
    tasks = await waiting(scheduler, [*strangers, owner])
    assert (await serve_in_order(scheduler, held, tasks))[0] is owner


async def test_owner_reserved_slots_are_kept_for_the_owner(engine: Engine) -> None:
    scheduler, entry = setup(
        engine, {"url": url("a"), "owner": "rennes", "max_concurrency": 3, "owner_reserved": 1}
    )
    others = [await scheduler.acquire(ticket(entry, org="other")) for _ in range(2)]
    blocked = asyncio.ensure_future(scheduler.acquire(ticket(entry, org="other")))
    await scheduler.settled()
    assert not blocked.done()
    mine = await scheduler.acquire(ticket(entry, org="rennes"))
    assert mine.backend.in_flight == 3
    blocked.cancel()
    for lease in [*others, mine]:
        scheduler.release(lease, ok=True)


async def test_routing_modes(engine: Engine) -> None:
    scheduler, entry = setup(
        engine,
        {"url": url("public"), "max_concurrency": 5},
        {"url": url("private"), "max_concurrency": 5, "owner": "rennes"},
    )
    private = entry.backends[1]
    for _ in range(3):
        lease = await scheduler.acquire(
            ticket(entry, org="rennes", routing_mode=RoutingMode.PRIVATE_FIRST)
        )
        assert lease.backend is private
    only = [
        await scheduler.acquire(ticket(entry, org="rennes", routing_mode=RoutingMode.PRIVATE_ONLY))
        for _ in range(2)
    ]
    assert all(lease.backend is private for lease in only)
    spill = await scheduler.acquire(
        ticket(entry, org="rennes", routing_mode=RoutingMode.PRIVATE_FIRST)
    )
    assert spill.backend is entry.backends[0]  # private full: private-first goes elsewhere
    held = asyncio.ensure_future(
        scheduler.acquire(ticket(entry, org="rennes", routing_mode=RoutingMode.PRIVATE_ONLY))
    )
    await scheduler.settled()
    assert not held.done()  # private-only waits for its own
    held.cancel()
    with pytest.raises(NoPrivateBackend):
        await scheduler.acquire(ticket(entry, org="lyon", routing_mode=RoutingMode.PRIVATE_ONLY))


async def test_critical_model_keeps_reserved_capacity_on_shared_backends(engine: Engine) -> None:
    config = parse_config(
        {
            "models": [
                {
                    "name": "vital",
                    "critical": True,
                    "reserved_concurrency": 1,
                    "servers": [{"url": url("shared"), "max_concurrency": 3}],
                },
                {"name": "chat", "servers": [{"url": url("shared"), "max_concurrency": 3}]},
            ]
        }
    )
    catalog = Catalog.from_config(config)
    scheduler = engine(catalog)
    vital, chat = catalog.resolve("vital"), catalog.resolve("chat")
    assert vital is not None and chat is not None
    chats = [await scheduler.acquire(ticket(chat)) for _ in range(2)]
    blocked = asyncio.ensure_future(scheduler.acquire(ticket(chat)))
    await scheduler.settled()
    assert not blocked.done()
    assert (await scheduler.acquire(ticket(vital))).backend is chats[0].backend
    blocked.cancel()


async def test_explain_shows_queues_backends_and_decisions(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a"), "owner": "rennes"})
    held = await scheduler.acquire(ticket(entry, org="rennes"))
    tasks = await waiting(
        scheduler, [ticket(entry, org="x", priority=3), ticket(entry, org="y", priority=3)]
    )
    report = await scheduler.explain()
    model = report["models"]["m"]
    assert model["queue"] == {"3": {"x": 1, "y": 1}} and model["waiting"] == 2
    assert model["recent_decisions"][-1]["organisation"] == "rennes"
    backend = report["backends"]["a.example:8000"]
    assert (
        backend["in_flight"] == 1
        and backend["circuit"] == "closed"
        and backend["owner"] == "rennes"
    )
    for task in tasks:
        task.cancel()
    scheduler.release(held, ok=True)


async def test_latency_strategy_spreads_load_in_proportion_to_speed(engine: Engine) -> None:
    scheduler, entry = setup(
        engine,
        {"url": url("fast"), "max_concurrency": 20},
        {"url": url("slow"), "max_concurrency": 20},
        routing_strategy="latency",
    )
    fast, slow = entry.backends
    fast.observe_ttft(0.1)
    slow.observe_ttft(0.21)  # about twice as slow (no exact ties)
    leases = [await scheduler.acquire(ticket(entry)) for _ in range(12)]
    assert fast.in_flight == 8 and slow.in_flight == 4  # no herding onto the fastest
    for lease in leases:
        scheduler.release(lease, ok=True)


# --- catalog changes ----------------------------------------------------------------------------


async def test_catalog_changed_reindexes_models_and_keeps_queues_and_leases(engine: Engine) -> None:
    scheduler, entry = setup(engine, {"url": url("a")})
    held = await scheduler.acquire(ticket(entry))
    (waiter,) = await waiting(scheduler, [ticket(entry)])
    config = parse_config(
        {
            "models": [
                {"name": "m", "servers": [{"url": url("a"), "max_concurrency": 1}]},
                {"name": "n", "servers": [{"url": url("b"), "max_concurrency": 1}]},
            ]
        }
    )
    catalog = Catalog.from_config(config)
    new_m, new_n = catalog.resolve("m"), catalog.resolve("n")
    assert new_m is not None and new_n is not None
    scheduler.catalog = catalog
    scheduler.catalog_changed()
    assert not waiter.done()  # still in line: the new backend "a" is a new object, empty
    assert set((await scheduler.explain())["models"]) == {"m", "n"}
    lease_n = await scheduler.acquire(ticket(new_n))  # a model that did not exist before
    assert lease_n.backend.name == "b.example:8000"
    scheduler.release(held, ok=True)  # a lease from before the change still ends cleanly
    assert held.backend.in_flight == 0
    scheduler.catalog = Catalog.from_config(parse_config({"models": []}))
    scheduler.catalog_changed()
    with pytest.raises(NoBackendAvailable):
        await waiter  # its model is gone
