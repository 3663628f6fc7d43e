"""OAuth2 clients and their access tokens in the database (secrets as hashes only)."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update

from aiguillage.auth.keys import hash_key
from aiguillage.auth.oauth import (
    ALL_SCOPES,
    AccessToken,
    Caller,
    NewClientSecrets,
    OAuthClient,
    new_client_secrets,
)
from aiguillage.store.database import Database
from aiguillage.store.keys import MAX_PRIORITY, MAX_TEXT_LENGTH
from aiguillage.store.tables import oauth_clients, oauth_tokens


class OAuthRepository:
    """Clients are created by an operator (CLI); tokens by `POST /oauth/token`."""

    def __init__(self, db: Database) -> None:
        self._engine = db.engine

    async def create_client(
        self, *, name: str, organisation: str, priority: int = 0
    ) -> tuple[NewClientSecrets, OAuthClient]:
        """A new client; its secrets are returned this once and only their use is stored.

        Raises `ValueError` for settings that make no sense.
        """
        name, organisation = name.strip(), organisation.strip()
        for label, value in (("name", name), ("organisation", organisation)):
            if not value or len(value) > MAX_TEXT_LENGTH:
                raise ValueError(f"{label} must hold 1 to {MAX_TEXT_LENGTH} characters")
        if not 0 <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be between 0 and {MAX_PRIORITY}, got {priority}")
        secrets = new_client_secrets()
        created_at = datetime.now(UTC)
        values = {
            "client_id": secrets.client_id,
            "name": name,
            "organisation": organisation,
            "priority": priority,
            "scopes": list(ALL_SCOPES),
            "webhook_secret": secrets.webhook_secret,
            "revoked": False,
            "created_at": created_at,
        }
        async with self._engine.begin() as connection:
            result = await connection.execute(
                insert(oauth_clients)
                .values(secret_hash=secrets.secret_hash, **values)
                .returning(oauth_clients.c.id)
            )
            client_pk = int(result.scalar_one())
        return secrets, _client({"id": client_pk, **values})

    async def authenticate_client(self, client_id: str, client_secret: str) -> OAuthClient | None:
        """The active client with these credentials, or None (unknown, wrong secret, revoked)."""
        async with self._engine.connect() as connection:
            row = (
                await connection.execute(
                    select(oauth_clients).where(oauth_clients.c.client_id == client_id)
                )
            ).first()
        if row is None or row.revoked:
            return None
        if not hmac.compare_digest(row.secret_hash, hash_key(client_secret)):
            return None
        return _client(row._asdict())

    async def revoke_client(self, client_id: str) -> bool:
        """Revoke a client and drop its tokens at once; False if there is no such client."""
        async with self._engine.begin() as connection:
            client_pk = await connection.scalar(
                select(oauth_clients.c.id).where(oauth_clients.c.client_id == client_id)
            )
            if client_pk is None:
                return False
            await connection.execute(
                update(oauth_clients).where(oauth_clients.c.id == client_pk).values(revoked=True)
            )
            await connection.execute(delete(oauth_tokens).where(oauth_tokens.c.client == client_pk))
        return True

    async def store_token(self, client: OAuthClient, token: AccessToken) -> None:
        """Keep a token's hash until it expires; expired tokens are purged on the way."""
        now = datetime.now(UTC)
        async with self._engine.begin() as connection:
            await connection.execute(delete(oauth_tokens).where(oauth_tokens.c.expires_at < now))
            await connection.execute(
                insert(oauth_tokens).values(
                    token_hash=token.token_hash,
                    client=client.id,
                    scopes=list(token.scopes),
                    expires_at=now + timedelta(seconds=token.expires_in),
                    created_at=now,
                )
            )

    async def caller(self, token: str) -> Caller | None:
        """The client and scopes behind a bearer token, if known, unexpired and not revoked."""
        query = (
            select(oauth_clients, oauth_tokens.c.scopes.label("token_scopes"))
            .join(oauth_tokens, oauth_tokens.c.client == oauth_clients.c.id)
            .where(
                oauth_tokens.c.token_hash == hash_key(token),
                oauth_tokens.c.expires_at > datetime.now(UTC),
                oauth_clients.c.revoked.is_(False),
            )
        )
        async with self._engine.connect() as connection:
            row = (await connection.execute(query)).first()
        if row is None:
            return None
        values = row._asdict()
        return Caller(client=_client(values), scopes=tuple(values["token_scopes"]))


def _client(data: dict[str, Any]) -> OAuthClient:
    return OAuthClient(
        id=data["id"],
        client_id=data["client_id"],
        name=data["name"],
        organisation=data["organisation"],
        priority=data["priority"],
        scopes=tuple(data["scopes"]),
        webhook_secret=data["webhook_secret"],
        revoked=bool(data["revoked"]),
        created_at=data["created_at"],
    )
