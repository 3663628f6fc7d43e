"""Run-time admin changes on one gateway: servers added and removed, keys revoked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.engine import FakeEngine
from tests.harness import RunningGateway, engine_modes_of_next_requests


@pytest.fixture
def gateway(fake_engine: FakeEngine, tmp_path: Path) -> Iterator[RunningGateway]:
    settings = {
        "key_cache_ttl_s": 600,  # a revocation must not wait for the cache to expire
        "models": [{"name": "chat", "servers": [{"url": fake_engine.url("admin-first")}]}],
    }
    running = RunningGateway(settings, tmp_path).start()
    yield running
    running.stop()


def test_a_server_added_then_removed_is_used_then_left(
    gateway: RunningGateway, fake_engine: FakeEngine
) -> None:
    admin, _ = gateway.create_key(is_admin=True)
    user, _ = gateway.create_key()
    headers = {"authorization": f"Bearer {admin}"}

    added = httpx.post(
        f"{gateway.url}/admin/models/chat/servers",
        json={"url": fake_engine.url("admin-second"), "max_concurrency": 4},
        headers=headers,
    )
    assert added.status_code == 201, added.text
    assert fake_engine.url("admin-second") in added.json()["servers"]
    assert engine_modes_of_next_requests(fake_engine, gateway, user, 6) == {
        "admin-first",
        "admin-second",
    }

    removed = httpx.delete(
        f"{gateway.url}/admin/models/chat/servers/{fake_engine.url('admin-first')}",
        headers=headers,
    )
    assert removed.status_code == 200, removed.text
    assert removed.json()["servers"] == [fake_engine.url("admin-second")]
    assert engine_modes_of_next_requests(fake_engine, gateway, user, 4) == {"admin-second"}


def test_a_server_with_a_token_needs_a_secrets_key(
    gateway: RunningGateway, fake_engine: FakeEngine
) -> None:
    admin, _ = gateway.create_key(is_admin=True)
    response = httpx.post(
        f"{gateway.url}/admin/models/chat/servers",
        json={"url": fake_engine.url("admin-token"), "token": "engine-s3cret"},
        headers={"authorization": f"Bearer {admin}"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("secrets_key_missing", "token")
    assert "engine-s3cret" not in response.text


def test_a_stored_token_is_sent_to_its_engine_after_a_restart(
    fake_engine: FakeEngine, tmp_path: Path
) -> None:
    settings = {
        "secrets_key": "a long enough secrets key",
        "models": [{"name": "chat", "servers": [{"url": fake_engine.url("admin-first")}]}],
    }
    first = RunningGateway(settings, tmp_path).start()
    admin, _ = first.create_key(is_admin=True)
    user, _ = first.create_key()
    try:
        httpx.delete(
            f"{first.url}/admin/models/chat/servers/{fake_engine.url('admin-first')}",
            headers={"authorization": f"Bearer {admin}"},
        ).raise_for_status()
        httpx.post(
            f"{first.url}/admin/models/chat/servers",
            json={"url": fake_engine.url("admin-token"), "token": "engine-s3cret"},
            headers={"authorization": f"Bearer {admin}"},
        ).raise_for_status()
    finally:
        first.stop()
    restarted = RunningGateway({**settings, "database_url": first.database_url}, tmp_path).start()
    try:  # read back from the database and unsealed with the same key
        assert engine_modes_of_next_requests(fake_engine, restarted, user, 1) == {"admin-token"}
        assert fake_engine.log.last().headers["Authorization"] == "Bearer engine-s3cret"
    finally:
        restarted.stop()


def test_server_changes_survive_a_restart(fake_engine: FakeEngine, gateway: RunningGateway) -> None:
    admin, _ = gateway.create_key(is_admin=True)
    user, _ = gateway.create_key()
    response = httpx.delete(
        f"{gateway.url}/admin/models/chat/servers/{fake_engine.url('admin-first')}",
        headers={"authorization": f"Bearer {admin}"},
    )
    assert response.status_code == 200
    httpx.post(
        f"{gateway.url}/admin/models/chat/servers",
        json={"url": fake_engine.url("admin-kept")},
        headers={"authorization": f"Bearer {admin}"},
    ).raise_for_status()
    gateway.stop()
    restarted = RunningGateway(
        {"database_url": gateway.database_url, **_settings_of(gateway)}, gateway.config_path.parent
    ).start()
    try:
        assert engine_modes_of_next_requests(fake_engine, restarted, user, 3) == {"admin-kept"}
    finally:
        restarted.stop()


def _settings_of(gateway: RunningGateway) -> dict[str, object]:
    return gateway.config.model_dump(mode="json", exclude={"database_url"})


def test_admin_routes_need_an_admin_key_and_valid_input(
    gateway: RunningGateway, fake_engine: FakeEngine
) -> None:
    admin, _ = gateway.create_key(is_admin=True)
    user, _ = gateway.create_key()
    url = f"{gateway.url}/admin/models/chat/servers"
    as_user = httpx.post(
        url, json={"url": fake_engine.url("x")}, headers={"authorization": f"Bearer {user}"}
    )
    assert as_user.status_code == 403
    as_admin = {"authorization": f"Bearer {admin}"}
    bad = httpx.post(url, json={"url": "not a url", "max_concurrency": 0}, headers=as_admin)
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    not_json = httpx.post(url, content=b"{", headers=as_admin)
    assert not_json.status_code == 400
    unknown_model = httpx.post(
        f"{gateway.url}/admin/models/nope/servers",
        json={"url": fake_engine.url("x")},
        headers=as_admin,
    )
    assert unknown_model.status_code == 404
    unknown_server = httpx.delete(f"{url}/http://127.0.0.1:1/none", headers=as_admin)
    assert unknown_server.status_code == 404
    assert (
        httpx.post(f"{gateway.url}/admin/keys/999999/revoke", headers=as_admin).status_code == 404
    )


def test_a_key_revoked_through_the_api_is_refused_at_once(gateway: RunningGateway) -> None:
    admin, _ = gateway.create_key(is_admin=True)
    user, record = gateway.create_key()
    assert _status(gateway, user) == 200  # now cached for key_cache_ttl_s
    response = httpx.post(
        f"{gateway.url}/admin/keys/{record.id}/revoke",
        headers={"authorization": f"Bearer {admin}"},
    )
    assert response.status_code == 200
    assert _status(gateway, user) == 401


def _status(gateway: RunningGateway, key: str) -> int:
    return httpx.get(
        f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {key}"}
    ).status_code
