"""Change notices: sent with the change's commit, never without it."""

from __future__ import annotations

import asyncio

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import update

from aiguillage.auth.keys import hash_key
from aiguillage.store.changes import CHANNEL, Change, ChangeListener, announce, parse_change
from aiguillage.store.database import Database
from aiguillage.store.keys import KeyRepository
from aiguillage.store.servers import ServerOverrides
from aiguillage.store.tables import api_keys


def test_a_malformed_notice_is_ignored() -> None:
    assert parse_change('{"kind": "catalog"}') == Change("catalog")
    assert parse_change('{"kind": "key_revoked", "key_hash": "ab"}') == Change("key_revoked", "ab")
    assert parse_change("not json") is None
    assert parse_change('{"no": "kind"}') is None


@pytest.fixture
async def pg_db(postgres_dsn: str) -> Database:
    from tests.store import pg

    pg.empty_schema(postgres_dsn)
    database = Database(pg.sqlalchemy_url(postgres_dsn))
    await database.upgrade()
    return database


async def test_a_notice_is_heard_only_when_the_change_commits(
    pg_db: Database, postgres_dsn: str
) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(postgres_dsn)
    await listener.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[-1]))
    try:
        keys = KeyRepository(pg_db)
        secret, record = await keys.create(name="k", organisation="o")
        key_hash = hash_key(secret)
        async with pg_db.engine.connect() as connection, connection.begin() as transaction:
            await connection.execute(update(api_keys).values(revoked=True))
            await announce(connection, Change("key_revoked", key_hash))
            await transaction.rollback()  # a change that never happened: no notice
        await asyncio.sleep(0.3)
        assert heard.empty()
        assert await keys.revoke(record.id)
        payload = await asyncio.wait_for(heard.get(), 5)
        assert parse_change(payload) == Change("key_revoked", key_hash)
        assert await keys.revoke(record.id)  # already revoked: nothing new to say
        await asyncio.sleep(0.3)
        assert heard.empty()
    finally:
        await listener.close()
        await pg_db.dispose()


async def test_the_listener_resyncs_at_connection_and_passes_notices_on(
    pg_db: Database,
) -> None:
    changes: list[Change] = []
    resyncs: list[int] = []

    async def resync() -> None:
        resyncs.append(1)

    listener = ChangeListener(pg_db.url, changes.append, resync)
    listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        assert resyncs == [1]
        await ServerOverrides(pg_db).put("m", "http://x:1", None)
        for _ in range(100):
            if changes:
                break
            await asyncio.sleep(0.05)
        assert changes == [Change("catalog")]
    finally:
        await listener.stop()
        await pg_db.dispose()
