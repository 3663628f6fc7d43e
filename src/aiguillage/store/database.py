"""The database connection, and migrating it to the latest schema.

One `Database` per process wraps an async SQLAlchemy engine. SQLite (the
embedded setup) and PostgreSQL (the shared one) are supported.

Migrations run in-process through Alembic's API on the engine's own
connection: no subprocess, no alembic.ini, and Alembic never touches the
application's logging configuration. Several processes may start at once (one
per worker), so the migration takes a lock first: an advisory lock on
PostgreSQL, `BEGIN IMMEDIATE` on SQLite. The others wait, then find the schema
at head and do nothing. Within a process, an asyncio lock also keeps two
upgrades from interleaving in Alembic's global state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")
# SQLite has one writer at a time: processes migrating together, or workers claiming jobs,
# wait for the lock; 5 s proved too short when several start at once on a busy machine.
SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_UPGRADE_ATTEMPTS = 5
PG_CONNECT_TIMEOUT_S = 10.0
# Any fixed 64-bit number: every Aiguillage process takes this lock to migrate.
_PG_MIGRATION_LOCK = 0x41_49_47_55_49_4C_4C_41  # "AIGUILLA"
_IMMEDIATE = "aiguillage_sqlite_begin_immediate"
_ALEMBIC_LOCKS: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = WeakKeyDictionary()


class Database:
    """An async engine on one database, set up for how the gateway uses it."""

    def __init__(self, url: str) -> None:
        self.url: URL = parse_database_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            _make_parent_dirs(self.url)
            self.engine: AsyncEngine = create_async_engine(self.url)
            _tune_sqlite(self.engine)
        else:
            # pool_pre_ping: a PostgreSQL restart must not fail the next requests;
            # the timeout: an unreachable server must fail fast, not after asyncpg's 60 s.
            self.engine = create_async_engine(
                self.url,
                pool_pre_ping=True,
                connect_args={"timeout": PG_CONNECT_TIMEOUT_S},
            )

    @property
    def display_url(self) -> str:
        """The URL with any password masked, for messages and logs."""
        return self.url.render_as_string(hide_password=True)

    async def upgrade(self) -> None:
        """Migrate the database to the latest schema (Alembic `upgrade head`); idempotent.

        On SQLite, processes starting together can still be refused the lock at once
        (SQLite answers "database is locked" without waiting when waiting could deadlock,
        e.g. while another process switches a new file to WAL): the upgrade, being
        idempotent, is then simply tried again.
        """
        for attempt in range(SQLITE_UPGRADE_ATTEMPTS if self.is_sqlite else 1):
            try:
                await self._upgrade_once()
                return
            except OperationalError as error:
                if "locked" not in str(error) or attempt == SQLITE_UPGRADE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _upgrade_once(self) -> None:
        async with _alembic_lock(), self.engine.connect() as connection:
            if self.is_sqlite:
                connection = await connection.execution_options(**{_IMMEDIATE: True})
            async with connection.begin():
                if not self.is_sqlite:
                    await connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
                    )
                await connection.run_sync(_upgrade_head)

    @asynccontextmanager
    async def begin_write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that holds the write lock from its first statement on SQLite.

        SQLite's default BEGIN takes the lock at the first write, so two processes
        could both read the same row before either writes it; BEGIN IMMEDIATE makes
        read-then-update sequences (a worker claiming a job) atomic across processes.
        On PostgreSQL it is an ordinary transaction: callers lock rows themselves.
        """
        async with self.engine.connect() as connection:
            if self.is_sqlite:
                connection = await connection.execution_options(**{_IMMEDIATE: True})
            async with connection.begin():
                yield connection

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


async def open_database(url: str) -> Database:
    """A database migrated to the latest schema, ready to use."""
    database = Database(url)
    try:
        await database.upgrade()
    except BaseException:
        await database.dispose()
        raise
    return database


def parse_database_url(url: str) -> URL:
    """The URL, if it names a supported async driver; a `ValueError` that says why if not."""
    try:
        parsed = make_url(url)
    except Exception:  # the message of ArgumentError would repeat the URL and its password
        raise ValueError("the database URL cannot be parsed") from None
    if parsed.drivername not in SUPPORTED_DRIVERS:
        raise ValueError(
            f"unsupported database URL driver {parsed.drivername!r}: expected "
            "'sqlite+aiosqlite:///PATH' or 'postgresql+asyncpg://USER@HOST/DB'"
        )
    return parsed


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code: the migration scripts ship in the package.

    With a `connection`, env.py migrates through it. Without one (a developer
    running `alembic revision --autogenerate` through this config), env.py
    connects to `sqlalchemy.url`, which the caller must set.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _alembic_lock() -> asyncio.Lock:
    """This event loop's lock around Alembic, whose `context` is process-global state.

    Two upgrades interleaving on one loop (two databases, or a test starting
    several workers) would otherwise clobber each other's migration context.
    """
    return _ALEMBIC_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())


def _upgrade_head(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


def _make_parent_dirs(url: URL) -> None:
    """Create the folder of a SQLite file, so that a fresh machine needs no setup."""
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _tune_sqlite(engine: AsyncEngine) -> None:
    """WAL, a busy timeout and real transactions on every SQLite connection.

    WAL lets the ledger write while keys are read; the busy timeout makes a
    second process wait for the write lock instead of failing at once. The
    driver's own transaction handling is turned off so that SQLAlchemy's
    BEGIN covers reads and DDL too, and a migration can ask for BEGIN IMMEDIATE.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")  # safe with WAL, much faster commits
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
