"""End to end with real engines: espeak-ng speech → job → Whisper → SmolLM2 via the gateway.

Whisper (faster-whisper, tiny.en) runs in a worker thread of this process; the
LLM steps go through a real gateway to a real llama.cpp server with SmolLM2, at
the job owner's priority. Webhooks go to a loopback receiver, which is why these
gateways allow private URLs (the default refusal is tested in test_api.py).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from aiguillage.auth.oauth import NewClientSecrets
from aiguillage.backends.local_engine import SMOLLM2_SERVED_NAME, EngineUnavailable, LlamaCppServer
from aiguillage.catalog.config import JobsConfig
from aiguillage.jobs.webhooks import signature
from tests.harness import RunningGateway
from tests.jobs.harness import (
    KEY_WORDS,
    JobsClient,
    RunningWorker,
    WebhookReceiver,
    create_client,
    jobs_settings,
    parse_subtitles,
    spoken_wav,
    token,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    log = tmp_path_factory.mktemp("llama") / "engine.log"
    try:
        server = LlamaCppServer(parallel=2, context=8192, log_file=log).start()
    except EngineUnavailable as error:
        pytest.skip(f"llama.cpp engine unavailable: {error}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs-e2e")


@pytest.fixture(scope="module")
def gateway(engine: LlamaCppServer, workdir: Path) -> Iterator[RunningGateway]:
    settings = {
        "models": [
            {
                "name": "smollm2",
                "model": SMOLLM2_SERVED_NAME,
                "servers": [{"url": engine.url, "engine": "llamacpp", "max_concurrency": 2}],
            }
        ],
        "jobs": jobs_settings(workdir, allow_private_urls=True),
    }
    running = RunningGateway(settings, workdir).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def worker_key(gateway: RunningGateway) -> tuple[str, int]:
    secret, record = gateway.create_key(name="stt-worker", organisation="aiguillage", priority=5)
    return secret, record.id


@pytest.fixture(scope="module")
def worker(
    gateway: RunningGateway, worker_key: tuple[str, int], workdir: Path
) -> Iterator[RunningWorker]:
    config = JobsConfig.model_validate(
        jobs_settings(
            workdir,
            allow_private_urls=True,
            llm={"gateway_url": gateway.url, "api_key": worker_key[0], "model": "smollm2"},
            webhooks={"backoff_s": 0.2},
        )
    )
    running = RunningWorker(config, gateway.database_url).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client_secrets(gateway: RunningGateway) -> NewClientSecrets:
    return create_client(gateway, priority=1)


@pytest.fixture
def api(gateway: RunningGateway, client_secrets: NewClientSecrets) -> JobsClient:
    return JobsClient(gateway, token(gateway, client_secrets))


def test_speech_becomes_subtitles_a_translation_and_an_enrichment(
    api: JobsClient,
    gateway: RunningGateway,
    worker: RunningWorker,
    worker_key: tuple[str, int],
    client_secrets: NewClientSecrets,
    workdir: Path,
) -> None:
    wav = spoken_wav(workdir / "sentence.wav")
    options = {
        "translate_to": ["fr"],
        "enrichment": ["title", "keywords", "quiz"],
    }
    with WebhookReceiver() as receiver:
        options["callback_url"] = receiver.url  # type: ignore[assignment]
        created = api.create(file=wav, options=orjson.dumps(options).decode())
        assert created.status_code == 201, created.text
        job = api.wait(created.json()["id"], timeout_s=480)
        assert job["state"] == "SUCCESS", job
        assert [event["state"] for event in job["history"]] == [
            "UPLOADING",
            "WAITING_TRANSCRIPTION",
            "TRANSCRIBING",
            "WAITING_TRANSLATION",
            "TRANSLATING",
            "WAITING_AI_ENRICHMENT",
            "AI_ENRICHING",
            "SUCCESS",
        ]
        job_id = job["id"]

        text = api.http.get(f"/v1/transcription-jobs/{job_id}/result?format=txt").text.lower()
        assert sum(word in text for word in KEY_WORDS) >= 4, text

        for fmt in ("vtt", "srt"):
            reply = api.http.get(f"/v1/transcription-jobs/{job_id}/result?format={fmt}")
            assert reply.status_code == 200
            cues = parse_subtitles(reply.text, fmt)
            assert cues, fmt
            spoken = " ".join(text for _, _, text in cues).lower()
            assert sum(word in spoken for word in KEY_WORDS) >= 4, spoken
            assert all(0 <= start < end for start, end, _ in cues)

        original = parse_subtitles(
            api.http.get(f"/v1/transcription-jobs/{job_id}/result?format=srt").text, "srt"
        )
        french = api.http.get(f"/v1/transcription-jobs/{job_id}/result?format=srt&language=fr")
        assert french.status_code == 200
        translated = parse_subtitles(french.text, "srt")
        assert [cue[:2] for cue in translated] == [cue[:2] for cue in original]  # timings kept
        assert all(text.strip() for _, _, text in translated)
        missing = api.http.get(f"/v1/transcription-jobs/{job_id}/result?language=de")
        assert missing.status_code == 404

        document = api.http.get(f"/v1/transcription-jobs/{job_id}/result?format=json").json()
        enrichment = document["enrichment"]
        assert isinstance(enrichment["title"]["title"], str) and enrichment["title"]["title"]
        assert 3 <= len(enrichment["keywords"]["keywords"]) <= 10
        questions = enrichment["quiz"]["questions"]
        assert 1 <= len(questions) <= 3
        for question in questions:
            assert len(question["choices"]) == 4 and 0 <= question["answer"] <= 3
        assert document["translations"] == ["fr"]

        # the LLM calls went through the gateway's dispatcher, under the worker's key
        assert gateway.usage_rows(worker_key[1], expected=3)

        delivered = _wait_for_delivery(api, job_id)
    # one signed webhook, for the terminal state only
    [(headers, body)] = receiver.received
    assert headers["idempotency-key"] == delivered["idempotency_key"]
    expected = signature(client_secrets.webhook_secret, headers["x-aiguillage-timestamp"], body)
    assert hmac.compare_digest(headers["x-aiguillage-signature"], expected)
    assert orjson.loads(body)["state"] == "SUCCESS"


def _wait_for_delivery(api: JobsClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        webhooks = api.job(job_id)["webhooks"]
        if webhooks and webhooks[0]["status"] == "delivered":
            delivered: dict[str, Any] = webhooks[0]
            return delivered
        time.sleep(0.2)
    raise AssertionError(f"webhook not delivered: {api.job(job_id)['webhooks']}")
