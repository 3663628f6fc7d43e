"""Active health probes: each backend is asked, on an interval, whether it is alive.

A backend is up when it answers its health route with a status below 500. The
probe also brings back a backend that the relay marked down after a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from aiguillage.backends.backend import Backend
from aiguillage.backends.http_client import UpstreamError
from aiguillage.backends.periodic import Periodic
from aiguillage.observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# The cheapest route that proves each engine can serve.
_HEALTH_PATHS = {
    "vllm": "/health",
    "sglang": "/health",
    "tgi": "/health",
    "llamacpp": "/health",
    "lmdeploy": "/health",
    "ollama": "/api/version",
    "openai": "/v1/models",
}


def health_path(backend: Backend) -> str:
    """Engines answer health at their root; a plain OpenAI API only under /v1."""
    path = _HEALTH_PATHS[backend.engine]
    return backend.path(path) if path.startswith("/v1/") else backend.root_path(path)


class HealthProber:
    def __init__(
        self,
        backends: Sequence[Backend],
        metrics: GatewayMetrics,
        interval_s: float,
        timeout_s: float = 3.0,
        on_probe: Callable[[Backend, bool], None] | None = None,
    ) -> None:
        self._on_probe = on_probe
        self._backends = backends
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._periodic = Periodic("health-prober", self.probe_all, interval_s)

    async def probe(self, backend: Backend) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await backend.pool.request(
                    "GET", health_path(backend), backend.auth_headers
                )
                await response.read()
            up = response.status < 500
            reason = f"health probe answered {response.status}"
        except (UpstreamError, TimeoutError) as error:
            up, reason = False, f"health probe failed: {type(error).__name__}"
        if up:
            if not backend.healthy:
                log.info("backend %s is up again", backend.name)
            backend.mark_up()
        else:
            if backend.healthy:
                log.warning("backend %s is down: %s", backend.name, reason)
            backend.mark_down(reason)
        self._metrics.backend_up.labels(backend.name).set(1 if up else 0)
        if self._on_probe is not None:
            self._on_probe(backend, up)
        return up

    def track(self, backends: Sequence[Backend]) -> None:
        """Probe these backends from now on (the catalog changed at run time)."""
        self._backends = backends

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(backend) for backend in self._backends))

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
