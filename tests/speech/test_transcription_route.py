"""`POST /v1/audio/transcriptions` end to end: SDK → gateway → dispatcher → whisper-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
import srt
import webvtt

from aiguillage.api.errors import ApiError
from aiguillage.api.transcription import encode_multipart, parse_transcription_request
from aiguillage.speech.server import LocalWhisperServer
from tests.harness import RunningGateway
from tests.speech.conftest import KEY_WORDS, words

AUDIO_LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def gateway(
    whisper_server: LocalWhisperServer,
    closed_port_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway]:
    backend = {"url": whisper_server.url, "engine": "openai", "max_concurrency": 1}
    settings = {
        "max_audio_bytes": AUDIO_LIMIT,
        "models": [
            # a public name that differs from the served one: the gateway renames it
            {"name": "whisper", "model": whisper_server.served_name, "kind": "transcription",
             "servers": [backend]},
            # the served name itself: the body goes through untouched
            {"name": whisper_server.served_name, "kind": "transcription", "servers": [backend]},
            {"name": "chatty", "servers": [{"url": closed_port_url}]},
        ],
    }  # fmt: skip
    running = RunningGateway(settings, tmp_path_factory.mktemp("gw")).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def key(gateway: RunningGateway) -> tuple[str, int]:
    secret, record = gateway.create_key(name="speech", organisation="univ-lyon")
    return secret, record.id


@pytest.fixture
def client(gateway: RunningGateway, key: tuple[str, int]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key[0], max_retries=0, timeout=120)


def _post(
    gateway: RunningGateway, key: str, *, files: dict[str, object] | None, data: dict[str, str]
) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/audio/transcriptions",
        headers={"authorization": f"Bearer {key}"},
        files=files,  # type: ignore[arg-type]
        data=data,
        timeout=120,
    )


@pytest.mark.slow
def test_every_response_format_through_the_sdk(sentence_wav: Path, gateway: RunningGateway) -> None:
    secret, record = gateway.create_key(name="formats", organisation="univ-lyon")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0, timeout=120)
    plain = client.audio.transcriptions.create(
        model="whisper", file=sentence_wav.open("rb"), language="en"
    )
    assert set(KEY_WORDS) <= words(plain.text), plain.text

    verbose = client.audio.transcriptions.create(
        model="whisper", file=sentence_wav.open("rb"), response_format="verbose_json"
    )
    assert set(KEY_WORDS) <= words(verbose.text)
    assert verbose.language == "en" and verbose.duration > 5
    assert verbose.segments and verbose.segments[-1].end <= verbose.duration + 0.5

    text = client.audio.transcriptions.create(
        model="whisper", file=sentence_wav.open("rb"), response_format="text"
    )
    assert isinstance(text, str) and set(KEY_WORDS) <= words(text)

    subtitles = client.audio.transcriptions.create(
        model="whisper", file=sentence_wav.open("rb"), response_format="srt"
    )
    cues = list(srt.parse(str(subtitles)))
    assert cues and set(KEY_WORDS) <= words(" ".join(c.content for c in cues))

    captions = client.audio.transcriptions.create(
        model="whisper", file=sentence_wav.open("rb"), response_format="vtt"
    )
    parsed = list(webvtt.from_string(str(captions)))
    assert parsed and set(KEY_WORDS) <= words(" ".join(c.text for c in parsed))

    rows = gateway.usage_rows(record.id, expected=5)
    assert {(r.endpoint, r.status, r.model) for r in rows} == {
        ("audio/transcriptions", 200, "whisper")
    }


@pytest.mark.slow
def test_body_is_relayed_untouched_under_the_served_name(
    gateway: RunningGateway, key: tuple[str, int], sentence_m4a: Path
) -> None:
    response = _post(
        gateway,
        key[0],
        files={"file": ("lecture.m4a", sentence_m4a.read_bytes(), "audio/mp4")},
        data={"model": "whisper-tiny.en", "response_format": "vtt"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/vtt")
    assert response.headers["x-aiguillage-backend"]
    assert set(KEY_WORDS) <= words(" ".join(c.text for c in webvtt.from_string(response.text)))


def test_broken_media_reaches_the_user_with_its_cause(
    gateway: RunningGateway, key: tuple[str, int], broken_media: Path
) -> None:
    response = _post(
        gateway,
        key[0],
        files={"file": ("talk.mp3", broken_media.read_bytes(), "audio/mpeg")},
        data={"model": "whisper"},
    )
    assert response.status_code == 400
    assert "not a readable audio or video file" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("files", "data", "status", "param", "fragment"),
    [
        (None, {"model": "whisper"}, 400, "file", "'file' field is required"),
        ({"file": ("a.wav", b"RIFF", "audio/wav")}, {}, 400, "model", "'model' field is required"),
        ({"file": ("a.wav", b"", "audio/wav")}, {"model": "whisper"}, 400, "file", "empty"),
        ({"file": ("a.wav", b"RIFF", "audio/wav")}, {"model": "nope"}, 404, "model", "not exist"),
        (
            {"file": ("a.wav", b"RIFF", "audio/wav")},
            {"model": "chatty"},
            400,
            "model",
            "not a transcription model",
        ),
        (
            {"file": ("a.wav", b"RIFF", "audio/wav")},
            {"model": "whisper", "response_format": "docx"},
            400,
            "response_format",
            "must be one of json",
        ),
        (
            {"file": ("a.wav", b"\0" * (AUDIO_LIMIT + 1), "audio/wav")},
            {"model": "whisper"},
            413,
            "file",
            "submit long media as a transcription job",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    gateway: RunningGateway,
    key: tuple[str, int],
    files: dict[str, object] | None,
    data: dict[str, str],
    status: int,
    param: str,
    fragment: str,
) -> None:
    if files is None:  # httpx sends urlencoded without files: force multipart with a dummy part
        files = {"attachment": ("x.txt", b"x", "text/plain")}
    response = _post(gateway, key[0], files=files, data=data)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"]


def test_not_multipart_is_refused(gateway: RunningGateway, key: tuple[str, int]) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/audio/transcriptions",
        headers={"authorization": f"Bearer {key[0]}"},
        json={"model": "whisper"},
    )
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["error"]["message"]


def test_unauthenticated_is_refused(gateway: RunningGateway) -> None:
    response = httpx.post(f"{gateway.url}/v1/audio/transcriptions", files={"file": b"x"})
    assert response.status_code == 401


def test_chat_route_refuses_a_transcription_model(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError, match="use POST /v1/audio/transcriptions"):
        client.chat.completions.create(
            model="whisper", messages=[{"role": "user", "content": "hi"}]
        )


async def test_renamed_model_is_re_encoded_with_everything_else_intact() -> None:
    fields = [("model", "whisper"), ("language", "fr"), ("prompt", 'a "quoted" prompt')]
    body, content_type = encode_multipart(fields, 'cours "1".mp3', "audio/mpeg", b"\x00\xffID3")
    request = await parse_transcription_request(body, content_type)
    assert (request.model, request.file_data, request.file_type) == (
        "whisper",
        b"\x00\xffID3",
        "audio/mpeg",
    )
    renamed, _ = request.upstream_body("whisper-large-v3")
    again = await parse_transcription_request(renamed, request.content_type)
    assert again.fields == [("model", "whisper-large-v3"), *fields[1:]]
    assert again.file_data == b"\x00\xffID3"
    assert request.upstream_body("whisper-large-v3")[0] == renamed  # a retry sends the same


async def test_unreadable_multipart_is_a_400() -> None:
    with pytest.raises(ApiError) as caught:
        await parse_transcription_request(b"--x\r\nnot a part", "multipart/form-data; boundary=x")
    assert caught.value.status == 400


def test_verbose_json_from_the_backend_is_openai_shaped(
    gateway: RunningGateway, key: tuple[str, int], sentence_wav: Path
) -> None:
    response = _post(
        gateway,
        key[0],
        files={"file": ("s.wav", sentence_wav.read_bytes(), "audio/wav")},
        data={"model": "whisper", "response_format": "verbose_json"},
    )
    document = orjson.loads(response.content)
    assert document["task"] == "transcribe"
    assert [s["id"] for s in document["segments"]] == list(range(len(document["segments"])))
