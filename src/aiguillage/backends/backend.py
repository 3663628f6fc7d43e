"""A backend: one engine URL with its pooled keep-alive connection and live state."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiguillage.backends.circuit import CircuitBreaker
from aiguillage.backends.http_client import HttpPool
from aiguillage.catalog.config import EngineKind, ServerConfig

if TYPE_CHECKING:
    from aiguillage.backends.signals import EngineLoad

TTFT_EWMA_WEIGHT = 0.2  # weight of the newest TTFT in the running average


class Backend:
    """One OpenAI-compatible engine, shared by every model it serves.

    It owns one pool of keep-alive connections, so the cost of TCP set-up is
    paid once per connection, not once per request.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        circuit: CircuitBreaker | None = None,
    ) -> None:
        self.config = config
        self.base_url = config.base_url
        parts = urlsplit(self.base_url)
        self.name = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        if parts.path not in ("", "/"):
            self.name += parts.path
        self.engine: EngineKind = config.engine
        self.max_concurrency = config.max_concurrency
        self.site = config.site
        self.owner = config.owner
        self.owner_reserved = config.owner_reserved
        self.weight = config.weight
        self.in_flight = 0
        self.reserved_for_critical = 0  # slots that only critical models may use
        self.healthy = True
        self.last_error: str | None = None
        self.circuit = circuit or CircuitBreaker()
        self.load: EngineLoad | None = None  # the engine's own signals, scraped
        self.load_stale = False  # the last scrape failed: `load` is old
        self.ttft_ewma_s: float | None = None  # our own recent TTFT measurements
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._base_path = parts.path.rstrip("/")
        token = config.token.get_secret_value() if config.token else None
        self.auth_headers: list[tuple[str, str]] = (
            [("Authorization", f"Bearer {token}")] if token else []
        )
        self.pool = HttpPool(
            self.base_url, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s
        )

    def path(self, api_path: str) -> str:
        """The engine's path for an OpenAI path such as `/v1/chat/completions`.

        A base URL may already end in `/v1` (as OpenAI clients write it) or not.
        """
        if self._base_path.endswith("/v1") and api_path.startswith("/v1/"):
            return self._base_path + api_path[3:]
        return self._base_path + api_path

    def root_path(self, path: str) -> str:
        """A path at the engine's root, beside `/v1` (where `/health` and `/metrics` live)."""
        return self._base_path.removesuffix("/v1") + path

    def url(self, api_path: str) -> str:
        return self._origin + self.path(api_path)

    @property
    def metrics_url(self) -> str:
        """Where the engine publishes its Prometheus metrics (at its root, not under /v1)."""
        return self._origin + self.root_path("/metrics")

    def observe_ttft(self, seconds: float) -> None:
        previous = self.ttft_ewma_s
        self.ttft_ewma_s = (
            seconds
            if previous is None
            else TTFT_EWMA_WEIGHT * seconds + (1 - TTFT_EWMA_WEIGHT) * previous
        )

    async def fetch_metrics(self, url: str) -> str:
        """The engine's Prometheus text, on the backend's own pool (for the signal scraper)."""
        response = await self.pool.request("GET", self.root_path("/metrics"), self.auth_headers)
        body = await response.read()
        if response.status >= 400:
            raise RuntimeError(f"/metrics answered {response.status}")
        return body.decode("utf-8", "replace")

    def usable(self) -> bool:
        """Up by its last probe and its circuit lets a request through."""
        return self.healthy and self.circuit.allows()

    def mark_down(self, reason: str) -> None:
        self.healthy = False
        self.last_error = reason

    def mark_up(self) -> None:
        self.healthy = True
        self.last_error = None

    async def close(self) -> None:
        await self.pool.close()

    def __repr__(self) -> str:
        return f"Backend({self.name}, engine={self.engine}, in_flight={self.in_flight})"
