"""The gateway's services, wired together once; the HTTP layer only calls into them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from aiguillage.accounting.ledger import UsageLedger, UsageSink
from aiguillage.accounting.usage import UsageRecord
from aiguillage.auth.authenticator import Authenticator, KeyLookup
from aiguillage.backends.backend import Backend
from aiguillage.backends.health import HealthProber
from aiguillage.backends.periodic import Periodic
from aiguillage.backends.relay import Relay
from aiguillage.backends.signals import SignalScraper
from aiguillage.catalog.catalog import Catalog, ModelEntry
from aiguillage.catalog.config import GatewayConfig, ServerConfig
from aiguillage.dispatch.queue import ModelQueue
from aiguillage.dispatch.redis_scheduler import RedisScheduler
from aiguillage.dispatch.scheduler import LocalScheduler
from aiguillage.observability.metrics import GatewayMetrics
from aiguillage.store.changes import Change

if TYPE_CHECKING:
    from aiguillage.store.database import Database

MAINTENANCE_INTERVAL_S = 5.0

log = logging.getLogger(__name__)

KeyRevoker = Callable[[int], Awaitable[bool]]


class ServerStore(Protocol):
    """Where run-time server additions and removals are kept (store.servers)."""

    async def put(self, model: str, url: str, server: ServerConfig | None) -> None: ...

    async def all(self) -> Mapping[str, Mapping[str, ServerConfig | None]]: ...


class UnknownTarget(LookupError):
    """No such model, or no such server of that model."""


class Gateway:
    """Everything a request needs: keys, catalog, dispatcher, relay, ledger, metrics."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        key_lookup: KeyLookup,
        usage_sink: UsageSink,
        metrics: GatewayMetrics | None = None,
        revoke_key: KeyRevoker | None = None,
        servers: ServerStore | None = None,
    ) -> None:
        self.config = config
        self._revoke_key = revoke_key
        self._servers = servers
        self._catalog_lock = asyncio.Lock()
        self._syncs: set[asyncio.Task[None]] = set()
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
                lease_ttl_s=config.scheduler_lease_ttl_s,
                renew_interval_s=config.scheduler_lease_ttl_s / 4,
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
        self._by_metrics_url = {b.metrics_url: b for b in self.catalog.backends()}
        self.scraper = SignalScraper(
            self.catalog.backends(),
            lambda url: self._by_metrics_url[url].fetch_metrics(url),
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

    # --- run-time changes (admin API, other replicas) ---------------------------------------

    async def revoke_key(self, key_id: int) -> bool:
        """Revoke a key in the database; other replicas hear of it through the store's notice."""
        if self._revoke_key is None:
            raise RuntimeError("this gateway has no key store")
        found = await self._revoke_key(key_id)
        self.authenticator.forget()  # this process, at once, whatever the notice does
        return found

    async def add_server(self, model: str, server: ServerConfig) -> None:
        """Give `model` one more server, on every replica and across restarts."""
        await self._put_server(model, server.base_url, server)

    async def remove_server(self, model: str, name_or_url: str) -> None:
        """Stop routing `model` to the server with this backend name or URL."""
        entry = self.catalog.resolve(model)
        wanted = name_or_url.rstrip("/")
        backend = (
            next((b for b in entry.backends if wanted in (b.name, b.base_url)), None)
            if entry is not None
            else None
        )
        if backend is None:
            raise UnknownTarget(f"model {model!r} has no server {name_or_url!r}")
        await self._put_server(model, backend.base_url, None)

    async def _put_server(self, model: str, url: str, server: ServerConfig | None) -> None:
        entry = self.catalog.resolve(model)
        if entry is None:
            raise UnknownTarget(f"no model {model!r}")
        if self._servers is None:
            raise RuntimeError("this gateway has no catalog store")
        await self._servers.put(entry.name, url, server)
        await self.sync_catalog()

    async def sync_catalog(self) -> None:
        """Apply the stored server overrides; re-index what depends on the backends.

        A backend no model uses any more has its connection pool closed: idle
        connections now, those of requests still running when they end.
        """
        if self._servers is None:
            return
        async with self._catalog_lock:
            overrides = await self._servers.all()
            if not self.catalog.apply_overrides(overrides):
                return
            dropped = self.catalog.drop_unused()
            backends = self.catalog.backends()
            new = [b for b in backends if self._by_metrics_url.get(b.metrics_url) is not b]
            self._by_metrics_url = {b.metrics_url: b for b in backends}
            self.prober.track(backends)
            self.scraper.track(backends)
            self.scheduler.catalog_changed()  # re-index: prefix rings, backend -> models
            await asyncio.gather(
                *(self.prober.probe(backend) for backend in new),
                *(backend.close() for backend in dropped),
            )
            log.info("catalog changed: %d backends, %d removed", len(backends), len(dropped))

    def changed(self, change: Change) -> None:
        """A notice from a replica (this one included): apply it here."""
        if change.kind == "key_revoked":
            self.authenticator.forget(change.key_hash)
        elif change.kind == "catalog":
            task = asyncio.create_task(self.sync_catalog(), name="catalog-sync")
            self._syncs.add(task)
            task.add_done_callback(self._sync_done)

    async def resync(self) -> None:
        """After notices may have been missed: forget every cached key, reload the catalog."""
        self.authenticator.forget()
        await self.sync_catalog()

    def _sync_done(self, task: asyncio.Task[None]) -> None:
        self._syncs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("catalog reload failed", exc_info=task.exception())

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
        for task in self._syncs:
            task.cancel()
        await asyncio.gather(*self._syncs, return_exceptions=True)
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
    from aiguillage.store.changes import ChangeListener
    from aiguillage.store.database import Database
    from aiguillage.store.keys import KeyRepository
    from aiguillage.store.sealing import Sealer
    from aiguillage.store.servers import ServerOverrides
    from aiguillage.store.usage import UsageRepository

    secrets_key = config.resolved_secrets_key()
    database = Database(config.resolved_database_url())
    await database.upgrade()
    keys = KeyRepository(database)
    usage = UsageRepository(database)
    gateway = Gateway(
        config,
        key_lookup=keys.get_by_hash,
        usage_sink=usage.insert_many,
        revoke_key=keys.revoke,
        servers=ServerOverrides(database, Sealer(secrets_key) if secrets_key else None),
    )
    gateway.database = database
    await gateway.sync_catalog()
    if not database.is_sqlite:  # replicas share PostgreSQL: hear each other's changes
        listener = ChangeListener(database.url, gateway.changed, gateway.resync)
        listener.start()
        gateway.closers.append(listener.stop)
    gateway.closers.append(database.dispose)
    return gateway
