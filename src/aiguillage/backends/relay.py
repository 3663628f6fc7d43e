"""Sending a request to an engine, with failover before the first byte.

The relay posts the body bytes on the backend's pooled connection and hands
back the engine's response as soon as its headers arrive. A connection that
fails, or a 5xx, before anything reached the client is retried on another
backend of the model; after the first byte nothing can be retried, and the
caller ends the answer cleanly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiguillage.api.errors import (
    ApiError,
    bad_gateway,
    forbidden,
    gateway_timeout,
    unavailable,
)
from aiguillage.api.payload import MAX_PRIORITY, RelayedRequest
from aiguillage.backends.backend import Backend
from aiguillage.backends.http_client import (
    UpstreamConnectError,
    UpstreamTimeout,
)
from aiguillage.backends.http_client import (
    UpstreamResponse as HttpResponse,
)
from aiguillage.catalog.catalog import ModelEntry
from aiguillage.dispatch.dispatcher import (
    Dispatcher,
    DispatchError,
    NoBackendAvailable,
    NoPrivateBackend,
    QueueFull,
    QueueTimeout,
    SchedulerUnavailable,
)
from aiguillage.dispatch.tickets import Lease, Ticket
from aiguillage.observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# Headers that describe one hop, or that the ASGI server writes itself.
_NOT_RELAYED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"server",
        b"date",
    }
)


@dataclass(slots=True)
class Upstream:
    """An engine's answer whose headers have arrived; the body is still to be read."""

    lease: Lease
    response: HttpResponse
    headers: list[tuple[bytes, bytes]]
    attempts: int
    withhold_usage: bool  # we asked for stream usage: drop that event before the client

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
        self.dispatcher = dispatcher
        self._metrics = metrics
        self._max_attempts = max_attempts

    async def open(
        self,
        ticket: Ticket,
        path: str,
        request: RelayedRequest,
        request_id: str,
    ) -> Upstream:
        """Get a lease, post the body, and return once the engine's headers are in.

        A failure before any byte came back (connection refused, timeout, 5xx)
        tries another backend with the same ticket, so it keeps its place in line.
        """
        model = ticket.model
        last_error: ApiError | None = None
        attempts = min(self._max_attempts, len(model.backends))
        for attempt in range(1, attempts + 1):
            try:
                lease = await self.dispatcher.acquire(ticket)
            except DispatchError as error:
                if last_error is not None and isinstance(error, NoBackendAvailable):
                    raise last_error from None
                raise _dispatch_error(model, error) from None
            backend = lease.backend
            ticket.exclude = ticket.exclude | {backend}
            self._metrics.backend_in_flight(backend.name).inc()
            engine_priority = (
                MAX_PRIORITY - ticket.priority if backend.config.priority_scheduling else None
            )
            body, withhold_usage = request.upstream_body(model.served_name, engine_priority)
            try:
                response = await backend.pool.request(
                    "POST",
                    backend.path(path),
                    [
                        *backend.auth_headers,
                        ("Content-Type", request.content_type),
                        ("Accept-Encoding", "identity"),
                        ("X-Request-Id", request_id),
                    ],
                    body,
                )
            except BaseException as error:
                if not isinstance(error, Exception):
                    self.end_lease(lease, ok=None)
                    raise  # cancelled: the client went away
                self.end_lease(lease, ok=False)
                last_error = self._failure(backend, model, error)
                continue
            if response.status >= 500 and attempt < attempts and _another_backend(ticket):
                self._metrics.upstream_failures.labels(
                    backend.name, f"http_{response.status}"
                ).inc()
                log.warning("backend %s answered %d; trying another", backend.name, response.status)
                response.release()
                self.end_lease(lease, ok=False)
                continue
            return Upstream(lease, response, relayable_headers(response), attempt, withhold_usage)
        assert last_error is not None
        raise last_error

    def end(self, upstream: Upstream, ok: bool | None) -> None:
        """Give the connection back (dropped if unread) and end the lease; idempotent."""
        upstream.response.release()
        self.end_lease(upstream.lease, ok)

    def end_lease(self, lease: Lease, ok: bool | None) -> None:
        if not lease.released:
            self._metrics.backend_in_flight(lease.backend.name).dec()
        self.dispatcher.release(lease, ok)

    def _failure(self, backend: Backend, model: ModelEntry, error: Exception) -> ApiError:
        """Turn a transport error into what the client should see."""
        if isinstance(error, UpstreamTimeout):
            cause, api_error = (
                "timeout",
                gateway_timeout(f"The backend serving '{model.name}' did not answer in time."),
            )
        elif isinstance(error, UpstreamConnectError):
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


def _another_backend(ticket: Ticket) -> bool:
    """Whether a retry could go anywhere: if not, the engine's own 5xx is the best answer."""
    return any(b.usable() for b in ticket.model.backends if b not in ticket.exclude)


def _dispatch_error(model: ModelEntry, error: DispatchError) -> ApiError:
    """What a client sees when the dispatcher cannot serve it."""
    name = model.name
    if isinstance(error, QueueFull):
        return ApiError(
            429,
            f"Too many of your requests are already waiting for '{name}'; retry later.",
            type="rate_limit_error",
            code="queue_threshold_exceeded",
            headers={"retry-after": "2"},
        )
    if isinstance(error, QueueTimeout):
        return unavailable(
            f"Too many users on '{name}' right now: no backend became free in "
            f"{model.config.queue_timeout_s:g} s. Retry shortly.",
            code="queue_timeout",
            retry_after_s=max(1, round(model.config.queue_timeout_s / 6)),
        )
    if isinstance(error, SchedulerUnavailable):
        return unavailable(
            "The gateway's shared scheduler is unreachable for a moment; retry shortly.",
            code="scheduler_unavailable",
            retry_after_s=1,
        )
    if isinstance(error, NoPrivateBackend):
        return forbidden(
            f"This API key may only use its organisation's servers, and none serves '{name}'.",
            code="no_private_backend",
        )
    return unavailable(f"No backend of model '{name}' is available right now; retry shortly.")


def relayable_headers(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    """The engine's headers minus hop-by-hop ones, as ASGI wants them."""
    relayed = []
    for name, value in response.headers:
        lower = name.lower()
        if lower not in _NOT_RELAYED:
            relayed.append((lower, value))
    return relayed
