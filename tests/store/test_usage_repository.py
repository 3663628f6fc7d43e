"""Usage rows go in by batches and come back as they were, on each database."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from aiguillage.accounting.usage import UsageRecord, UsageSource
from aiguillage.store.database import Database
from aiguillage.store.usage import UsageRepository

START = datetime(2026, 11, 22, 9, 0, 0, 123456, tzinfo=UTC)


def row(number: int, **changes: Any) -> UsageRecord:
    record = UsageRecord(
        started_at=START + timedelta(seconds=number),
        request_id=f"req-{number}",
        key_id=3,
        organisation="dinum",
        model="llama-3-70b",
        backend="gpu-1",
        endpoint="/v1/chat/completions",
        status=200,
        stream=True,
        cancelled=False,
        prompt_tokens=12,
        completion_tokens=34,
        usage_source=UsageSource.ENGINE,
        ttft_ms=85.5,
        duration_ms=1234.25,
    )
    return replace(record, **changes)


async def test_insert_many_then_count_and_recent_round_trip(db: Database) -> None:
    usage = UsageRepository(db)
    records = [
        row(0),
        row(1, stream=False, ttft_ms=None, usage_source=UsageSource.ESTIMATED, cancelled=True),
        row(
            2, key_id=None, organisation=None, backend=None, status=404,
            prompt_tokens=None, completion_tokens=None, usage_source=UsageSource.NONE,
        ),
    ]  # fmt: skip
    await usage.insert_many(records)
    assert await usage.count() == 3
    back = await usage.recent()
    assert back == list(reversed(records))  # newest first, every field intact
    assert all(isinstance(record.usage_source, UsageSource) for record in back)
    assert all(record.started_at.utcoffset() == timedelta(0) for record in back)


async def test_recent_honours_its_limit(db: Database) -> None:
    usage = UsageRepository(db)
    await usage.insert_many([row(i) for i in range(10)])
    assert [record.request_id for record in await usage.recent(limit=3)] == [
        "req-9",
        "req-8",
        "req-7",
    ]


async def test_batches_accumulate(db: Database) -> None:
    usage = UsageRepository(db)
    await usage.insert_many([row(i) for i in range(1000)])
    await usage.insert_many([row(i) for i in range(500)])
    assert await usage.count() == 1500


async def test_an_empty_batch_does_nothing(db: Database) -> None:
    usage = UsageRepository(db)
    await usage.insert_many([])
    assert await usage.count() == 0


async def test_a_batch_is_one_executemany(db: Database) -> None:
    statements: list[tuple[str, bool]] = []

    def seen(*args: Any) -> None:
        statement, executemany = args[2], args[5]
        statements.append((statement.split()[0].upper(), executemany))

    event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
    try:
        await UsageRepository(db).insert_many([row(i) for i in range(50)])
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", seen)
    assert [entry for entry in statements if entry[0] == "INSERT"] == [("INSERT", True)]


async def test_a_batch_is_all_or_nothing(db: Database) -> None:
    usage = UsageRepository(db)
    await usage.insert_many([row(0)])
    broken = row(2, model=None)  # NOT NULL column
    with pytest.raises(IntegrityError):
        await usage.insert_many([row(1), broken, row(3)])
    assert await usage.count() == 1


async def test_times_in_another_zone_come_back_as_the_same_instant_in_utc(db: Database) -> None:
    usage = UsageRepository(db)
    paris = timezone(timedelta(hours=1))
    await usage.insert_many([row(0, started_at=datetime(2026, 11, 22, 10, 0, tzinfo=paris))])
    [back] = await usage.recent()
    assert back.started_at == datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
    assert back.started_at.utcoffset() == timedelta(0)


async def test_long_free_text_is_accepted(db: Database) -> None:
    """A client can send any model name: the ledger must not choke on its length."""
    usage = UsageRepository(db)
    long_name = "m" * 2000
    await usage.insert_many([row(0, model=long_name, request_id="r" * 500)])
    [back] = await usage.recent()
    assert back.model == long_name
