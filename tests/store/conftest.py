"""Databases for the store tests: a SQLite file per test, and PostgreSQL when one is running.

PostgreSQL: one database `aiguillage_test_<hex>` per test session on the local
server (see tests/store/pg.py), dropped at the end. Each test starts from an
empty schema, so every test also runs the migrations from scratch. When no
server answers, the PostgreSQL cases are skipped and say why.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from aiguillage.store.database import Database
from tests.store import pg

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A fresh PostgreSQL database for this session (asyncpg DSN)."""
    dsn = pg.create_database()
    yield dsn
    pg.drop_database(dsn)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The SQLAlchemy URL of an empty database, on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'aiguillage.db'}"
    dsn: str = request.getfixturevalue("postgres_dsn")
    pg.empty_schema(dsn)
    return pg.sqlalchemy_url(dsn)


@pytest.fixture
async def fresh_db(database_url: str) -> AsyncIterator[Database]:
    """A `Database` on an empty database, not migrated yet."""
    database = Database(database_url)
    yield database
    await database.dispose()


@pytest.fixture
async def db(fresh_db: Database) -> Database:
    """A `Database` migrated to head."""
    await fresh_db.upgrade()
    return fresh_db
