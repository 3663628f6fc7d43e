"""A backend: one engine URL with its pooled keep-alive connection and live state."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from aiguillage.backends.circuit import CircuitBreaker
from aiguillage.catalog.config import EngineKind, ServerConfig

if TYPE_CHECKING:
    from aiguillage.backends.signals import EngineLoad

TTFT_EWMA_WEIGHT = 0.2  # weight of the newest TTFT in the running average


class Backend:
    """One OpenAI-compatible engine, shared by every model it serves.

    It owns a single aiohttp session (a pool of keep-alive connections), so the
    cost of TCP set-up is paid once per connection, not once per request.
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
        self.ttft_ewma_s: float | None = None  # our own recent TTFT measurements
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        token = config.token.get_secret_value() if config.token else None
        self.auth_headers: dict[str, str] = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0,  # our own lease accounting bounds concurrency, not the pool
                keepalive_timeout=60,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def url(self, path: str) -> str:
        """The engine URL for an OpenAI path such as `/v1/chat/completions`."""
        if self.base_url.endswith("/v1") and path.startswith("/v1/"):
            return self.base_url + path[3:]
        return self.base_url + path

    @property
    def metrics_url(self) -> str:
        """Where the engine publishes its Prometheus metrics (at its root, not under /v1)."""
        return self.base_url.removesuffix("/v1") + "/metrics"

    def observe_ttft(self, seconds: float) -> None:
        previous = self.ttft_ewma_s
        self.ttft_ewma_s = (
            seconds
            if previous is None
            else TTFT_EWMA_WEIGHT * seconds + (1 - TTFT_EWMA_WEIGHT) * previous
        )

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
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"Backend({self.name}, engine={self.engine}, in_flight={self.in_flight})"
