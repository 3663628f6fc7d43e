"""Transcription jobs end to end with the real engine (faster-whisper tiny.en on espeak-ng speech).

No LLM here: these jobs ask for no translation or enrichment (test_end_to_end.py
covers those through the gateway and llama.cpp).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from aiguillage.catalog.config import JobsConfig
from tests.fakes.engine import FakeEngine
from tests.harness import RunningGateway
from tests.jobs.harness import (
    KEY_WORDS,
    FileServer,
    JobsClient,
    RunningWorker,
    WebhookReceiver,
    create_client,
    jobs_settings,
    parse_subtitles,
    spoken_wav,
    token,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stt")


@pytest.fixture(scope="module")
def gateway(workdir: Path) -> Iterator[RunningGateway]:
    settings = {"jobs": jobs_settings(workdir, allow_private_urls=True)}
    running = RunningGateway(settings, workdir).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def worker(gateway: RunningGateway, workdir: Path) -> Iterator[RunningWorker]:
    config = JobsConfig.model_validate(
        jobs_settings(workdir, allow_private_urls=True, webhooks={"backoff_s": 0.2})
    )
    running = RunningWorker(config, gateway.database_url).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api(gateway: RunningGateway) -> JobsClient:
    return JobsClient(gateway, token(gateway, create_client(gateway)))


def test_speech_becomes_a_transcript_and_subtitles(
    api: JobsClient, worker: RunningWorker, workdir: Path
) -> None:
    wav = spoken_wav(workdir / "sentence.wav")
    created = api.create(file=wav, options='{"language": "en"}')
    assert created.status_code == 201, created.text
    job = api.wait(created.json()["id"])
    assert job["state"] == "SUCCESS", job
    assert [event["state"] for event in job["history"]] == [
        "UPLOADING",
        "WAITING_TRANSCRIPTION",
        "TRANSCRIBING",
        "SUCCESS",
    ]  # steps not asked for are skipped
    assert job["result"]["language"] == "en" and job["result"]["duration"] > 2
    base = f"/v1/transcription-jobs/{job['id']}/result"
    text = api.http.get(f"{base}?format=txt").text.lower()
    assert sum(word in text for word in KEY_WORDS) >= 4, text
    for fmt in ("vtt", "srt"):
        reply = api.http.get(f"{base}?format={fmt}")
        assert reply.status_code == 200 and fmt in reply.headers["content-disposition"]
        cues = parse_subtitles(reply.text, fmt)
        assert cues
        spoken = " ".join(text for _, _, text in cues).lower()
        assert sum(word in spoken for word in KEY_WORDS) >= 4, spoken
        assert all(0 <= start < end for start, end, _ in cues)
    document = api.http.get(f"{base}?format=json").json()
    assert document["segments"] and document["language"] == "en"
    assert api.http.get(f"{base}?format=docx").status_code == 400


def test_broken_media_fails_with_its_cause_and_the_webhook_is_retried(
    api: JobsClient, worker: RunningWorker
) -> None:
    with WebhookReceiver(statuses=(500, 200)) as receiver:
        options = orjson.dumps({"callback_url": receiver.url}).decode()
        created = api.create(file=b"this is not audio at all" * 100, options=options)
        assert created.status_code == 201
        job = api.wait(created.json()["id"])
        assert job["state"] == "FAILURE"
        assert job["failed_step"] == "transcribe"
        assert "media" in job["failure_cause"].lower()
        states = [event["state"] for event in job["history"]]
        assert states.count("TRANSCRIBING") == 1  # broken media is not retried
        webhook = _wait_for_delivery(api, job["id"])
    assert [attempt["status_code"] for attempt in webhook["attempts"]] == [500, 200]
    keys = {headers["idempotency-key"] for headers, _ in receiver.received}
    assert len(receiver.received) == 2 and len(keys) == 1  # a retry resends the same key


def test_a_job_from_a_url_is_fetched_by_the_worker(
    api: JobsClient, worker: RunningWorker, workdir: Path
) -> None:
    wav = spoken_wav(workdir / "url.wav")
    with FileServer(wav.read_bytes()) as server:
        created = api.create(url=server.url)
        assert created.status_code == 201, created.text
        job = api.wait(created.json()["id"])
    assert job["state"] == "SUCCESS", job
    assert job["source"]["url"] == server.url
    assert job["source"]["bytes"] == wav.stat().st_size
    text = api.http.get(f"/v1/transcription-jobs/{job['id']}/result?format=txt").text.lower()
    assert sum(word in text for word in KEY_WORDS) >= 4, text


def _wait_for_delivery(api: JobsClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        webhooks = api.job(job_id)["webhooks"]
        if webhooks and webhooks[0]["status"] == "delivered":
            delivered: dict[str, Any] = webhooks[0]
            return delivered
        time.sleep(0.2)
    raise AssertionError(f"webhook not delivered: {api.job(job_id)['webhooks']}")


def test_a_job_deleted_while_it_runs_leaves_nothing_and_the_worker_goes_on(
    api: JobsClient, worker: RunningWorker, workdir: Path
) -> None:
    long_job = api.create(file=spoken_wav(workdir / "long.wav", repeat=12)).json()["id"]
    deadline = time.monotonic() + 60
    while api.job(long_job)["state"] != "TRANSCRIBING" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.http.delete(f"/v1/transcription-jobs/{long_job}").status_code == 200
    next_job = api.create(file=spoken_wav(workdir / "next.wav")).json()["id"]
    assert api.wait(next_job)["state"] == "SUCCESS"  # the worker finished (or dropped) the first
    assert api.http.get(f"/v1/transcription-jobs/{long_job}").status_code == 404
    assert not (workdir / "media" / long_job).exists()


def test_an_llm_that_answers_nonsense_fails_the_step_with_its_cause(
    tmp_path: Path, fake_engine: FakeEngine
) -> None:
    """The fake engine answers prose where JSON is required: re-asked, retried, then FAILURE."""
    gateway = RunningGateway({"jobs": jobs_settings(tmp_path)}, tmp_path).start()
    config = JobsConfig.model_validate(
        jobs_settings(tmp_path, llm={"gateway_url": fake_engine.url("ok"), "attempts": 2})
    )
    worker = RunningWorker(config, gateway.database_url).start()
    try:
        api = JobsClient(gateway, token(gateway, create_client(gateway)))
        created = api.create(
            file=spoken_wav(tmp_path / "s.wav"), options='{"enrichment": ["title"]}'
        )
        job = api.wait(created.json()["id"])
    finally:
        worker.stop()
        gateway.stop()
    assert job["state"] == "FAILURE"
    assert job["failed_step"] == "enrich"
    assert "enrichment item 'title' failed" in job["failure_cause"]
    assert "not valid" in job["failure_cause"]
    states = [event["state"] for event in job["history"]]
    assert states.count("AI_ENRICHING") == 3  # max_attempts, with a backoff in between
    retries = [event for event in job["history"] if event["state"] == "WAITING_AI_ENRICHMENT"]
    assert [event["detail"][:30] for event in retries[1:]] == [
        "attempt 1 failed, will retry: ",
        "attempt 2 failed, will retry: ",
    ]


def test_a_language_the_model_does_not_know_fails_at_once(
    api: JobsClient, worker: RunningWorker, workdir: Path
) -> None:
    created = api.create(file=spoken_wav(workdir / "fr.wav"), options='{"language": "fr"}')
    job = api.wait(created.json()["id"])
    assert job["state"] == "FAILURE" and job["failed_step"] == "transcribe"
    assert "does not know the language 'fr'" in job["failure_cause"]
    assert [event["state"] for event in job["history"]].count("TRANSCRIBING") == 1
