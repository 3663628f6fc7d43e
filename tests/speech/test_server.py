"""`aiguillage whisper-server` answered directly, as the gateway's probes and relay see it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from aiguillage.backends.local_engine import EngineUnavailable
from aiguillage.speech.server import LocalWhisperServer


def test_models_and_health_answer_for_the_probes(whisper_server: LocalWhisperServer) -> None:
    models = httpx.get(f"{whisper_server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["whisper-tiny.en"]
    assert httpx.get(f"{whisper_server.url}/health").status_code == 200


@pytest.mark.parametrize(
    ("files", "data", "status", "fragment"),
    [
        ({"attachment": ("x.txt", b"x")}, {"model": "whisper-tiny.en"}, 400, "'file'"),
        ({"file": ("a.wav", b"x")}, {"model": "whisper-tiny.en", "response_format": "pdf"}, 400,
         "response_format"),
        ({"file": ("a.wav", b"x")}, {"model": "whisper-base"}, 404, "not served here"),
        ({"file": ("a.wav", b"RIFF....WAVE")}, {"model": "whisper-tiny.en"}, 400,
         "cannot be transcribed"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(
    whisper_server: LocalWhisperServer,
    files: dict[str, tuple[str, bytes]],
    data: dict[str, str],
    status: int,
    fragment: str,
) -> None:
    response = httpx.post(
        f"{whisper_server.url}/v1/audio/transcriptions", files=files, data=data, timeout=30
    )
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_stopped_server_frees_its_port() -> None:
    server = LocalWhisperServer("tiny.en", cpu_threads=1).start(timeout_s=90)
    url = server.url
    assert httpx.get(f"{url}/health").status_code == 200
    server.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_unknown_model_stops_the_command_with_the_reason(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with pytest.raises(EngineUnavailable, match="exited with code 1"):
        LocalWhisperServer("huge", log_file=log).start(timeout_s=60)
    assert "unknown Whisper model 'huge'" in log.read_text()


def test_a_language_the_model_does_not_know_is_the_requests_fault(
    whisper_server: LocalWhisperServer, sentence_wav: Path
) -> None:
    response = httpx.post(
        f"{whisper_server.url}/v1/audio/transcriptions",
        files={"file": ("s.wav", sentence_wav.read_bytes())},
        data={"model": "whisper-tiny.en", "language": "fr"},
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "language"
    assert "does not know the language 'fr'" in error["message"]
