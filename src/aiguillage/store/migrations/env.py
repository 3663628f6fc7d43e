"""Alembic's entry point, for Aiguillage's own migrations.

`Database.upgrade()` runs it with its own connection, already inside a
transaction (see store/database.py). Without one, as when a developer
autogenerates a new revision through `alembic_config()` with `sqlalchemy.url`
set, it connects to that URL itself. It never configures logging: the
application owns that.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from aiguillage.store.database import Database
from aiguillage.store.tables import metadata

config = context.config


def run_on(connection: Connection) -> None:
    """Run the pending migrations on an open connection."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite can only ALTER through table copies
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_on_url(url: str) -> None:
    """Connect to `url` (with the gateway's SQLite settings) and migrate in one transaction."""
    database = Database(url)
    try:
        async with database.engine.begin() as connection:
            await connection.run_sync(run_on)
    finally:
        await database.dispose()


def run_offline(url: str) -> None:
    """Write the migrations' SQL instead of running it (`alembic upgrade --sql`)."""
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


given: Connection | None = config.attributes.get("connection")
if given is not None:
    run_on(given)
else:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url, or run migrations through Database.upgrade()")
    if context.is_offline_mode():
        run_offline(url)
    else:
        asyncio.run(run_on_url(url))
