"""The schema comes from the Alembic migrations, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from aiguillage.store.database import (
    SQLITE_BUSY_TIMEOUT_MS,
    Database,
    alembic_config,
    open_database,
)
from aiguillage.store.keys import KeyRepository
from aiguillage.store.tables import metadata


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def table_names(database: Database) -> set[str]:
    async with database.engine.connect() as connection:
        names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    return set(names)


async def versions(database: Database) -> list[str]:
    async with database.engine.connect() as connection:
        result = await connection.execute(text("SELECT version_num FROM alembic_version"))
        return [row[0] for row in result]


async def test_upgrade_creates_the_schema_at_head(fresh_db: Database) -> None:
    assert await table_names(fresh_db) == set()
    await fresh_db.upgrade()
    assert {"api_keys", "usage", "alembic_version"} <= await table_names(fresh_db)
    assert await versions(fresh_db) == [head_revision()]


async def test_upgrade_is_idempotent_and_keeps_data(fresh_db: Database) -> None:
    await fresh_db.upgrade()
    _, record = await KeyRepository(fresh_db).create(name="ci", organisation="dinum")
    await fresh_db.upgrade()
    assert await versions(fresh_db) == [head_revision()]
    assert [key.id for key in await KeyRepository(fresh_db).list()] == [record.id]


async def test_upgrading_an_older_schema_keeps_its_keys(fresh_db: Database) -> None:
    """A database left at 0001 by an older release: its keys survive and get the defaults."""

    def to_0001(connection: Connection) -> None:
        command.upgrade(alembic_config(connection), "0001")

    async with fresh_db.engine.begin() as connection:
        await connection.run_sync(to_0001)
        await connection.execute(
            text(
                "INSERT INTO api_keys (name, organisation, prefix, key_hash, priority, "
                "queue_threshold, is_admin, revoked, created_at) VALUES ('old', 'o', "
                "'sk-ag-abcdef', :hash, 3, 10, false, false, :now)"
            ),
            {"hash": "f" * 64, "now": datetime(2026, 1, 1, tzinfo=UTC)},
        )
    assert await versions(fresh_db) == ["0001"]
    await fresh_db.upgrade()
    assert await versions(fresh_db) == [head_revision()]
    [record] = await KeyRepository(fresh_db).list()
    assert (record.name, record.priority, record.routing_mode) == ("old", 3, "any")
    assert record.created_at == datetime(2026, 1, 1, tzinfo=UTC)


async def test_migrations_match_the_tables_the_code_uses(db: Database) -> None:
    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    async with db.engine.connect() as connection:
        assert await connection.run_sync(differences) == []


async def test_usage_indexes_exist(db: Database) -> None:
    async with db.engine.connect() as connection:
        indexes = await connection.run_sync(lambda sync: inspect(sync).get_indexes("usage"))
    assert {index["name"]: index["column_names"] for index in indexes} == {
        "ix_usage_started_at": ["started_at"],
        "ix_usage_key_id_started_at": ["key_id", "started_at"],
        "ix_usage_organisation_started_at": ["organisation", "started_at"],
        "ix_usage_model_started_at": ["model", "started_at"],
    }


async def test_concurrent_upgrades_of_a_fresh_database_all_succeed(database_url: str) -> None:
    """Several workers starting at once: one migrates, the others wait and find it done."""
    databases = [Database(database_url) for _ in range(4)]
    try:
        await asyncio.gather(*(database.upgrade() for database in databases))
        assert await versions(databases[0]) == [head_revision()]
    finally:
        for database in databases:
            await database.dispose()


_UPGRADE_SCRIPT = """
import asyncio, os, sys, time
from aiguillage.store.database import Database

async def main() -> None:
    database = Database(sys.argv[1])
    print("ready", flush=True)
    while not os.path.exists(sys.argv[2]):  # all processes start migrating together
        time.sleep(0.001)
    try:
        await database.upgrade()
    finally:
        await database.dispose()

asyncio.run(main())
"""


async def test_upgrades_from_several_processes_at_once_all_succeed(
    database_url: str, tmp_path: Path
) -> None:
    """The database-side lock: worker processes migrating a fresh database at the same moment."""
    go = tmp_path / "go"
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _UPGRADE_SCRIPT, database_url, str(go),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(6)
    ]  # fmt: skip
    for process in processes:
        assert process.stdout is not None
        assert await process.stdout.readline() == b"ready\n"
    go.touch()
    errors = [(await process.communicate())[1].decode()[-500:] for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, errors
    database = Database(database_url)
    try:
        assert await versions(database) == [head_revision()]
    finally:
        await database.dispose()


async def test_open_database_returns_a_migrated_database(database_url: str) -> None:
    database = await open_database(database_url)
    try:
        assert await versions(database) == [head_revision()]
    finally:
        await database.dispose()


async def test_upgrade_leaves_the_logging_configuration_alone(fresh_db: Database) -> None:
    app_logger = logging.getLogger("aiguillage.test.logging")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    await fresh_db.upgrade()
    assert not app_logger.disabled  # fileConfig() would have disabled existing loggers
    assert root.handlers == handlers
    assert root.level == level


async def test_sqlite_connections_use_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'deep' / 'er' / 'x.db'}")
    try:
        await database.upgrade()
        assert (tmp_path / "deep" / "er" / "x.db").is_file()  # parent folders were made
        async with database.engine.connect() as connection:
            mode = await connection.scalar(text("PRAGMA journal_mode"))
            timeout = await connection.scalar(text("PRAGMA busy_timeout"))
        assert (mode, timeout) == ("wal", SQLITE_BUSY_TIMEOUT_MS)
    finally:
        await database.dispose()


@pytest.mark.parametrize(
    "url", ["postgresql://u@h/db", "mysql+aiomysql://u@h/db", "sqlite:///x.db", "not a url"]
)
def test_unsupported_urls_are_refused_with_a_reason(url: str) -> None:
    with pytest.raises(ValueError, match="database URL"):
        Database(url)
