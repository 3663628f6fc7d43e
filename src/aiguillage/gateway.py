"""The gateway's services, wired together once; the HTTP layer only calls into them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiguillage.accounting.ledger import UsageLedger, UsageSink
from aiguillage.accounting.usage import UsageRecord
from aiguillage.auth.authenticator import Authenticator, KeyLookup
from aiguillage.backends.health import HealthProber
from aiguillage.backends.relay import Relay
from aiguillage.catalog.catalog import Catalog
from aiguillage.catalog.config import GatewayConfig
from aiguillage.dispatch.dispatcher import Dispatcher, RoundRobinDispatcher
from aiguillage.observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)


class Gateway:
    """Everything a request needs: keys, catalog, dispatcher, relay, ledger, metrics."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        key_lookup: KeyLookup,
        usage_sink: UsageSink,
        dispatcher: Dispatcher | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.catalog = Catalog.from_config(config)
        self.authenticator = Authenticator(key_lookup, config.key_cache_ttl_s)
        self.relay = Relay(dispatcher or RoundRobinDispatcher(), self.metrics)
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
        )
        self.closers: list[Callable[[], Awaitable[None]]] = []  # run after the ledger's last write

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

    async def start(self) -> None:
        self.ledger.start()
        await self.prober.probe_all()
        self.prober.start()

    async def stop(self) -> None:
        await self.prober.stop()
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
    gateway.closers.append(database.dispose)
    return gateway
