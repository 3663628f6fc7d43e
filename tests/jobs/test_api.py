"""The jobs API over HTTP: OAuth2 tokens, creation and its refusals, ownership, deletion."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.harness import RunningGateway
from tests.jobs.harness import JobsClient, create_client, token

WAV = b"RIFF" + b"\0" * 2000  # the API stores media as they are; decoding is the worker's job


def test_token_with_client_credentials_in_the_body_or_basic(jobs_gateway: RunningGateway) -> None:
    client = create_client(jobs_gateway)
    url = f"{jobs_gateway.url}/oauth/token"
    reply = httpx.post(
        url,
        data={
            "grant_type": "client_credentials",
            "client_id": client.client_id,
            "client_secret": client.client_secret,
        },
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert set(body["scope"].split()) == {"transcriptions:read", "transcriptions:write"}
    assert reply.headers["cache-control"] == "no-store"
    basic = base64.b64encode(f"{client.client_id}:{client.client_secret}".encode()).decode()
    reply = httpx.post(
        url,
        data={"grant_type": "client_credentials", "scope": "transcriptions:read"},
        headers={"authorization": f"Basic {basic}"},
    )
    assert reply.status_code == 200 and reply.json()["scope"] == "transcriptions:read"


def test_token_refusals_follow_rfc_6749(jobs_gateway: RunningGateway) -> None:
    client = create_client(jobs_gateway)
    url = f"{jobs_gateway.url}/oauth/token"
    wrong = httpx.post(
        url,
        data={
            "grant_type": "client_credentials",
            "client_id": client.client_id,
            "client_secret": "ags-wrong",
        },
    )
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    grant = httpx.post(url, data={"grant_type": "password"})
    assert (grant.status_code, grant.json()["error"]) == (400, "unsupported_grant_type")
    scope = httpx.post(
        url,
        data={
            "grant_type": "client_credentials",
            "client_id": client.client_id,
            "client_secret": client.client_secret,
            "scope": "admin",
        },
    )
    assert (scope.status_code, scope.json()["error"]) == (400, "invalid_scope")


def test_job_routes_need_a_valid_token_with_the_right_scope(
    jobs_gateway: RunningGateway,
) -> None:
    anonymous = httpx.get(f"{jobs_gateway.url}/v1/transcription-jobs")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "missing_access_token"
    bogus = httpx.get(
        f"{jobs_gateway.url}/v1/transcription-jobs", headers={"authorization": "Bearer agt-x"}
    )
    assert bogus.status_code == 401 and bogus.json()["error"]["code"] == "invalid_token"
    client = create_client(jobs_gateway)
    reply = httpx.post(
        f"{jobs_gateway.url}/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client.client_id,
            "client_secret": client.client_secret,
            "scope": "transcriptions:read",
        },
    )
    reader = JobsClient(jobs_gateway, reply.json()["access_token"])
    refused = reader.create(file=WAV)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_scope"


def test_an_upload_is_stored_and_queued_with_its_history(
    api: JobsClient, jobs_gateway: RunningGateway, tmp_path: Path
) -> None:
    reply = api.create(file=WAV, options='{"language": "en", "enrichment": ["title"]}')
    assert reply.status_code == 201, reply.text
    job = reply.json()
    assert job["state"] == "WAITING_TRANSCRIPTION"
    assert job["source"] == {"url": None, "filename": "lecture.wav", "bytes": len(WAV)}
    assert job["options"]["enrichment"] == ["title"]
    assert [event["state"] for event in job["history"]] == ["UPLOADING", "WAITING_TRANSCRIPTION"]
    assert (tmp_path / "media" / job["id"] / "media").read_bytes() == WAV
    listed = api.http.get("/v1/transcription-jobs").json()
    assert [item["id"] for item in listed["data"]] == [job["id"]]
    early = api.http.get(f"/v1/transcription-jobs/{job['id']}/result?format=vtt")
    assert early.status_code == 409 and early.json()["error"]["code"] == "job_not_finished"


def test_an_upload_over_the_limit_gets_413_and_leaves_nothing(
    api: JobsClient, tmp_path: Path
) -> None:
    reply = api.create(file=b"x" * (200 * 1024))
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "file_too_large"
    assert api.http.get("/v1/transcription-jobs").json()["data"] == []
    assert list((tmp_path / "media").iterdir()) == []


def test_bad_forms_get_400_with_the_reason(api: JobsClient) -> None:
    cases = {
        "options": api.create(file=WAV, options='{"translate_to": "French!"}'),
        "unknown option": api.create(file=WAV, options='{"langage": "fr"}'),
        "neither": api.create(options="{}"),
        "both": api.create(file=WAV, url="https://example.org/a.wav"),
        "not json": api.create(file=WAV, options="{"),
    }
    for case, reply in cases.items():
        assert reply.status_code == 400, case
        assert reply.json()["error"]["type"] == "invalid_request_error", case
    not_multipart = api.http.post("/v1/transcription-jobs", json={"url": "https://example.org"})
    assert not_multipart.status_code == 400
    assert api.http.get("/v1/transcription-jobs").json()["data"] == []


def test_a_url_on_loopback_or_a_private_network_is_refused(api: JobsClient) -> None:
    for url in (
        "http://127.0.0.1:8080/lecture.mp4",
        "http://localhost/lecture.mp4",
        "http://10.1.2.3/a.wav",
        "http://[::1]/a.wav",
        "http://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
    ):
        reply = api.create(url=url)
        assert reply.status_code == 400, url
        assert reply.json()["error"]["param"] == "url", url
    hook = api.create(file=WAV, options='{"callback_url": "http://127.0.0.1:9/hook"}')
    assert hook.status_code == 400


def test_a_client_sees_and_deletes_only_its_own_jobs(
    api: JobsClient, jobs_gateway: RunningGateway, tmp_path: Path
) -> None:
    job_id = api.create(file=WAV).json()["id"]
    other = JobsClient(jobs_gateway, token(jobs_gateway, create_client(jobs_gateway)))
    assert other.http.get(f"/v1/transcription-jobs/{job_id}").status_code == 404
    assert other.http.delete(f"/v1/transcription-jobs/{job_id}").status_code == 404
    assert other.http.get("/v1/transcription-jobs").json()["data"] == []
    deleted = api.http.delete(f"/v1/transcription-jobs/{job_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert api.http.get(f"/v1/transcription-jobs/{job_id}").status_code == 404
    assert not (tmp_path / "media" / job_id).exists()


def test_a_job_is_uploading_while_its_file_streams_in(
    api: JobsClient, jobs_gateway: RunningGateway
) -> None:
    boundary = "aiguillage-test-boundary"
    halfway = threading.Event()
    resume = threading.Event()

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="slow.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        ).encode()
        yield b"a" * 10_000
        halfway.set()
        assert resume.wait(10)
        yield b"b" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    replies: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: replies.append(
            api.http.post(
                "/v1/transcription-jobs",
                content=body(),
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
            )
        )
    )
    sender.start()
    try:
        assert halfway.wait(10)
        deadline = time.monotonic() + 10
        states: list[str] = []
        while not states and time.monotonic() < deadline:
            states = [job["state"] for job in api.http.get("/v1/transcription-jobs").json()["data"]]
        assert states == ["UPLOADING"]
    finally:
        resume.set()
        sender.join(20)
    [reply] = replies
    assert reply.status_code == 201, reply.text
    assert reply.json()["source"]["bytes"] == 20_000
