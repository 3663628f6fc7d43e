"""The gateway's services, wired together once; the HTTP layer only calls into them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiguillage.accounting.ledger import UsageLedger, UsageSink
from aiguillage.accounting.usage import UsageRecord
from aiguillage.auth.authenticator import Authenticator, KeyLookup
from aiguillage.backends.backend import Backend
from aiguillage.backends.health import HealthProber
from aiguillage.backends.periodic import Periodic
from aiguillage.backends.relay import Relay
from aiguillage.backends.signals import SignalScraper
from aiguillage.catalog.catalog import Catalog, ModelEntry
from aiguillage.catalog.config import GatewayConfig
from aiguillage.dispatch.queue import ModelQueue
from aiguillage.dispatch.redis_scheduler import RedisScheduler
from aiguillage.dispatch.scheduler import LocalScheduler
from aiguillage.observability.metrics import GatewayMetrics

if TYPE_CHECKING:
    from aiguillage.store.database import Database

MAINTENANCE_INTERVAL_S = 5.0

log = logging.getLogger(__name__)


class Gateway:
    """Everything a request needs: keys, catalog, dispatcher, relay, ledger, metrics."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        key_lookup: KeyLookup,
        usage_sink: UsageSink,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.catalog = Catalog.from_config(config)
        self.authenticator = Authenticator(key_lookup, config.key_cache_ttl_s)
        self.scheduler: LocalScheduler = (
            LocalScheduler(self.catalog, site=config.site, on_queue_change=self._queue_changed)
            if config.scheduler_url is None
            else RedisScheduler(
                self.catalog,
                config.scheduler_url,
                site=config.site,
                on_queue_change=self._queue_changed,
                on_availability=lambda up: self.metrics.scheduler_unavailable.set(0 if up else 1),
            )
        )
        self.relay = Relay(self.scheduler, self.metrics)
        self.ledger = UsageLedger(
            usage_sink,
            batch_size=config.ledger_batch_size,
            flush_interval_s=config.ledger_flush_interval_s,
            on_drop=self.metrics.ledger_dropped.inc,
        )
        self.prober = HealthProber(
            self.catalog.backends(),
            self.metrics,
            config.health_interval_s,
            timeout_s=config.connect_timeout_s,
            on_probe=self._probed,
        )
        by_url = {backend.metrics_url: backend for backend in self.catalog.backends()}
        self.scraper = SignalScraper(
            self.catalog.backends(),
            lambda url: by_url[url].fetch_metrics(url),
            config.signals_interval_s,
        )
        self._maintenance = Periodic("gateway-maintenance", self._maintain, MAINTENANCE_INTERVAL_S)
        self.closers: list[Callable[[], Awaitable[None]]] = []  # run after the ledger's last write
        self.database: Database | None = None  # set by open_gateway; the jobs API needs it

    def record(self, row: UsageRecord) -> None:
        """Account one finished request: metrics now, the ledger row in the next batch."""
        self.metrics.observe_request(
            row.model,
            row.endpoint,
            row.status,
            row.duration_ms / 1000,
            None if row.ttft_ms is None else row.ttft_ms / 1000,
            row.prompt_tokens,
            row.completion_tokens,
        )
        self.ledger.record(row)

    def ready(self) -> dict[str, bool]:
        """Per model, whether at least one backend answered its last probe."""
        return {entry.name: any(b.healthy for b in entry.backends) for entry in self.catalog}

    def critical_degraded(self) -> dict[str, bool]:
        """Critical models with fewer usable backends than their configured minimum."""
        return {
            entry.name: sum(b.usable() for b in entry.backends) < entry.config.min_healthy_backends
            for entry in self.catalog
            if entry.config.critical
        }

    def _probed(self, backend: Backend, up: bool) -> None:
        backend.circuit.on_probe(up)
        self.metrics.circuit_open.labels(backend.name).set(0 if backend.circuit.allows() else 1)
        self.scheduler.backend_changed(backend)

    def _queue_changed(self, model: ModelEntry, queue: ModelQueue) -> None:
        self.metrics.set_queue_depth(model.name, queue.snapshot())

    async def _maintain(self) -> None:
        """The slow loop: the lease safety net and the critical-model alert."""
        self.scheduler.reclaim_stale_leases(self.config.lease_ttl_s)
        for backend in self.catalog.backends():  # fresh signals may let queues move
            self.scheduler.backend_changed(backend)
        for name, degraded in self.critical_degraded().items():
            self.metrics.critical_degraded.labels(name).set(1 if degraded else 0)
            if degraded:
                log.error("critical model %s is below its minimum of usable backends", name)

    async def start(self) -> None:
        self.ledger.start()
        await self.scheduler.start()
        await self.prober.probe_all()
        self.prober.start()
        self.scraper.start()
        self._maintenance.start()

    async def stop(self) -> None:
        await self._maintenance.stop()
        await self.scheduler.close()
        await self.prober.stop()
        await self.scraper.stop()
        await self.ledger.close()
        for backend in self.catalog.backends():
            await backend.close()
        for close in self.closers:
            await close()


async def open_gateway(config: GatewayConfig) -> Gateway:
    """A gateway on the configured database, migrated to the latest schema."""
    from aiguillage.store.database import Database
    from aiguillage.store.keys import KeyRepository
    from aiguillage.store.usage import UsageRepository

    database = Database(config.resolved_database_url())
    await database.upgrade()
    keys = KeyRepository(database)
    usage = UsageRepository(database)
    gateway = Gateway(config, key_lookup=keys.get_by_hash, usage_sink=usage.insert_many)
    gateway.database = database
    gateway.closers.append(database.dispose)
    return gateway
