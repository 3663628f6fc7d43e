"""API keys survive the round trip through each database, and their secrets never do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text

from aiguillage.auth.keys import hash_key
from aiguillage.store.database import Database
from aiguillage.store.keys import KeyRepository


async def raw_rows(db: Database, table: str) -> list[dict[str, Any]]:
    async with db.engine.connect() as connection:
        result = await connection.execute(text(f"SELECT * FROM {table}"))
        return [dict(row._mapping) for row in result]


def is_utc(moment: datetime | None) -> bool:
    return moment is not None and moment.utcoffset() == timedelta(0)


async def test_create_then_get_by_hash_round_trip(db: Database) -> None:
    keys = KeyRepository(db)
    expires = datetime(2031, 6, 1, 12, 30, tzinfo=UTC)
    secret, created = await keys.create(
        name="chatbot",
        organisation="dinum",
        priority=7,
        queue_threshold=40,
        allowed_models=["llama-3-70b", "mistral-small"],
        is_admin=True,
        expires_at=expires,
    )
    assert secret.startswith("sk-ag-")
    assert created.prefix == secret[:12]
    assert (created.name, created.organisation, created.priority) == ("chatbot", "dinum", 7)
    assert created.queue_threshold == 40
    assert created.allowed_models == ("llama-3-70b", "mistral-small")
    assert created.is_admin and not created.revoked
    assert created.expires_at == expires
    assert is_utc(created.created_at)
    assert abs(datetime.now(UTC) - created.created_at) < timedelta(minutes=1)

    assert await keys.get_by_hash(hash_key(secret)) == created
    assert await keys.get(created.id) == created


async def test_defaults_allow_every_model_and_store_null(db: Database) -> None:
    _, record = await KeyRepository(db).create(name="a", organisation="o")
    assert (record.priority, record.queue_threshold, record.is_admin) == (0, 100, False)
    assert record.allowed_models is None and record.may_use("any-model")
    assert record.expires_at is None
    [row] = await raw_rows(db, "api_keys")
    assert row["allowed_models"] is None  # SQL NULL, not the JSON text 'null'


async def test_unknown_hash_or_id_finds_nothing(db: Database) -> None:
    keys = KeyRepository(db)
    await keys.create(name="a", organisation="o")
    assert await keys.get_by_hash(hash_key("sk-ag-not-a-real-key")) is None
    assert await keys.get(12345) is None


async def test_the_secret_is_stored_nowhere_only_its_hash(db: Database) -> None:
    secret, record = await KeyRepository(db).create(name="a", organisation="o")
    [row] = await raw_rows(db, "api_keys")
    stored = " ".join(str(value) for value in row.values())
    assert secret not in stored
    assert secret[12:] not in stored  # nor the part the prefix does not show
    assert row["key_hash"] == hash_key(secret)
    assert row["prefix"] == record.prefix


async def test_each_key_is_distinct(db: Database) -> None:
    keys = KeyRepository(db)
    created = [await keys.create(name=f"k{i}", organisation="o") for i in range(5)]
    assert len({secret for secret, _ in created}) == 5
    assert len({record.id for _, record in created}) == 5


async def test_list_is_oldest_first_and_can_leave_revoked_keys_out(db: Database) -> None:
    keys = KeyRepository(db)
    ids = [(await keys.create(name=f"k{i}", organisation="o"))[1].id for i in range(3)]
    assert await keys.revoke(ids[1])
    listed = await keys.list()
    assert [record.id for record in listed] == ids
    assert [record.revoked for record in listed] == [False, True, False]
    assert [record.id for record in await keys.list(include_revoked=False)] == [ids[0], ids[2]]


async def test_revoke_marks_the_key_and_keeps_the_first_date(db: Database) -> None:
    keys = KeyRepository(db)
    secret, record = await keys.create(name="a", organisation="o")
    assert await keys.revoke(record.id) is True
    found = await keys.get_by_hash(hash_key(secret))
    assert found is not None and found.revoked

    first = (await raw_rows(db, "api_keys"))[0]["revoked_at"]
    assert first is not None
    assert await keys.revoke(record.id) is True  # again: still known, date unchanged
    assert (await raw_rows(db, "api_keys"))[0]["revoked_at"] == first


async def test_revoke_of_an_unknown_id_is_false(db: Database) -> None:
    keys = KeyRepository(db)
    await keys.create(name="a", organisation="o")
    assert await keys.revoke(999) is False
    assert not (await keys.list())[0].revoked


async def test_expiry_in_another_zone_is_the_same_instant_in_utc(db: Database) -> None:
    keys = KeyRepository(db)
    paris = timezone(timedelta(hours=2))
    secret, record = await keys.create(
        name="a", organisation="o", expires_at=datetime(2031, 7, 1, 14, 0, tzinfo=paris)
    )
    expected = datetime(2031, 7, 1, 12, 0, tzinfo=UTC)
    found = await keys.get_by_hash(hash_key(secret))
    assert found is not None
    for moment in (record.expires_at, found.expires_at):
        assert moment == expected and is_utc(moment)


async def test_naive_expiry_is_taken_as_utc(db: Database) -> None:
    keys = KeyRepository(db)
    secret, _ = await keys.create(name="a", organisation="o", expires_at=datetime(2031, 1, 1))
    found = await keys.get_by_hash(hash_key(secret))
    assert found is not None and found.expires_at == datetime(2031, 1, 1, tzinfo=UTC)
    assert is_utc(found.expires_at)


async def test_expired_key_is_seen_as_expired(db: Database) -> None:
    keys = KeyRepository(db)
    past = datetime.now(UTC) - timedelta(days=1)
    secret, _ = await keys.create(name="a", organisation="o", expires_at=past)
    found = await keys.get_by_hash(hash_key(secret))
    assert found is not None and found.is_expired()


async def test_timestamps_are_stored_as_utc_instants(db: Database) -> None:
    """PostgreSQL keeps the zone (timestamptz); SQLite keeps the UTC wall time."""
    paris = timezone(timedelta(hours=2))
    await KeyRepository(db).create(
        name="a", organisation="o", expires_at=datetime(2031, 7, 1, 14, 0, tzinfo=paris)
    )
    async with db.engine.connect() as connection:
        raw = await connection.scalar(text("SELECT expires_at FROM api_keys"))
        if db.is_sqlite:
            assert raw == "2031-07-01 12:00:00.000000"
        else:
            column_type = await connection.scalar(
                text(
                    "SELECT data_type FROM information_schema.columns "
                    "WHERE table_name = 'api_keys' AND column_name = 'expires_at'"
                )
            )
            assert column_type == "timestamp with time zone"
            assert raw == datetime(2031, 7, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"priority": -1}, "priority"),
        ({"priority": 1001}, "priority"),
        ({"queue_threshold": -1}, "queue_threshold"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"organisation": ""}, "organisation"),
        ({"name": "x" * 256}, "name"),
        ({"allowed_models": "llama"}, "allowed_models"),
        ({"allowed_models": []}, "allowed_models"),
        ({"allowed_models": ["ok", " "]}, "allowed_models"),
    ],
)
async def test_invalid_settings_are_refused_and_nothing_is_stored(
    db: Database, changes: dict[str, Any], message: str
) -> None:
    keys = KeyRepository(db)
    settings: dict[str, Any] = {"name": "a", "organisation": "o", **changes}
    with pytest.raises(ValueError, match=message):
        await keys.create(**settings)
    assert await keys.list() == []


async def test_boundaries_are_accepted(db: Database) -> None:
    keys = KeyRepository(db)
    _, low = await keys.create(name="a", organisation="o", priority=0, queue_threshold=0)
    _, high = await keys.create(name="b", organisation="o", priority=1000)
    assert (low.priority, low.queue_threshold, high.priority) == (0, 0, 1000)


async def test_names_are_trimmed_and_model_duplicates_dropped(db: Database) -> None:
    _, record = await KeyRepository(db).create(
        name="  bot ", organisation=" dinum", allowed_models=["a", " b", "a"]
    )
    assert (record.name, record.organisation) == ("bot", "dinum")
    assert record.allowed_models == ("a", "b")
