"""API keys in the database: creation, lookup by hash, listing and revocation.

Keys are never deleted, only revoked: usage rows keep pointing at them, and a
revoked key must stay recognisable (its prefix and name) in listings.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, insert, select, update

from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.auth.keys import generate_key
from aiguillage.dispatch.tickets import RoutingMode
from aiguillage.store.changes import Change, announce
from aiguillage.store.database import Database
from aiguillage.store.tables import api_keys, as_utc

MAX_PRIORITY = 1000
MAX_TEXT_LENGTH = 255


ROUTING_MODES = tuple(mode.value for mode in RoutingMode)


@dataclass(frozen=True, slots=True)
class _NewKey:
    name: str
    organisation: str
    priority: int
    queue_threshold: int
    allowed_models: builtins.list[str] | None
    is_admin: bool
    expires_at: datetime | None
    routing_mode: str


class KeyRepository:
    """The `api_keys` table, seen as `ApiKeyRecord`s. Datetimes come back in UTC."""

    def __init__(self, db: Database) -> None:
        self._engine = db.engine

    async def create(
        self,
        *,
        name: str,
        organisation: str,
        priority: int = 0,
        queue_threshold: int = 100,
        allowed_models: Sequence[str] | None = None,
        is_admin: bool = False,
        expires_at: datetime | None = None,
        routing_mode: str = "any",
    ) -> tuple[str, ApiKeyRecord]:
        """Store a new key; returns its secret (shown once, never stored) and its record.

        Raises `ValueError` for settings that make no sense, before touching the database.
        """
        new = _validate(
            name,
            organisation,
            priority,
            queue_threshold,
            allowed_models,
            is_admin,
            expires_at,
            routing_mode,
        )
        key = generate_key()
        async with self._engine.begin() as connection:
            result = await connection.execute(
                insert(api_keys)
                .values(
                    name=new.name,
                    organisation=new.organisation,
                    prefix=key.prefix,
                    key_hash=key.hash,
                    priority=new.priority,
                    queue_threshold=new.queue_threshold,
                    allowed_models=new.allowed_models,
                    is_admin=new.is_admin,
                    expires_at=new.expires_at,
                    revoked=False,
                    revoked_at=None,
                    created_at=datetime.now(UTC),
                    routing_mode=new.routing_mode,
                )
                .returning(*api_keys.c)
            )
            record = _record(result.one())
        return key.secret, record

    async def get_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this secret hash, revoked or expired ones included (the caller decides)."""
        async with self._engine.connect() as connection:
            result = await connection.execute(
                select(api_keys).where(api_keys.c.key_hash == key_hash)
            )
            row = result.first()
        return None if row is None else _record(row)

    async def get(self, key_id: int) -> ApiKeyRecord | None:
        """The key with this id, if there is one."""
        async with self._engine.connect() as connection:
            result = await connection.execute(select(api_keys).where(api_keys.c.id == key_id))
            row = result.first()
        return None if row is None else _record(row)

    async def list(self, include_revoked: bool = True) -> builtins.list[ApiKeyRecord]:
        """Every key, oldest first."""
        query = select(api_keys).order_by(api_keys.c.id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked.is_(False))
        async with self._engine.connect() as connection:
            result = await connection.execute(query)
            return [_record(row) for row in result]

    async def revoke(self, key_id: int) -> bool:
        """Revoke a key; False if there is no such key. Revoking twice keeps the first date."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked.is_(False))
                .values(revoked=True, revoked_at=datetime.now(UTC))
                .returning(api_keys.c.key_hash)
            )
            key_hash = result.scalar()
            if key_hash is not None:  # every replica drops it from its key cache
                await announce(connection, Change("key_revoked", key_hash))
                return True
            found = await connection.scalar(select(api_keys.c.id).where(api_keys.c.id == key_id))
            return found is not None


def _validate(
    name: str,
    organisation: str,
    priority: int,
    queue_threshold: int,
    allowed_models: Sequence[str] | None,
    is_admin: bool,
    expires_at: datetime | None,
    routing_mode: str = "any",
) -> _NewKey:
    """The settings of a new key, checked and normalised, or a `ValueError` naming the field."""
    name, organisation = name.strip(), organisation.strip()
    for field, value in (("name", name), ("organisation", organisation)):
        if not value:
            raise ValueError(f"{field} must not be empty")
        if len(value) > MAX_TEXT_LENGTH:
            raise ValueError(f"{field} is longer than {MAX_TEXT_LENGTH} characters")
    if not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be between 0 and {MAX_PRIORITY}, got {priority}")
    if queue_threshold < 0:
        raise ValueError(f"queue_threshold must be 0 or more, got {queue_threshold}")
    models: builtins.list[str] | None = None
    if allowed_models is not None:
        if isinstance(allowed_models, str):  # a str is a Sequence[str]: catch the slip
            raise ValueError("allowed_models must be a list of model names, not one string")
        models = list(dict.fromkeys(model.strip() for model in allowed_models))
        if not models or not all(models):
            raise ValueError("allowed_models must hold non-empty model names (None: every model)")
    if routing_mode not in ROUTING_MODES:
        raise ValueError(
            f"routing_mode must be one of {', '.join(ROUTING_MODES)}, got {routing_mode!r}"
        )
    return _NewKey(
        routing_mode=routing_mode,
        name=name,
        organisation=organisation,
        priority=priority,
        queue_threshold=queue_threshold,
        allowed_models=models,
        is_admin=is_admin,
        expires_at=None if expires_at is None else as_utc(expires_at),
    )


def _record(row: Row[Any]) -> ApiKeyRecord:
    allowed = row.allowed_models
    return ApiKeyRecord(
        id=row.id,
        name=row.name,
        organisation=row.organisation,
        prefix=row.prefix,
        priority=row.priority,
        queue_threshold=row.queue_threshold,
        allowed_models=None if allowed is None else tuple(allowed),
        is_admin=bool(row.is_admin),
        expires_at=row.expires_at,
        revoked=bool(row.revoked),
        created_at=row.created_at,
        routing_mode=row.routing_mode,
    )
