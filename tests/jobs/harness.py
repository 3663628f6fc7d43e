"""Helpers for the job tests: a gateway with the jobs API, OAuth clients, spoken audio."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiguillage.auth.oauth import NewClientSecrets
from aiguillage.jobs.states import JobState
from aiguillage.store.database import Database
from aiguillage.store.oauth import OAuthRepository
from tests.harness import RunningGateway, run_sync

SENTENCE = "The weather in Paris is sunny today, and the students are learning mathematics."
KEY_WORDS = ("weather", "paris", "students", "mathematics")


def jobs_settings(workdir: Path, **jobs: Any) -> dict[str, Any]:
    """A `jobs:` config section for tests: fast retries, short leases, storage in `workdir`."""
    return {
        "storage_dir": str(workdir / "media"),
        "lease_s": 3,
        "poll_interval_s": 0.1,
        "retry_backoff_s": 0.1,
        "transcriber": {"engine": "local", "model": "tiny.en"},
        **jobs,
    }


def create_client(gateway: RunningGateway, priority: int = 0) -> NewClientSecrets:
    async def create() -> NewClientSecrets:
        database = Database(gateway.database_url)
        try:
            await database.upgrade()
            secrets, _ = await OAuthRepository(database).create_client(
                name="pod", organisation="univ", priority=priority
            )
            return secrets
        finally:
            await database.dispose()

    return run_sync(create())


def token(gateway: RunningGateway, client: NewClientSecrets) -> str:
    reply = httpx.post(
        f"{gateway.url}/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client.client_id,
            "client_secret": client.client_secret,
        },
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["access_token"])


class JobsClient:
    """A client of the jobs API, the way ESUP-Pod would call it."""

    def __init__(self, gateway: RunningGateway, access_token: str) -> None:
        self.http = httpx.Client(
            base_url=gateway.url,
            headers={"authorization": f"Bearer {access_token}"},
            timeout=30,
        )

    def create(
        self, *, file: Path | bytes | None = None, url: str | None = None, options: str = "{}"
    ) -> httpx.Response:
        data = {"options": options}
        if url is not None:
            data["url"] = url
        files = None
        if file is not None:
            content = file.read_bytes() if isinstance(file, Path) else file
            files = {"file": ("lecture.wav", content, "audio/wav")}
        return self.http.post("/v1/transcription-jobs", data=data, files=files)

    def job(self, job_id: str) -> dict[str, Any]:
        reply = self.http.get(f"/v1/transcription-jobs/{job_id}")
        assert reply.status_code == 200, reply.text
        document: dict[str, Any] = reply.json()
        return document

    def wait(self, job_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """The job once it reaches SUCCESS or FAILURE (bounded wait)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            document = self.job(job_id)
            if JobState(document["state"]).terminal:
                return document
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['state']} after {timeout_s} s")


def spoken_wav(path: Path, text: str = SENTENCE, repeat: int = 1) -> Path:
    """A WAV of espeak-ng saying `text` (`repeat` times); skips the test without espeak-ng."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    subprocess.run(
        ["espeak-ng", "-s", "150", "-w", str(path), " ".join([text] * repeat)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path
