"""Servers added at run time: stored, read back, and their tokens sealed at rest."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from aiguillage.catalog.config import ServerConfig
from aiguillage.store.database import Database
from aiguillage.store.sealing import Sealer, SecretsKeyMissing, UnreadableSecret
from aiguillage.store.servers import ServerOverrides
from aiguillage.store.tables import catalog_servers

KEY = "correct horse battery staple"


def server(token: str | None = None) -> ServerConfig:
    fields = {"url": "http://gpu9:8000/v1", "max_concurrency": 3}
    return ServerConfig.model_validate(fields if token is None else {**fields, "token": token})


async def stored_documents(db: Database) -> str:
    async with db.engine.connect() as connection:
        rows = (await connection.execute(select(catalog_servers.c.config))).scalars().all()
    return json.dumps(rows)


async def test_servers_round_trip_and_their_token_is_sealed_at_rest(db: Database) -> None:
    servers = ServerOverrides(db, Sealer(KEY))
    added = server(token="s3cret-engine-token")
    await servers.put("llama", added.base_url, added)
    await servers.put("llama", "http://gpu1:8000/v1", None)
    await servers.put("llama", added.base_url, added)  # twice: still one row
    found = await servers.all()
    assert found == {"llama": {added.base_url: added, "http://gpu1:8000/v1": None}}
    stored = found["llama"][added.base_url]
    assert stored is not None and stored.token is not None
    assert stored.token.get_secret_value() == "s3cret-engine-token"
    assert "s3cret-engine-token" not in await stored_documents(db)  # only the sealed form


async def test_a_token_is_refused_without_a_secrets_key_and_nothing_is_stored(db: Database) -> None:
    servers = ServerOverrides(db)
    with pytest.raises(SecretsKeyMissing, match="secrets_key"):
        await servers.put("llama", "http://gpu9:8000/v1", server(token="s3cret"))
    assert await servers.all() == {}
    await servers.put("llama", "http://gpu9:8000/v1", server())  # no token: nothing to seal
    assert await servers.all() == {"llama": {"http://gpu9:8000/v1": server()}}


async def test_a_server_whose_token_this_key_cannot_open_is_left_out(db: Database) -> None:
    await ServerOverrides(db, Sealer(KEY)).put("llama", "http://gpu9:8000/v1", server("s3cret"))
    await ServerOverrides(db, Sealer(KEY)).put("llama", "http://gpu1:8000/v1", None)
    for reader in (ServerOverrides(db, Sealer("another key, not the same")), ServerOverrides(db)):
        assert await reader.all() == {"llama": {"http://gpu1:8000/v1": None}}


def test_a_sealed_secret_opens_only_with_its_key_and_unaltered() -> None:
    sealed = Sealer(KEY).seal("token")
    assert sealed != Sealer(KEY).seal("token")  # a fresh IV each time
    assert Sealer(KEY).open(sealed) == "token"
    with pytest.raises(UnreadableSecret):
        Sealer("another key, not the same").open(sealed)
    altered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(UnreadableSecret):
        Sealer(KEY).open(altered)
