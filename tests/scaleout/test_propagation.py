"""Replicas sharing PostgreSQL hear each other's changes within a second.

Three gateways on one PostgreSQL database, with a key cache TTL of ten
minutes: a revocation or a new server can only reach the other replicas in
time through the database's change notices, not through cache expiry.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from aiguillage.store.changes import APPLICATION_NAME
from tests.fakes.engine import FakeEngine
from tests.harness import RunningGateway, engine_modes_of_next_requests
from tests.store.pg import create_database, drop_database, fetch, run_in_thread

PROPAGATION_S = 1.0
RESYNC_S = 5.0  # the listener reconnects after 1 s, then reloads


@pytest.fixture
def replicas(fake_engine: FakeEngine, tmp_path: Path) -> Iterator[list[RunningGateway]]:
    dsn = create_database()
    settings = {
        "database_url": dsn.replace("postgresql://", "postgresql+asyncpg://", 1),
        "key_cache_ttl_s": 600,
        "models": [{"name": "chat", "servers": [{"url": fake_engine.url("replica-first")}]}],
    }
    started: list[RunningGateway] = []
    try:
        for index in range(3):
            workdir = tmp_path / f"replica-{index}"
            workdir.mkdir()
            started.append(RunningGateway(settings, workdir).start())
        yield started
    finally:
        for gateway in started:
            gateway.stop()
        drop_database(dsn)


def _within(seconds: float, condition: Callable[[], bool]) -> float:
    """How long `condition` took to hold; fails the test after `seconds`."""
    start = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed < seconds, f"not true after {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - start


def _status(gateway: RunningGateway, key: str) -> int:
    return httpx.get(
        f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {key}"}
    ).status_code


def _refuses(gateway: RunningGateway, key: str) -> bool:
    return _status(gateway, key) == 401


def _routes_only_to(
    fake_engine: FakeEngine, gateway: RunningGateway, key: str, modes: set[str]
) -> bool:
    return engine_modes_of_next_requests(fake_engine, gateway, key, 4) <= modes


def _routes_to(fake_engine: FakeEngine, gateway: RunningGateway, key: str, mode: str) -> bool:
    return mode in engine_modes_of_next_requests(fake_engine, gateway, key, 2)


def test_a_key_revoked_on_one_replica_is_refused_by_the_others_within_1s(
    replicas: list[RunningGateway],
) -> None:
    first, *others = replicas
    admin, _ = first.create_key(is_admin=True)
    user, record = first.create_key()
    assert [_status(gateway, user) for gateway in replicas] == [200, 200, 200]  # cached
    response = httpx.post(
        f"{first.url}/admin/keys/{record.id}/revoke", headers={"authorization": f"Bearer {admin}"}
    )
    assert response.status_code == 200
    for gateway in others:
        _within(PROPAGATION_S, partial(_refuses, gateway, user))


def test_a_key_revoked_with_the_cli_reaches_every_replica_within_1s(
    replicas: list[RunningGateway],
) -> None:
    user, record = replicas[0].create_key()
    assert [_status(gateway, user) for gateway in replicas] == [200, 200, 200]
    subprocess.run(  # an operator's command: no gateway involved in the change
        [
            sys.executable,
            "-m",
            "aiguillage.cli",
            "keys",
            "revoke",
            str(record.id),
            "--config",
            str(replicas[0].config_path),
        ],
        check=True,
        capture_output=True,
    )
    for gateway in replicas:
        _within(PROPAGATION_S, partial(_refuses, gateway, user))


def test_a_server_added_on_one_replica_is_used_by_the_others_within_1s(
    replicas: list[RunningGateway], fake_engine: FakeEngine, tmp_path: Path
) -> None:
    first, *others = replicas
    admin, _ = first.create_key(is_admin=True)
    user, _ = first.create_key()
    response = httpx.post(
        f"{first.url}/admin/models/chat/servers",
        json={"url": fake_engine.url("replica-second")},
        headers={"authorization": f"Bearer {admin}"},
    )
    assert response.status_code == 201
    for gateway in others:
        _within(PROPAGATION_S, partial(_routes_to, fake_engine, gateway, user, "replica-second"))

    removed = httpx.delete(
        f"{first.url}/admin/models/chat/servers/{fake_engine.url('replica-first')}",
        headers={"authorization": f"Bearer {admin}"},
    )
    assert removed.status_code == 200
    for gateway in others:
        _within(
            PROPAGATION_S, partial(_routes_only_to, fake_engine, gateway, user, {"replica-second"})
        )

    late = tmp_path / "late"
    late.mkdir()
    latecomer = RunningGateway(
        first.config.model_dump(mode="json"), late
    ).start()  # starts after the change: reads it from the database
    try:
        assert engine_modes_of_next_requests(fake_engine, latecomer, user, 3) == {"replica-second"}
    finally:
        latecomer.stop()


def test_a_replica_that_lost_its_listener_resyncs_from_the_database(
    replicas: list[RunningGateway],
) -> None:
    user, record = replicas[0].create_key()
    assert [_status(gateway, user) for gateway in replicas] == [200, 200, 200]
    dsn = replicas[0].database_url.replace("+asyncpg", "")
    run_in_thread(
        fetch(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()",
            APPLICATION_NAME,
        )
    )
    replicas[0].revoke_key(record.id)  # its notice may reach nobody: all are reconnecting
    for gateway in replicas:
        _within(RESYNC_S, partial(_refuses, gateway, user))
