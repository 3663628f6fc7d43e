"""Throwaway PostgreSQL databases on the local server, for tests on the real thing.

The server is the local one (trust auth, user postgres); set
$AIGUILLAGE_TEST_POSTGRES_DSN to use another admin DSN. When none answers,
`create_database()` skips the calling test and says why.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest

T = TypeVar("T")

ADMIN_DSN = os.environ.get(
    "AIGUILLAGE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def run_in_thread(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a loop of its own, whether or not the caller is inside one."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coroutine)
        except BaseException as error:
            box["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


async def _execute(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def fetch(dsn: str, query: str, *args: Any) -> list[dict[str, Any]]:
    """Rows of a query, read with asyncpg directly (not through the code under test)."""
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        return [dict(row) for row in await connection.fetch(query, *args)]
    finally:
        await connection.close()


def create_database() -> str:
    """A new empty database `aiguillage_test_<hex>`; its asyncpg DSN."""
    name = f"aiguillage_test_{secrets.token_hex(6)}"
    try:
        run_in_thread(_execute(ADMIN_DSN, f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as error:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {error}")
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + name


def drop_database(dsn: str) -> None:
    name = dsn.rsplit("/", 1)[1]
    run_in_thread(_execute(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def empty_schema(dsn: str) -> None:
    """Drop every table (alembic_version too), so that migrations start from nothing."""
    run_in_thread(_execute(dsn, "DROP SCHEMA public CASCADE; CREATE SCHEMA public;"))


def sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
