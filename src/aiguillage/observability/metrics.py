"""Prometheus metrics, all under the `aiguillage_` prefix.

With several worker processes, prometheus-client's multiprocess mode is used
(`PROMETHEUS_MULTIPROC_DIR`, set by `aiguillage serve --workers N`), so that
`/metrics` sums every worker instead of showing whichever answered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True, slots=True)
class _RequestChildren:
    latency: Any
    ttft: Any
    prompt_tokens: Any
    completion_tokens: Any


class GatewayMetrics:
    """The gateway's metrics, registered in a registry of their own (one per app)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "aiguillage_requests",
            "Requests answered, by model, endpoint and status code.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "aiguillage_request_duration_seconds",
            "Time from request to the end of the answer.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "aiguillage_time_to_first_token_seconds",
            "Time from request to the first relayed byte.",
            ["model", "endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "aiguillage_tokens",
            "Tokens reported by the engines, by model and kind.",
            ["model", "kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "aiguillage_backend_in_flight",
            "Requests in flight on each backend.",
            ["backend"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.backend_up = Gauge(
            "aiguillage_backend_up",
            "1 when the backend answered its last health probe.",
            ["backend"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.upstream_failures = Counter(
            "aiguillage_upstream_failures",
            "Failed attempts to reach a backend, by cause.",
            ["backend", "cause"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "aiguillage_queue_depth",
            "Requests waiting for a backend, by model and priority.",
            ["model", "priority"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.circuit_open = Gauge(
            "aiguillage_backend_circuit_open",
            "1 while the backend's circuit breaker is open.",
            ["backend"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.critical_degraded = Gauge(
            "aiguillage_critical_model_degraded",
            "1 when a critical model has fewer usable backends than its minimum (alert on it).",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.scheduler_unavailable = Gauge(
            "aiguillage_scheduler_unavailable",
            "1 while the shared scheduler (Redis) cannot be reached: requests get 503 at once.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ledger_dropped = Counter(
            "aiguillage_ledger_dropped_rows",
            "Usage rows dropped because the database stayed unreachable and the buffer was full.",
            registry=r,
        )

        # labels() takes a lock and builds a key each call: the hot path keeps the children
        self._request_children: dict[tuple[str, str], _RequestChildren] = {}
        self._status_children: dict[tuple[str, str, int], Any] = {}
        self._in_flight_children: dict[str, Any] = {}
        self._queue_levels: dict[str, set[int]] = {}

    def observe_request(
        self,
        model: str,
        endpoint: str,
        status: int,
        duration_s: float,
        ttft_s: float | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """Everything one finished request adds to the metrics."""
        children = self._request_children.get((model, endpoint))
        if children is None:
            children = _RequestChildren(
                self.latency.labels(model, endpoint),
                self.ttft.labels(model, endpoint),
                self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "completion"),
            )
            self._request_children[(model, endpoint)] = children
        counter = self._status_children.get((model, endpoint, status))
        if counter is None:
            counter = self.requests.labels(model, endpoint, str(status))
            self._status_children[(model, endpoint, status)] = counter
        counter.inc()
        children.latency.observe(duration_s)
        if ttft_s is not None:
            children.ttft.observe(ttft_s)
        if prompt_tokens:
            children.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            children.completion_tokens.inc(completion_tokens)

    def set_queue_depth(self, model: str, snapshot: dict[int, dict[str, int]]) -> None:
        """Per priority, how many wait; levels that emptied are set back to 0."""
        seen = self._queue_levels.setdefault(model, set())
        for priority in seen - set(snapshot):
            self.queue_depth.labels(model, str(priority)).set(0)
        for priority, organisations in snapshot.items():
            self.queue_depth.labels(model, str(priority)).set(sum(organisations.values()))
        seen |= set(snapshot)

    def backend_in_flight(self, backend: str) -> Any:
        """The in-flight gauge of one backend (cached child)."""
        child = self._in_flight_children.get(backend)
        if child is None:
            child = self._in_flight_children[backend] = self.in_flight.labels(backend)
        return child

    def render(self) -> bytes:
        """The text exposition; sums all workers in multiprocess mode."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
