"""Bearer key → identity, through a TTL cache and a single in-flight lookup per key."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from aiguillage.api.errors import ApiError
from aiguillage.auth.authenticator import STALE_IF_ERROR_S, Authenticator
from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.auth.keys import hash_key

SECRET = "sk-ag-test-secret-0001"
TTL = 5.0


def record(**changes: object) -> ApiKeyRecord:
    base = ApiKeyRecord(
        id=1,
        name="ci",
        organisation="acme",
        prefix=SECRET[:12],
        priority=0,
        queue_threshold=0,
        allowed_models=None,
        is_admin=False,
        expires_at=None,
        revoked=False,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """A fake key table keyed by hash, counting lookups; can be told to fail or to block."""

    def __init__(self, rows: dict[str, ApiKeyRecord] | None = None) -> None:
        self.rows = rows if rows is not None else {hash_key(SECRET): record()}
        self.calls: list[str] = []
        self.failure: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def lookup(self, key_hash: str) -> ApiKeyRecord | None:
        self.calls.append(key_hash)
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return self.rows.get(key_hash)


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(store: Store, clock: Clock) -> Authenticator:
    return Authenticator(store.lookup, ttl_s=TTL, clock=clock)


async def refused(auth: Authenticator, header: str | None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await auth.authenticate(header)
    return caught.value


async def test_valid_key_returns_its_record(auth: Authenticator, store: Store) -> None:
    assert await auth.authenticate(f"Bearer {SECRET}") == record()
    assert store.calls == [hash_key(SECRET)]


async def test_scheme_is_case_insensitive(auth: Authenticator) -> None:
    assert (await auth.authenticate(f"bearer {SECRET}")).id == 1


@pytest.mark.parametrize("header", [None, ""])
async def test_missing_header_is_401_missing_api_key(
    auth: Authenticator, header: str | None
) -> None:
    error = await refused(auth, header)
    assert (error.status, error.code) == (401, "missing_api_key")
    assert "www-authenticate" in error.headers


@pytest.mark.parametrize("header", [f"Basic {SECRET}", SECRET, "Bearer", "Bearer   "])
async def test_non_bearer_header_is_401_invalid_authorization(
    auth: Authenticator, store: Store, header: str
) -> None:
    error = await refused(auth, header)
    assert (error.status, error.code) == (401, "invalid_authorization")
    assert store.calls == []


async def test_unknown_key_is_401_invalid_api_key(auth: Authenticator) -> None:
    error = await refused(auth, "Bearer sk-ag-nope")
    assert (error.status, error.code) == (401, "invalid_api_key")


async def test_revoked_key_is_401_revoked_api_key(store: Store, auth: Authenticator) -> None:
    store.rows[hash_key(SECRET)] = record(revoked=True)
    error = await refused(auth, f"Bearer {SECRET}")
    assert (error.status, error.code) == (401, "revoked_api_key")


async def test_expired_key_is_401_expired_api_key(store: Store, auth: Authenticator) -> None:
    store.rows[hash_key(SECRET)] = record(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    error = await refused(auth, f"Bearer {SECRET}")
    assert (error.status, error.code) == (401, "expired_api_key")


async def test_key_expiring_later_is_accepted(store: Store, auth: Authenticator) -> None:
    store.rows[hash_key(SECRET)] = record(expires_at=datetime.now(UTC) + timedelta(hours=1))
    assert (await auth.authenticate(f"Bearer {SECRET}")).id == 1


async def test_cache_hit_within_ttl_skips_lookup(
    auth: Authenticator, store: Store, clock: Clock
) -> None:
    await auth.authenticate(f"Bearer {SECRET}")
    clock.now += TTL - 0.01
    await auth.authenticate(f"Bearer {SECRET}")
    assert len(store.calls) == 1


async def test_unknown_key_is_cached_too(auth: Authenticator, store: Store) -> None:
    for _ in range(3):
        await refused(auth, "Bearer sk-ag-nope")
    assert len(store.calls) == 1


async def test_revocation_is_seen_after_ttl(
    auth: Authenticator, store: Store, clock: Clock
) -> None:
    await auth.authenticate(f"Bearer {SECRET}")
    store.rows[hash_key(SECRET)] = record(revoked=True)
    assert (await auth.authenticate(f"Bearer {SECRET}")).id == 1  # still cached
    clock.now += TTL
    error = await refused(auth, f"Bearer {SECRET}")
    assert error.code == "revoked_api_key"
    assert len(store.calls) == 2


async def test_forget_drops_the_cache(auth: Authenticator, store: Store) -> None:
    await auth.authenticate(f"Bearer {SECRET}")
    auth.forget()
    await auth.authenticate(f"Bearer {SECRET}")
    assert len(store.calls) == 2


async def test_concurrent_requests_share_one_lookup(auth: Authenticator, store: Store) -> None:
    store.gate = asyncio.Event()
    tasks = [asyncio.create_task(auth.authenticate(f"Bearer {SECRET}")) for _ in range(10)]
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.gather(*tasks)
    assert [r.id for r in results] == [1] * 10
    assert len(store.calls) == 1


async def test_lookup_failure_is_503_for_caller_and_waiters(
    auth: Authenticator, store: Store
) -> None:
    store.gate = asyncio.Event()
    store.failure = ConnectionError("db down")
    tasks = [asyncio.create_task(auth.authenticate(f"Bearer {SECRET}")) for _ in range(5)]
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, ApiError)]
    assert len(errors) == 5
    assert {(e.status, e.code) for e in errors} == {(503, "auth_unavailable")}
    assert len(store.calls) == 1


async def test_lookup_failure_is_not_cached(auth: Authenticator, store: Store) -> None:
    store.failure = ConnectionError("db down")
    assert (await refused(auth, f"Bearer {SECRET}")).status == 503
    store.failure = None
    assert (await auth.authenticate(f"Bearer {SECRET}")).id == 1
    assert len(store.calls) == 2


async def test_waiters_are_not_stranded_when_first_caller_is_cancelled(
    auth: Authenticator, store: Store
) -> None:
    store.gate = asyncio.Event()
    first = asyncio.create_task(auth.authenticate(f"Bearer {SECRET}"))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(auth.authenticate(f"Bearer {SECRET}"))
    await asyncio.sleep(0)
    first.cancel()  # e.g. its client disconnected while the database was slow
    store.gate.set()
    done, _ = await asyncio.wait({waiter}, timeout=1.0)
    waiter.cancel()
    await asyncio.gather(first, waiter, return_exceptions=True)
    assert done, "a request waiting on a cancelled lookup hangs forever"


async def test_a_known_key_keeps_working_while_the_store_is_down(
    auth: Authenticator, store: Store, clock: Clock
) -> None:
    await auth.authenticate(f"Bearer {SECRET}")
    clock.now += TTL + 30  # expired, and the database is away
    store.failure = ConnectionError("db down")
    store.gate = asyncio.Event()
    tasks = [asyncio.create_task(auth.authenticate(f"Bearer {SECRET}")) for _ in range(3)]
    await asyncio.sleep(0)
    store.gate.set()
    assert [r.id for r in await asyncio.gather(*tasks)] == [1, 1, 1]  # waiters too
    assert (await refused(auth, "Bearer sk-ag-never-seen")).code == "auth_unavailable"


async def test_a_stale_entry_is_not_used_past_its_limit(
    auth: Authenticator, store: Store, clock: Clock
) -> None:
    await auth.authenticate(f"Bearer {SECRET}")
    clock.now += TTL + STALE_IF_ERROR_S
    store.failure = ConnectionError("db down")
    assert (await refused(auth, f"Bearer {SECRET}")).code == "auth_unavailable"
