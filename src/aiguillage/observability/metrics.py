"""Prometheus metrics, all under the `aiguillage_` prefix.

With several worker processes, prometheus-client's multiprocess mode is used
(`PROMETHEUS_MULTIPROC_DIR`, set by `aiguillage serve --workers N`), so that
`/metrics` sums every worker instead of showing whichever answered.
"""

from __future__ import annotations

import os

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
        self.ledger_dropped = Counter(
            "aiguillage_ledger_dropped_rows",
            "Usage rows dropped because the database stayed unreachable and the buffer was full.",
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition; sums all workers in multiprocess mode."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
