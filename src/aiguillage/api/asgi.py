"""The few ASGI helpers the bare endpoints need: headers, body, JSON answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiguillage.api.errors import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The client closed its connection before the answer ended."""


def request_headers(scope: Scope) -> dict[str, str]:
    """Request headers by lower-case name (ASGI servers lower-case them already)."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit`."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": JSON_HEADERS + (headers or [])}
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: ApiError, request_id: str | None = None) -> None:
    headers = [(name.encode(), value.encode()) for name, value in error.headers.items()]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await send_json(send, error.status, error.body(), headers)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than the limit of {limit} bytes.",
        type="invalid_request_error",
        code="request_too_large",
    )
