"""Servers added to or removed from models at run time, shared by every replica.

The configuration file stays the base; these rows are applied on top of it,
so a replica that starts later or restarts sees the same catalog as the others.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select

from aiguillage.catalog.config import ServerConfig
from aiguillage.store.changes import Change, announce
from aiguillage.store.database import Database
from aiguillage.store.sealing import Sealer, SecretsKeyMissing, UnreadableSecret
from aiguillage.store.tables import catalog_servers

CATALOG_CHANGED = Change("catalog")
SEALED_TOKEN = "sealed_token"  # the document's field for the server's token, sealed

log = logging.getLogger(__name__)


class ServerOverrides:
    """Per model and server URL: a `ServerConfig` to add, or None for "removed".

    A server's token is stored sealed by `sealer` (store/sealing.py); without one,
    a server with a token is refused rather than stored readable.
    """

    def __init__(self, db: Database, sealer: Sealer | None = None) -> None:
        self._engine = db.engine
        self._sealer = sealer

    async def put(self, model: str, url: str, server: ServerConfig | None) -> None:
        """Record that `model` gains `server` (None: loses the server at `url`); notify.

        Raises `SecretsKeyMissing` for a server with a token when there is no sealer.
        """
        document = None if server is None else self._as_document(server)
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
                    config=document,
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
            try:
                config = None if row.config is None else self._from_document(row.config)
            except (SecretsKeyMissing, UnreadableSecret) as error:
                log.error("server %s of model %s left out: %s", row.url, row.model, error)
                continue
            found.setdefault(row.model, {})[row.url] = config
        return found

    def _as_document(self, server: ServerConfig) -> dict[str, Any]:
        """The server as JSON, its token sealed (the gateway needs it to call the server)."""
        document = server.model_dump(mode="json", exclude={"token"})
        if server.token is not None:
            if self._sealer is None:
                raise SecretsKeyMissing(
                    "this gateway has no secrets_key to store the server's token with "
                    "(set secrets_key or AIGUILLAGE_SECRETS_KEY)"
                )
            document[SEALED_TOKEN] = self._sealer.seal(server.token.get_secret_value())
        return document

    def _from_document(self, document: dict[str, Any]) -> ServerConfig:
        fields = dict(document)
        sealed = fields.pop(SEALED_TOKEN, None)
        if sealed is not None:
            if self._sealer is None:
                raise SecretsKeyMissing("its token is sealed and this gateway has no secrets_key")
            fields["token"] = self._sealer.open(sealed)
        return ServerConfig.model_validate(fields)
