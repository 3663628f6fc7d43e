"""Reading a job's multipart form as it arrives: the file goes to disk, never whole in memory.

Starlette's own form parser spools every file to a temporary file before the
route sees it, with no size limit; here the route opens the job's media file
first, and each chunk of the `file` part is written there as it is parsed, so
the limit is enforced while the client is still sending.
"""

from __future__ import annotations

from typing import BinaryIO
from urllib.parse import parse_qsl

from python_multipart.multipart import MultipartParser, parse_options_header

FILE_FIELD = "file"
TEXT_FIELDS = ("url", "options")
MAX_TEXT_FIELD_BYTES = 64 * 1024


class FormError(ValueError):
    """A form the job API cannot accept; the message is for the client."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UploadTooLarge(FormError):
    """The file is over the configured limit."""


class StreamingForm:
    """Feed it the body's chunks; it writes the file part to `sink` and keeps the text fields.

    A job from a URL has no file, so an urlencoded form is accepted too (`url`, `options`).
    """

    def __init__(self, content_type: str | None, sink: BinaryIO, max_file_bytes: int) -> None:
        kind, parameters = parse_options_header(content_type or "")
        boundary = parameters.get(b"boundary")
        self._urlencoded: bytearray | None = None
        if kind == b"application/x-www-form-urlencoded":
            self._urlencoded = bytearray()
            boundary = b"unused"
        elif kind != b"multipart/form-data" or not boundary:
            raise FormError("Send the job as multipart/form-data (a `file` or a `url`, `options`).")
        self.fields: dict[str, str] = {}
        self.file_bytes = 0
        self.file_name: str | None = None
        self.has_file = False
        self._sink = sink
        self._max_file_bytes = max_file_bytes
        self._headers: dict[str, str] = {}
        self._header_field = b""
        self._header_value = b""
        self._part: str | None = None
        self._text = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._add_header_field,
                "on_header_value": self._add_header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        """Parse one chunk of the body (blocking: file writes happen here)."""
        if self._urlencoded is not None:
            self._urlencoded += chunk
            if len(self._urlencoded) > len(TEXT_FIELDS) * MAX_TEXT_FIELD_BYTES:
                raise FormError("The form is too long.")
            return
        try:
            self._parser.write(chunk)
        except FormError:
            raise
        except Exception as error:  # python-multipart's parse errors
            raise FormError(f"The multipart body is malformed: {error}") from None

    def finish(self) -> None:
        if self._urlencoded is not None:
            self._finish_urlencoded(bytes(self._urlencoded))
            return
        self._parser.finalize()
        self._sink.flush()

    def _finish_urlencoded(self, body: bytes) -> None:
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise FormError("The form is not UTF-8.") from None
        for name, value in pairs:
            if name not in TEXT_FIELDS:
                raise FormError(
                    f"Unknown form field {name!r}: expected `url` and `options`.", param=name
                )
            self.fields[name] = value

    def _part_begin(self) -> None:
        self._headers = {}
        self._part = None
        self._text = bytearray()

    def _add_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _add_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        name = self._header_field.decode("latin-1").lower()
        self._headers[name] = self._header_value.decode("utf-8", "replace")
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        disposition = self._headers.get("content-disposition", "")
        _, parameters = parse_options_header(disposition)
        name = parameters.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD:
            if self.has_file:
                raise FormError("Send one `file` only.", param=FILE_FIELD)
            self.has_file = True
            filename = parameters.get(b"filename")
            self.file_name = filename.decode("utf-8", "replace") if filename else None
        elif name not in TEXT_FIELDS:
            raise FormError(
                f"Unknown form field {name!r}: expected `file` or `url`, and `options`.",
                param=name,
            )
        self._part = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == FILE_FIELD:
            self.file_bytes += end - start
            if self.file_bytes > self._max_file_bytes:
                raise UploadTooLarge(
                    f"The file is larger than the limit of {self._max_file_bytes} bytes.",
                    param=FILE_FIELD,
                )
            self._sink.write(data[start:end])
            return
        self._text += data[start:end]
        if len(self._text) > MAX_TEXT_FIELD_BYTES:
            raise FormError(f"The field `{self._part}` is too long.", param=self._part)

    def _part_end(self) -> None:
        if self._part in TEXT_FIELDS:
            try:
                self.fields[self._part] = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise FormError(
                    f"The field `{self._part}` is not UTF-8.", param=self._part
                ) from None
