"""`POST /v1/audio/transcriptions`: short media relayed to a transcription backend.

The request is OpenAI's multipart form (`file`, `model`, `language`, `response_format`
and optional fields). The gateway reads only what routing needs, `model`, and checks
what it can answer better than a backend (a missing file, an unknown format); the body
goes to the backend as received, and through the same dispatcher, leases, failover and
ledger as the inference routes. Long media belong to the asynchronous jobs, which never
meet an HTTP timeout.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Final

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from aiguillage.api.asgi import Receive, read_body
from aiguillage.api.errors import ApiError, invalid_request, require_media_type
from aiguillage.api.inference import InferenceEndpoint
from aiguillage.api.payload import RelayedRequest, parse_priority_header
from aiguillage.catalog.catalog import ModelEntry
from aiguillage.gateway import Gateway
from aiguillage.speech.formats import RESPONSE_FORMATS

TRANSCRIPTIONS_PATH: Final = "/v1/audio/transcriptions"
# Form fields are small (a prompt at most); only the file may be large.
_MAX_FIELD_BYTES: Final = 64 * 1024


@dataclass(slots=True)
class TranscriptionRequest:
    """A multipart transcription request, with the original bytes kept for forwarding."""

    raw: bytes
    raw_content_type: str
    fields: list[tuple[str, str]]
    file_name: str
    file_type: str
    file_data: bytes
    model: str
    priority: int | None
    stream: bool = False  # the relay reads the whole answer: transcripts are short here

    @property
    def content_type(self) -> str:
        return self.raw_content_type

    def upstream_body(
        self, served_name: str, engine_priority: int | None = None
    ) -> tuple[bytes, bool]:
        """The body as received, re-encoded only when the backend's model name differs."""
        if self.model == served_name:
            return self.raw, False
        fields = [(n, served_name if n == "model" else v) for n, v in self.fields]
        body, self.raw_content_type = encode_multipart(
            fields, self.file_name, self.file_type, self.file_data
        )
        self.raw, self.model = body, served_name  # a retry on another backend reuses it
        return body, False

    def prefix(self, chars: int) -> str | None:
        return None  # no prompt to keep on one backend's cache


async def parse_transcription_request(raw: bytes, content_type: str) -> TranscriptionRequest:
    """Parse and check a multipart body; raise a 400 `ApiError` that says what is wrong."""
    require_media_type(
        content_type,
        "multipart/form-data",
        "Send the body as 'multipart/form-data' with the media in a 'file' field",
    )

    async def body() -> AsyncGenerator[bytes, None]:
        yield raw

    parser = MultiPartParser(
        Headers({"content-type": content_type}),
        body(),
        max_files=1,
        max_fields=32,
        max_part_size=_MAX_FIELD_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise invalid_request(f"The multipart body cannot be read: {error.message}") from None
    try:
        return await _checked(raw, content_type, form.multi_items())
    finally:
        await form.close()


async def _checked(
    raw: bytes, content_type: str, items: list[tuple[str, str | UploadFile]]
) -> TranscriptionRequest:
    fields = [(name, value) for name, value in items if isinstance(value, str)]
    files = [(name, value) for name, value in items if not isinstance(value, str)]
    values = dict(fields)
    if not files or files[0][0] != "file":
        raise invalid_request(
            "The 'file' field is required: the media to transcribe.", param="file"
        )
    upload = files[0][1]
    data = await upload.read()
    if not data:
        raise invalid_request("The uploaded file is empty.", param="file")
    model = values.get("model", "").strip()
    if not model:
        raise invalid_request("The 'model' field is required.", param="model")
    response_format = values.get("response_format", "json")
    if response_format not in RESPONSE_FORMATS:
        raise invalid_request(
            f"The 'response_format' field must be one of {', '.join(RESPONSE_FORMATS)}, "
            f"not '{response_format}'.",
            param="response_format",
        )
    if values.get("stream", "false").lower() == "true":
        raise invalid_request("This endpoint does not stream.", param="stream")
    return TranscriptionRequest(
        raw=raw,
        raw_content_type=content_type,
        fields=fields,
        file_name=upload.filename or "audio",
        file_type=upload.content_type or "application/octet-stream",
        file_data=data,
        model=model,
        priority=None,  # the X-Priority header sets it: the form goes to the backend as is
    )


def encode_multipart(
    fields: list[tuple[str, str]], file_name: str, file_type: str, file_data: bytes
) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type: the fields, then `file`."""
    boundary = "aiguillage-" + os.urandom(12).hex()
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"\r\n\r\n'
        f"{value}\r\n".encode()
        for name, value in fields
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{_quoted(file_name)}"\r\nContent-Type: {file_type}\r\n\r\n'.encode()
        + file_data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _quoted(value: str) -> str:
    """A name safe inside a quoted header parameter (no quote, CR or LF to break out)."""
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "").replace("\n", "")


class TranscriptionEndpoint(InferenceEndpoint):
    """The inference relay, reading a multipart form and serving only transcription models."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(gateway, TRANSCRIPTIONS_PATH, streamable=False)

    async def _read_request(self, receive: Receive, headers: dict[str, str]) -> RelayedRequest:
        limit = self.gateway.config.max_audio_bytes
        try:
            raw = await read_body(receive, headers, limit)
        except ApiError as error:
            if error.status != 413:
                raise
            raise ApiError(
                413,
                f"The upload is larger than the {limit // (1024 * 1024)} MiB limit of "
                "synchronous transcription; submit long media as a transcription job.",
                type="invalid_request_error",
                param="file",
                code="file_too_large",
            ) from None
        request = await parse_transcription_request(raw, headers.get("content-type", ""))
        request.priority = parse_priority_header(headers.get("x-priority"))
        return request

    def _check_kind(self, entry: ModelEntry) -> None:
        if entry.config.kind != "transcription":
            raise invalid_request(
                f"The model '{entry.name}' is a {entry.config.kind} model, "
                "not a transcription model.",
                param="model",
                code="wrong_model_kind",
            )
