"""The usage ledger's table: batched inserts from the ledger, and reads for reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from sqlalchemy import Row, func, insert, select

from aiguillage.accounting.usage import UsageRecord, UsageSource
from aiguillage.store.database import Database
from aiguillage.store.tables import usage

_FIELDS = tuple(field.name for field in fields(UsageRecord))


class UsageRepository:
    """The `usage` table, seen as `UsageRecord`s. Datetimes come back in UTC."""

    def __init__(self, db: Database) -> None:
        self._engine = db.engine
        self._insert = insert(usage)

    async def insert_many(self, records: Sequence[UsageRecord]) -> None:
        """Write a batch in one transaction, as one executemany: all rows or none."""
        if not records:
            return
        rows = [_row(record) for record in records]
        async with self._engine.begin() as connection:
            await connection.execute(self._insert, rows)

    async def count(self) -> int:
        """How many rows the ledger holds."""
        async with self._engine.connect() as connection:
            return int(await connection.scalar(select(func.count()).select_from(usage)) or 0)

    async def recent(self, limit: int = 100) -> list[UsageRecord]:
        """The last `limit` rows written, newest first."""
        query = select(*(usage.c[name] for name in _FIELDS)).order_by(usage.c.id.desc())
        async with self._engine.connect() as connection:
            result = await connection.execute(query.limit(limit))
            return [_record(row) for row in result]


def _row(record: UsageRecord) -> dict[str, Any]:
    row = {name: getattr(record, name) for name in _FIELDS}
    row["usage_source"] = UsageSource(record.usage_source).value
    return row


def _record(row: Row[Any]) -> UsageRecord:
    values = row._asdict()
    values["usage_source"] = UsageSource(values["usage_source"])
    values["stream"] = bool(values["stream"])
    values["cancelled"] = bool(values["cancelled"])
    return UsageRecord(**values)
