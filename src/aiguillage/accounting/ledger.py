"""The usage ledger's writer: rows go to the database in batches, off the hot path.

A request only appends its row to a list; a background task writes batches
every `flush_interval_s` or as soon as `batch_size` rows wait. If the database
is unreachable the rows stay in memory and are written later (up to
`max_buffered` rows, then the oldest are dropped and counted), and `close()`
writes everything left, so a clean shutdown loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiguillage.accounting.usage import UsageRecord

UsageSink = Callable[[Sequence[UsageRecord]], Awaitable[None]]

log = logging.getLogger(__name__)


class UsageLedger:
    def __init__(
        self,
        sink: UsageSink,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        max_buffered: int = 1_000_000,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self._sink = sink
        self._batch_size = batch_size
        self._interval = flush_interval_s
        self._max_buffered = max_buffered
        self._on_drop = on_drop
        self._rows: list[UsageRecord] = []
        self._writing = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0

    def record(self, row: UsageRecord) -> None:
        """Queue one row; never blocks, never raises."""
        self._rows.append(row)
        if len(self._rows) >= self._batch_size:
            self._wake.set()
        if len(self._rows) > self._max_buffered:
            dropped = len(self._rows) - self._max_buffered
            del self._rows[:dropped]
            log.error("usage ledger buffer full: dropped %d oldest rows", dropped)
            if self._on_drop:
                self._on_drop(dropped)

    @property
    def pending(self) -> int:
        """Rows not yet written, including a batch being written now."""
        return len(self._rows) + self._writing

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def flush(self) -> bool:
        """Write what is waiting, batch by batch; False if the database refused."""
        while self._rows:
            batch = self._rows[: self._batch_size]
            del self._rows[: len(batch)]  # out of reach of record()'s trimming while written
            self._writing = len(batch)
            try:
                await self._sink(batch)
            except Exception as error:  # the database is away: keep the rows, try later
                log.warning("usage ledger: cannot write %d rows yet: %s", len(batch), error)
                self._rows[:0] = batch
                return False
            finally:
                self._writing = 0
            self.written += len(batch)
        return True

    async def close(self, attempts: int = 3) -> None:
        """Stop the background writer and write every remaining row."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task
            self._task = None
        for attempt in range(attempts):
            if await self.flush():
                return
            await asyncio.sleep(0.5 * (attempt + 1))
        if self._rows:
            log.error("usage ledger: %d rows could not be written at shutdown", len(self._rows))

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            self._wake.clear()
            if not self._closing:
                await self.flush()
