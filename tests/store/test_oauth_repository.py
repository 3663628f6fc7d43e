"""OAuth2 clients and tokens in the database: hashed secrets, expiry, revocation; both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from aiguillage.auth.keys import hash_key
from aiguillage.auth.oauth import SCOPE_READ, granted_scopes, new_access_token
from aiguillage.store.database import Database
from aiguillage.store.oauth import OAuthRepository
from aiguillage.store.tables import oauth_clients, oauth_tokens


async def test_a_client_authenticates_with_its_secret_only(db: Database) -> None:
    repo = OAuthRepository(db)
    secrets, client = await repo.create_client(name="pod", organisation="univ", priority=4)
    found = await repo.authenticate_client(secrets.client_id, secrets.client_secret)
    assert found is not None and (found.id, found.priority) == (client.id, 4)
    assert await repo.authenticate_client(secrets.client_id, "ags-wrong") is None
    assert await repo.authenticate_client("agc-unknown", secrets.client_secret) is None
    async with db.engine.connect() as connection:
        stored = (await connection.execute(select(oauth_clients))).one()
    assert stored.secret_hash == hash_key(secrets.client_secret)
    assert secrets.client_secret not in str(stored)


async def test_tokens_are_stored_hashed_with_their_scopes(db: Database) -> None:
    repo = OAuthRepository(db)
    _, client = await repo.create_client(name="pod", organisation="univ")
    token = new_access_token((SCOPE_READ,), ttl_s=60)
    await repo.store_token(client, token)
    caller = await repo.caller(token.token)
    assert caller is not None and caller.client.id == client.id
    assert caller.may(SCOPE_READ) and not caller.may("transcriptions:write")
    async with db.engine.connect() as connection:
        hashes = (await connection.execute(select(oauth_tokens.c.token_hash))).scalars().all()
    assert hashes == [hash_key(token.token)]
    assert await repo.caller("agt-unknown") is None


async def test_expired_tokens_and_revoked_clients_stop_working(db: Database) -> None:
    repo = OAuthRepository(db)
    secrets, client = await repo.create_client(name="pod", organisation="univ")
    expired = new_access_token((SCOPE_READ,), ttl_s=-1)
    live = new_access_token((SCOPE_READ,), ttl_s=60)
    await repo.store_token(client, expired)
    await repo.store_token(client, live)
    assert await repo.caller(expired.token) is None
    assert await repo.revoke_client(secrets.client_id)
    assert await repo.caller(live.token) is None
    assert await repo.authenticate_client(secrets.client_id, secrets.client_secret) is None
    assert not await repo.revoke_client("agc-unknown")


async def test_bad_client_settings_are_refused(db: Database) -> None:
    repo = OAuthRepository(db)
    with pytest.raises(ValueError, match="priority"):
        await repo.create_client(name="pod", organisation="univ", priority=-1)
    with pytest.raises(ValueError, match="name"):
        await repo.create_client(name=" ", organisation="univ")


def test_scopes_granted_are_those_asked_for_within_the_clients() -> None:
    allowed = ("transcriptions:read", "transcriptions:write")
    assert granted_scopes(None, allowed) == allowed
    assert granted_scopes("transcriptions:read", allowed) == ("transcriptions:read",)
    assert granted_scopes("transcriptions:read admin", allowed) is None
