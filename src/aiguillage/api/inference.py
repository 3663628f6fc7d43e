"""The hot path: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.

Written as a bare ASGI endpoint rather than a framework route because every
microsecond here is paid on every request (see bench/RESULTS.md): the body is
read once as bytes, the engine's answer goes back as bytes, streams chunk by
chunk. A task watches the client's connection while the engine works, and
cancels the upstream request when the client goes away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

from aiguillage.accounting.stream_usage import SseUsageFilter, TokenCounts, counts_from_body
from aiguillage.accounting.usage import UsageRecord, UsageSource
from aiguillage.api.asgi import (
    ClientGone,
    Receive,
    Scope,
    Send,
    read_body,
    request_headers,
    send_error,
)
from aiguillage.api.errors import (
    ApiError,
    bad_gateway,
    error_body,
    forbidden,
    gateway_timeout,
    invalid_request,
    not_found,
    require_media_type,
)
from aiguillage.api.payload import (
    RelayedRequest,
    parse_inference_request,
    parse_priority_header,
)
from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.backends.http_client import UpstreamError, UpstreamTimeout
from aiguillage.backends.relay import Upstream
from aiguillage.catalog.catalog import ModelEntry
from aiguillage.dispatch.tickets import RoutingMode, Ticket
from aiguillage.gateway import Gateway

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "(unknown)"


class _Exchange:
    """What one request has gathered so far, for its ledger row."""

    __slots__ = (
        "backend",
        "cancelled",
        "client_gone",
        "counts",
        "data_events",
        "finished",
        "identity",
        "model",
        "request_id",
        "started",
        "started_at",
        "status",
        "stream",
        "ttft",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started = time.perf_counter()
        self.started_at = datetime.now(UTC)
        self.identity: ApiKeyRecord | None = None
        self.model = UNKNOWN_MODEL
        self.backend: str | None = None
        self.stream = False
        self.status = 0
        self.ttft: float | None = None
        self.counts: TokenCounts | None = None
        self.data_events = 0
        self.cancelled = False
        self.client_gone = False
        self.finished = False

    def usage_row(self, endpoint: str) -> UsageRecord:
        counts, source = self.counts, UsageSource.ENGINE
        if counts is None:
            source = UsageSource.NONE
            if self.stream and self.data_events:
                counts, source = TokenCounts(None, self.data_events), UsageSource.ESTIMATED
        identity = self.identity
        return UsageRecord(
            started_at=self.started_at,
            request_id=self.request_id,
            key_id=identity.id if identity else None,
            organisation=identity.organisation if identity else None,
            model=self.model,
            backend=self.backend,
            endpoint=endpoint,
            status=self.status,
            stream=self.stream,
            cancelled=self.cancelled,
            prompt_tokens=counts.prompt if counts else None,
            completion_tokens=counts.completion if counts else None,
            usage_source=source,
            ttft_ms=None if self.ttft is None else (self.ttft - self.started) * 1000,
            duration_ms=(time.perf_counter() - self.started) * 1000,
        )


class InferenceEndpoint:
    """One OpenAI inference route, relayed to an engine of the requested model."""

    def __init__(self, gateway: Gateway, path: str, *, streamable: bool) -> None:
        self.gateway = gateway
        self.path = path
        self.endpoint = path.removeprefix("/v1/")
        self.streamable = streamable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = request_headers(scope)
        exchange = _Exchange(headers.get("x-request-id") or os.urandom(12).hex())
        watcher: asyncio.Task[None] | None = None
        try:
            request = await self._admit(scope, receive, headers, exchange)
            watcher = asyncio.ensure_future(self._watch(receive, exchange, asyncio.current_task()))
            await self._relay(request, headers, exchange, send)
        except ApiError as error:
            exchange.status = error.status
            await self._send_error(send, error, exchange)
        except ClientGone:
            exchange.status, exchange.cancelled = 499, True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not exchange.client_gone or task is None:
                raise
            task.uncancel()  # we cancelled ourselves: the client left
            exchange.cancelled = True
            exchange.status = exchange.status or 499
        except Exception:  # a bug of ours: log it, answer cleanly, keep serving
            log.exception("unexpected error on %s (request %s)", self.path, exchange.request_id)
            exchange.status = 500
            if not exchange.finished:
                await send_error(
                    send, ApiError(500, "Internal gateway error.", type="server_error")
                )
        finally:
            exchange.finished = True
            if watcher is not None:
                watcher.cancel()
            if exchange.identity is not None:
                self.gateway.record(exchange.usage_row(self.endpoint))

    async def _admit(
        self, scope: Scope, receive: Receive, headers: dict[str, str], exchange: _Exchange
    ) -> RelayedRequest:
        """Authenticate, read and check the body, resolve the model; raise `ApiError` if not."""
        if scope["method"] != "POST":
            raise ApiError(
                405,
                f"Use POST for {self.path}.",
                type="invalid_request_error",
                code="method_not_allowed",
                headers={"allow": "POST"},
            )
        identity = await self.gateway.authenticator.authenticate(headers.get("authorization"))
        exchange.identity = identity
        request = await self._read_request(receive, headers)
        entry = self.gateway.catalog.resolve(request.model)
        if entry is None:
            raise not_found(f"The model '{request.model}' does not exist.", param="model")
        self._check_kind(entry)
        exchange.model = entry.name
        exchange.stream = request.stream
        if not identity.may_use(entry.name):
            raise forbidden(f"This API key may not use the model '{entry.name}'.")
        return request

    async def _read_request(self, receive: Receive, headers: dict[str, str]) -> RelayedRequest:
        """The JSON body, parsed and checked; the audio routes read multipart instead."""
        content_type = headers.get("content-type", "")
        require_media_type(
            content_type,
            "application/json",
            "Send the body as JSON with 'Content-Type: application/json'",
        )
        raw = await read_body(receive, headers, self.gateway.config.max_body_bytes)
        request = parse_inference_request(raw, streamable=self.streamable)
        header_priority = parse_priority_header(headers.get("x-priority"))
        if header_priority is not None and request.priority is None:
            request.priority = header_priority
        return request

    def _check_kind(self, entry: ModelEntry) -> None:
        """Refuse a model these routes cannot use, before it takes a place in a queue."""
        if entry.config.kind == "transcription":
            raise invalid_request(
                f"The model '{entry.name}' transcribes speech: use POST /v1/audio/transcriptions.",
                param="model",
                code="wrong_model_kind",
            )

    async def _relay(
        self, request: RelayedRequest, headers: dict[str, str], exchange: _Exchange, send: Send
    ) -> None:
        identity = exchange.identity
        assert identity is not None
        entry = self.gateway.catalog.resolve(request.model)
        assert entry is not None
        priority = identity.priority  # a key's priority is a ceiling: requests may only lower it
        if request.priority is not None:
            priority = min(priority, request.priority)
        ticket = Ticket(
            model=entry,
            organisation=identity.organisation,
            priority=priority,
            key_id=identity.id,
            queue_threshold=identity.queue_threshold,
            routing_mode=RoutingMode(identity.routing_mode),
            prefix=(
                request.prefix(entry.config.prefix_chars)
                if entry.config.routing_strategy == "prefix-affinity"
                else None
            ),
        )
        upstream = await self.gateway.relay.open(ticket, self.path, request, exchange.request_id)
        ok: bool | None = None  # how it went, for the backend's circuit breaker
        try:
            backend = upstream.backend
            exchange.backend = backend.name
            exchange.status = upstream.status
            extra = [
                (b"x-request-id", exchange.request_id.encode()),
                (b"x-aiguillage-backend", backend.name.encode()),
                (b"x-aiguillage-queue-ms", f"{ticket.waited_s * 1000:.1f}".encode()),
            ]
            is_sse = upstream.response.content_type == "text/event-stream"
            if request.stream and is_sse and upstream.status < 400:
                ok = await self._relay_stream(upstream, extra, exchange, send)
                return
            try:
                payload = await upstream.response.read()
            except UpstreamError as error:
                ok = False
                raise _broken_answer(entry.name, error) from None
            exchange.ttft = time.perf_counter()
            backend.observe_ttft(time.monotonic() - upstream.lease.acquired_at)
            ok = upstream.status < 500
            if upstream.status < 400:
                exchange.counts = counts_from_body(payload)
            exchange.finished = True
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": upstream.headers + extra,
                }
            )
            await send({"type": "http.response.body", "body": payload})
        finally:
            self.gateway.relay.end(upstream, ok)

    async def _relay_stream(
        self,
        upstream: Upstream,
        extra: list[tuple[bytes, bytes]],
        exchange: _Exchange,
        send: Send,
    ) -> bool:
        """Relay SSE events as they come; a backend dying mid-stream ends it with an error event.

        Returns whether the backend finished its answer.
        """
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": upstream.headers + extra,
            }
        )
        sse = SseUsageFilter(upstream.withhold_usage)
        lease = upstream.lease
        finished = True
        try:
            async for chunk in upstream.response.iter_chunks():
                out = sse.feed(chunk)
                if out:
                    now = time.monotonic()
                    if exchange.ttft is None:
                        exchange.ttft = time.perf_counter()
                        upstream.backend.observe_ttft(now - lease.acquired_at)
                    lease.renew(now)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            tail = sse.flush()
        except UpstreamError as error:
            log.warning(
                "backend %s broke a stream: %s", upstream.backend.name, type(error).__name__
            )
            finished = False
            exchange.status = 502
            tail = (
                b"data: "
                + error_body(
                    "The backend stopped in the middle of the answer; the output is incomplete.",
                    type="upstream_error",
                    code="stream_interrupted",
                )
                + b"\n\n"
            )
        finally:
            exchange.counts, exchange.data_events = sse.counts, sse.data_events
        exchange.finished = True
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return finished

    async def _watch(
        self, receive: Receive, exchange: _Exchange, task: asyncio.Task[Any] | None
    ) -> None:
        """Cancel the request's task if the client disconnects before its answer ends."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not exchange.finished and task is not None:
            exchange.client_gone = True
            task.cancel()

    async def _send_error(self, send: Send, error: ApiError, exchange: _Exchange) -> None:
        if error.status >= 500:
            log.info("request %s: %d %s", exchange.request_id, error.status, error.code)
        exchange.finished = True
        await send_error(send, error, request_id=exchange.request_id)


def _broken_answer(model: str, error: BaseException) -> ApiError:
    if isinstance(error, UpstreamTimeout):
        return gateway_timeout(f"The backend serving '{model}' did not finish its answer in time.")
    return bad_gateway(f"The backend serving '{model}' broke the connection while answering.")
