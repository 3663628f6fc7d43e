"""`aiguillage worker` as real processes: killed mid-job, or stopped with SIGTERM.

A killed worker's job is taken up by another once its lease expires and ends
`SUCCESS` once; a worker stopped while it cannot finish in its grace period hands
its job back, unfinished, for another worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import RunningGateway
from tests.jobs.harness import JobsClient, create_client, jobs_settings, spoken_wav, token
from tests.store import pg

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    dsn = pg.create_database()
    yield dsn
    pg.drop_database(dsn)


@pytest.fixture(params=["sqlite", "postgresql"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningGateway]:
    """A gateway (and its workers) on SQLite, then on PostgreSQL (FOR UPDATE SKIP LOCKED)."""
    database_url = None
    if request.param == "postgresql":
        dsn: str = request.getfixturevalue("postgres_dsn")
        pg.empty_schema(dsn)
        database_url = pg.sqlalchemy_url(dsn)
    settings = {"jobs": jobs_settings(tmp_path, stop_grace_s=0)}
    running = RunningGateway(settings, tmp_path, database_url).start()
    yield running
    running.stop()


@pytest.fixture
def api(gateway: RunningGateway) -> JobsClient:
    return JobsClient(gateway, token(gateway, create_client(gateway)))


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aiguillage.cli",
            "worker",
            "-c",
            str(config),
            "--steps",
            "transcribe,translate,enrich",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )


def wait_for_state(api: JobsClient, job_id: str, state: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if api.job(job_id)["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {state}: {api.job(job_id)['state']}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(30)


def test_a_killed_workers_job_is_taken_up_and_succeeds_once(
    api: JobsClient, gateway: RunningGateway, tmp_path: Path
) -> None:
    wav = spoken_wav(tmp_path / "long.wav", repeat=12)
    job_id = api.create(file=wav).json()["id"]
    first = start_worker(gateway.config_path, tmp_path / "worker1.log")
    try:
        wait_for_state(api, job_id, "TRANSCRIBING")
        time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        stop(first)
    assert api.job(job_id)["state"] == "TRANSCRIBING"  # still leased to the dead worker
    second = start_worker(gateway.config_path, tmp_path / "worker2.log")
    try:
        job = api.wait(job_id, timeout_s=180)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    assert job["state"] == "SUCCESS", job
    states = [event["state"] for event in job["history"]]
    assert states.count("TRANSCRIBING") == 2 and states.count("SUCCESS") == 1
    retaken = [event for event in job["history"] if event["state"] == "TRANSCRIBING"][1]
    assert "expired" in retaken["detail"]
    assert second.returncode == 0


def test_sigterm_hands_back_a_job_it_cannot_finish_in_its_grace(
    api: JobsClient, gateway: RunningGateway, tmp_path: Path
) -> None:
    wav = spoken_wav(tmp_path / "long.wav", repeat=12)
    job_id = api.create(file=wav).json()["id"]
    worker = start_worker(gateway.config_path, tmp_path / "worker.log")
    try:
        wait_for_state(api, job_id, "TRANSCRIBING")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(120) == 0
    finally:
        stop(worker)
    job = api.job(job_id)
    assert job["state"] == "WAITING_TRANSCRIPTION"
    assert "handed back" in job["history"][-1]["detail"]
    assert job["attempts"] == 0  # stopping is not the job's fault


def test_worker_refuses_unknown_steps(gateway: RunningGateway) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiguillage.cli",
            "worker",
            "-c",
            str(gateway.config_path),
            "--steps",
            "transcribe,dance",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "dance" in result.stderr


def test_clients_create_prints_credentials_that_get_a_token(gateway: RunningGateway) -> None:
    config = yaml.safe_load(gateway.config_path.read_text())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiguillage.cli",
            "clients",
            "create",
            "--name",
            "pod",
            "--org",
            "univ-rennes",
            "--priority",
            "2",
            "--json",
            "--database-url",
            config["database_url"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr

    created = json.loads(result.stdout)
    assert created["priority"] == 2 and created["organisation"] == "univ-rennes"

    reply = httpx.post(
        f"{gateway.url}/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": created["client_id"],
            "client_secret": created["client_secret"],
        },
    )
    assert reply.status_code == 200
