"""Round-robin choice of a backend: turns, capacity, health, exclusions, leases."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.backends.backend import Backend
from aiguillage.catalog.catalog import ModelEntry
from aiguillage.catalog.config import ServerConfig
from aiguillage.dispatch.dispatcher import Lease, NoBackendAvailable, RoundRobinDispatcher

IDENTITY = ApiKeyRecord(
    id=1,
    name="k",
    organisation="o",
    prefix="sk-ag-abcdef",
    priority=0,
    queue_threshold=0,
    allowed_models=None,
    is_admin=False,
    expires_at=None,
    revoked=False,
    created_at=datetime(2026, 1, 1, tzinfo=UTC),
)


def backend(host: str, max_concurrency: int = 4) -> Backend:
    config = ServerConfig(url=f"http://{host}:8000/v1", max_concurrency=max_concurrency)
    return Backend(config, connect_timeout_s=1.0, read_timeout_s=1.0)


def model(*backends: Backend, name: str = "m") -> ModelEntry:
    return ModelEntry(
        name=name,
        served_name=name,
        aliases=(),
        owned_by="test",
        routing_strategy="round-robin",
        backends=backends,
    )


def test_round_robin_cycles_evenly() -> None:
    a, b, c = backend("a"), backend("b"), backend("c")
    entry, rr = model(a, b, c), RoundRobinDispatcher()
    picks = [rr.choose(entry) for _ in range(9)]
    assert picks[:3] == [a, b, c]
    assert picks[3:6] == [a, b, c]
    assert Counter(picks) == {a: 3, b: 3, c: 3}


def test_each_model_has_its_own_turn() -> None:
    a, b = backend("a"), backend("b")
    rr = RoundRobinDispatcher()
    assert rr.choose(model(a, b, name="x")) is a
    assert rr.choose(model(a, b, name="y")) is a
    assert rr.choose(model(a, b, name="x")) is b


async def test_lease_counts_in_flight_and_releases_once() -> None:
    a = backend("a")
    lease = Lease(a)
    assert a.in_flight == 1
    lease.release()
    lease.release()
    assert a.in_flight == 0
    assert lease.released is True


async def test_acquire_returns_a_lease_on_the_chosen_backend() -> None:
    a, b = backend("a"), backend("b")
    lease = await RoundRobinDispatcher().acquire(model(a, b), IDENTITY, 0)
    assert lease.backend is a
    assert (a.in_flight, b.in_flight) == (1, 0)


async def test_backend_at_capacity_is_skipped() -> None:
    a, b = backend("a", max_concurrency=1), backend("b", max_concurrency=10)
    entry, rr = model(a, b), RoundRobinDispatcher()
    first = await rr.acquire(entry, IDENTITY, 0)
    assert first.backend is a
    leases = [await rr.acquire(entry, IDENTITY, 0) for _ in range(4)]
    assert all(lease.backend is b for lease in leases)
    first.release()
    rr.choose(entry)  # b's turn
    assert rr.choose(entry) is a  # a has room again


def test_unhealthy_backend_is_skipped_while_a_healthy_one_exists() -> None:
    a, b = backend("a"), backend("b")
    a.mark_down("connection refused")
    entry, rr = model(a, b), RoundRobinDispatcher()
    assert [rr.choose(entry) for _ in range(4)] == [b, b, b, b]


def test_unhealthy_backend_is_used_when_nothing_else_remains() -> None:
    a, b = backend("a"), backend("b")
    a.mark_down("down")
    b.mark_down("down")
    assert RoundRobinDispatcher().choose(model(a, b)) in (a, b)


def test_unhealthy_backend_is_used_when_the_healthy_one_is_excluded() -> None:
    a, b = backend("a"), backend("b")
    b.mark_down("down")
    assert RoundRobinDispatcher().choose(model(a, b), exclude={a}) is b


def test_backend_back_up_is_chosen_again() -> None:
    a, b = backend("a"), backend("b")
    a.mark_down("down")
    entry, rr = model(a, b), RoundRobinDispatcher()
    assert rr.choose(entry) is b
    a.mark_up()
    assert a in {rr.choose(entry), rr.choose(entry)}


def test_excluded_backends_are_never_chosen() -> None:
    a, b, c = backend("a"), backend("b"), backend("c")
    entry, rr = model(a, b, c), RoundRobinDispatcher()
    assert {rr.choose(entry, exclude=[a, c]) for _ in range(6)} == {b}


async def test_all_excluded_raises_no_backend_available() -> None:
    a, b = backend("a"), backend("b")
    with pytest.raises(NoBackendAvailable):
        await RoundRobinDispatcher().acquire(model(a, b), IDENTITY, 0, exclude=(a, b))
    assert (a.in_flight, b.in_flight) == (0, 0)
