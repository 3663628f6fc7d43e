"""Sending a request to an engine, with failover before the first byte.

The relay posts the body bytes on the backend's pooled connection and hands
back the engine's response as soon as its headers arrive. A connection that
fails, or a 5xx, before anything reached the client is retried on another
backend of the model; after the first byte nothing can be retried, and the
caller ends the answer cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp

from aiguillage.api.errors import ApiError, bad_gateway, gateway_timeout, unavailable
from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.backends.backend import Backend
from aiguillage.catalog.catalog import ModelEntry
from aiguillage.dispatch.dispatcher import Dispatcher, Lease, NoBackendAvailable
from aiguillage.observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# Headers that describe one hop, or that the ASGI server writes itself.
_NOT_RELAYED = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "server",
        "date",
    }
)


@dataclass(slots=True)
class UpstreamResponse:
    """An engine's answer whose headers have arrived; the body is still to be read."""

    lease: Lease
    response: aiohttp.ClientResponse
    headers: list[tuple[bytes, bytes]]
    attempts: int

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def backend(self) -> Backend:
        return self.lease.backend


class Relay:
    def __init__(
        self, dispatcher: Dispatcher, metrics: GatewayMetrics, max_attempts: int = 3
    ) -> None:
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._max_attempts = max_attempts

    async def open(
        self,
        model: ModelEntry,
        identity: ApiKeyRecord,
        priority: int,
        path: str,
        body: bytes,
        request_id: str,
    ) -> UpstreamResponse:
        """Post `body` to a backend of `model` and return once the engine's headers are in."""
        tried: list[Backend] = []
        last_error: ApiError | None = None
        attempts = min(self._max_attempts, len(model.backends))
        for attempt in range(1, attempts + 1):
            try:
                lease = await self._dispatcher.acquire(model, identity, priority, exclude=tried)
            except NoBackendAvailable:
                break
            backend = lease.backend
            tried.append(backend)
            self._metrics.backend_in_flight(backend.name).inc()
            try:
                response = await backend.session.post(
                    backend.url(path),
                    data=body,
                    headers={
                        **backend.auth_headers,
                        "Content-Type": "application/json",
                        "Accept-Encoding": "identity",
                        "X-Request-Id": request_id,
                    },
                )
            except BaseException as error:
                self._end_lease(lease)
                if not isinstance(error, Exception):
                    raise  # cancelled: the client went away
                last_error = self._failure(backend, model, error)
                continue
            if response.status >= 500 and attempt < attempts and len(tried) < len(model.backends):
                self._metrics.upstream_failures.labels(
                    backend.name, f"http_{response.status}"
                ).inc()
                log.warning("backend %s answered %d; trying another", backend.name, response.status)
                response.release()
                self._end_lease(lease)
                continue
            return UpstreamResponse(lease, response, relayable_headers(response), attempt)
        if last_error is not None:
            raise last_error
        raise unavailable(
            f"No backend of model '{model.name}' is available right now; retry shortly."
        )

    def end(self, upstream: UpstreamResponse) -> None:
        """Give the connection back (dropped if unread) and end the lease; idempotent."""
        upstream.response.release()
        self._end_lease(upstream.lease)

    def _end_lease(self, lease: Lease) -> None:
        if not lease.released:
            self._metrics.backend_in_flight(lease.backend.name).dec()
        lease.release()

    def _failure(self, backend: Backend, model: ModelEntry, error: Exception) -> ApiError:
        """Turn a transport error into what the client should see, and mark the backend."""
        if isinstance(error, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
            cause, api_error = (
                "timeout",
                gateway_timeout(f"The backend serving '{model.name}' did not answer in time."),
            )
        elif isinstance(error, aiohttp.ClientConnectorError | ConnectionError):
            backend.mark_down(f"connect: {error}")
            cause, api_error = (
                "connect",
                unavailable(
                    f"No backend of model '{model.name}' could be reached; retry shortly.",
                    code="backend_unreachable",
                ),
            )
        else:
            cause, api_error = (
                "protocol",
                bad_gateway(
                    f"The backend serving '{model.name}' broke the connection before answering."
                ),
            )
        self._metrics.upstream_failures.labels(backend.name, cause).inc()
        log.warning("backend %s failed (%s): %s", backend.name, cause, type(error).__name__)
        return api_error


def relayable_headers(response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    """The engine's headers minus hop-by-hop ones, as ASGI wants them."""
    return [
        (name.lower(), value)
        for name, value in response.raw_headers
        if name.decode("latin-1").lower() not in _NOT_RELAYED
    ]
