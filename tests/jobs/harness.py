"""Helpers for the job tests: a gateway with the jobs API, OAuth clients, spoken audio."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import srt
import webvtt

from aiguillage.auth.oauth import NewClientSecrets
from aiguillage.catalog.config import JobsConfig
from aiguillage.jobs.runtime import configured_worker
from aiguillage.jobs.states import JobState, Step
from aiguillage.jobs.worker import Worker
from aiguillage.store.database import Database, open_database
from aiguillage.store.oauth import OAuthRepository
from tests.harness import RunningGateway, run_sync

SENTENCE = "Hello everyone. Today we will learn about the history of computers and the internet."
KEY_WORDS = ("hello", "today", "history", "computers", "internet")


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
        ["espeak-ng", "-s", "140", "-w", str(path), " ".join([text] * repeat)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


class RunningWorker:
    """`aiguillage worker` in a thread of this process, with its own event loop."""

    def __init__(self, config: JobsConfig, database_url: str, steps: tuple[Step, ...] = ()) -> None:
        self._config = config
        self._database_url = database_url
        self._steps = steps or tuple(Step)
        self._worker: Worker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        database = await open_database(self._database_url)
        try:
            async with configured_worker(self._config, database, self._steps) as worker:
                self._worker, self._loop = worker, asyncio.get_running_loop()
                self._ready.set()
                await worker.run()
        finally:
            self._ready.set()
            await database.dispose()

    def start(self) -> RunningWorker:
        self._thread.start()
        assert self._ready.wait(30), "the worker did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._worker is not None:
            self._loop.call_soon_threadsafe(self._worker.stop)
        self._thread.join(60)


class WebhookReceiver:
    """A loopback HTTP server that records what it is sent and answers scripted statuses."""

    def __init__(self, statuses: tuple[int, ...] = (200,)) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                statuses = receiver._statuses
                status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class FileServer(WebhookReceiver):
    """A loopback HTTP server that serves one file at `/media` (for jobs from a URL)."""

    def __init__(self, content: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/media"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)


def parse_subtitles(text: str, fmt: str) -> list[tuple[float, float, str]]:
    """Cues (start, end, text) as the webvtt-py and srt libraries read them."""
    if fmt == "vtt":
        return [
            (
                cue.start_time.in_milliseconds() / 1000,
                cue.end_time.in_milliseconds() / 1000,
                cue.text,
            )
            for cue in webvtt.from_string(text)
        ]
    return [
        (cue.start.total_seconds(), cue.end.total_seconds(), cue.content) for cue in srt.parse(text)
    ]
