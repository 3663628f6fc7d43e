"""How `OpenAICompatibleTranscriber` reads answers that differ from our own server's.

The backend here is a stand-in for third-party servers (OpenAI itself names languages
in English and may omit segments; a broken proxy answers HTML), which we cannot run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from aiguillage.speech.engines import OpenAICompatibleTranscriber, TranscriptionError
from aiguillage.speech.transcript import Segment

Answer = Callable[[dict[str, str]], web.Response]


class Backend:
    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.authorizations: list[str | None] = []
        self.answer: Answer = lambda form: web.json_response({"text": ""})
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        fields = {name: value for name, value in form.items() if isinstance(value, str)}
        assert form["file"].content_type == "audio/wav"  # type: ignore[union-attr]
        self.requests.append(fields)
        self.authorizations.append(request.headers.get("authorization"))
        return self.answer(fields)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    stand_in = Backend()
    app = web.Application()
    app.router.add_post("/v1/audio/transcriptions", stand_in.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    stand_in.url = f"http://127.0.0.1:{port}"
    yield stand_in
    await runner.cleanup()


async def test_language_named_in_english_is_sent_back_as_a_code_and_text_only_is_one_segment(
    backend: Backend, long_wav: Path
) -> None:
    backend.answer = lambda form: web.json_response({"text": " Bonjour. ", "language": "French"})
    remote = OpenAICompatibleTranscriber(backend.url, "whisper-1", chunk_seconds=20.0)
    transcript = await remote.transcribe(long_wav)
    assert [r.get("language") for r in backend.requests] == [None, "fr"]
    assert {r["response_format"] for r in backend.requests} == {"verbose_json"}
    assert transcript.language == "fr"
    first, second = transcript.segments
    assert first == Segment(0.0, first.end, "Bonjour.")
    assert second.start == pytest.approx(first.end) and second.end == pytest.approx(
        transcript.duration
    )


async def test_error_answer_is_a_transcription_error_with_its_message(
    backend: Backend, sentence_wav: Path
) -> None:
    backend.answer = lambda form: web.json_response(
        {"error": {"message": "model overloaded", "type": "server_error"}}, status=503
    )
    with pytest.raises(TranscriptionError, match="answered 503: model overloaded"):
        await OpenAICompatibleTranscriber(backend.url, "w").transcribe(sentence_wav)


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        ("<html>proxy error</html>", "not JSON"),
        ("[1, 2]", "not an object"),
        ('{"segments": [{"start": "soon", "end": 1, "text": "x"}]}', "malformed segments"),
    ],
)
async def test_nonsense_answers_are_transcription_errors(
    backend: Backend, sentence_wav: Path, body: str, cause: str
) -> None:
    backend.answer = lambda form: web.Response(text=body, content_type="application/json")
    with pytest.raises(TranscriptionError, match=cause):
        await OpenAICompatibleTranscriber(backend.url, "w").transcribe(sentence_wav)


async def test_api_key_is_sent_as_bearer_and_v1_in_the_url_is_understood(
    backend: Backend, sentence_wav: Path
) -> None:
    backend.answer = lambda form: web.json_response({"text": "ok", "language": "en"})
    remote = OpenAICompatibleTranscriber(f"{backend.url}/v1/", "w", api_key="sk-x")
    assert (await remote.transcribe(sentence_wav)).text == "ok"
    assert backend.authorizations == ["Bearer sk-x"]
