"""Servers added to or removed from models at run time, shared by every replica.

The configuration file stays the base; these rows are applied on top of it,
so a replica that starts later or restarts sees the same catalog as the others.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select

from aiguillage.catalog.config import ServerConfig
from aiguillage.store.changes import Change, announce
from aiguillage.store.database import Database
from aiguillage.store.tables import catalog_servers

CATALOG_CHANGED = Change("catalog")


class ServerOverrides:
    """Per model and server URL: a `ServerConfig` to add, or None for "removed"."""

    def __init__(self, db: Database) -> None:
        self._engine = db.engine

    async def put(self, model: str, url: str, server: ServerConfig | None) -> None:
        """Record that `model` gains `server` (None: loses the server at `url`); notify."""
        async with self._engine.begin() as connection:
            await connection.execute(
                delete(catalog_servers).where(
                    catalog_servers.c.model == model, catalog_servers.c.url == url
                )
            )
            await connection.execute(
                insert(catalog_servers).values(
                    model=model,
                    url=url,
                    config=None if server is None else _as_document(server),
                    updated_at=datetime.now(UTC),
                )
            )
            await announce(connection, CATALOG_CHANGED)

    async def all(self) -> dict[str, dict[str, ServerConfig | None]]:
        """model -> url -> server (None where removed)."""
        async with self._engine.connect() as connection:
            rows = (await connection.execute(select(catalog_servers))).all()
        found: dict[str, dict[str, ServerConfig | None]] = {}
        for row in rows:
            config = None if row.config is None else ServerConfig.model_validate(row.config)
            found.setdefault(row.model, {})[row.url] = config
        return found


def _as_document(server: ServerConfig) -> dict[str, Any]:
    """The server as JSON, its token included (the gateway needs it to call the server)."""
    document = server.model_dump(mode="json", exclude={"token"})
    if server.token is not None:
        document["token"] = server.token.get_secret_value()
    return document
