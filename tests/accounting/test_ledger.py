"""The usage ledger: batched background writes, retries, and a bounded buffer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from aiguillage.accounting.ledger import UsageLedger
from aiguillage.accounting.usage import UsageRecord, UsageSource


def row(n: int) -> UsageRecord:
    return UsageRecord(
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        request_id=f"req-{n}",
        key_id=1,
        organisation="acme",
        model="m",
        backend="gpu1:8000",
        endpoint="/v1/chat/completions",
        status=200,
        stream=False,
        cancelled=False,
        prompt_tokens=1,
        completion_tokens=1,
        usage_source=UsageSource.ENGINE,
        ttft_ms=None,
        duration_ms=1.0,
    )


class Sink:
    """Records each batch it is given; fails on the call numbers listed in `fail_on`."""

    def __init__(self, fail_on: Sequence[int] = ()) -> None:
        self.batches: list[list[str]] = []
        self.calls = 0
        self.fail_on = set(fail_on)
        self.gate: asyncio.Event | None = None

    async def __call__(self, rows: Sequence[UsageRecord]) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.calls in self.fail_on:
            raise ConnectionError("database away")
        self.batches.append([r.request_id for r in rows])

    @property
    def written(self) -> list[str]:
        return [request_id for batch in self.batches for request_id in batch]


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait up to two seconds for the background writer to make `condition` true."""
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met within 2 s")


def ids(*numbers: int) -> list[str]:
    return [f"req-{n}" for n in numbers]


async def test_full_batch_is_written_without_waiting_for_the_timer() -> None:
    sink = Sink()
    ledger = UsageLedger(sink, batch_size=3, flush_interval_s=60)
    ledger.start()
    for n in range(7):
        ledger.record(row(n))
    await eventually(lambda: ledger.written == 7)
    assert sink.batches == [ids(0, 1, 2), ids(3, 4, 5), ids(6)]
    await ledger.close()


async def test_rows_below_batch_size_wait_for_the_timer() -> None:
    sink = Sink()
    ledger = UsageLedger(sink, batch_size=100, flush_interval_s=0.05)
    ledger.start()
    ledger.record(row(0))
    ledger.record(row(1))
    assert sink.batches == []
    await eventually(lambda: sink.batches != [])
    assert sink.batches == [ids(0, 1)]
    assert ledger.pending == 0
    await ledger.close()


async def test_close_writes_what_is_left() -> None:
    sink = Sink()
    ledger = UsageLedger(sink, batch_size=2, flush_interval_s=60)
    ledger.start()
    ledger.record(row(0))
    await ledger.close()
    assert sink.written == ids(0)
    assert ledger.pending == 0


async def test_close_without_start_writes_in_batches() -> None:
    sink = Sink()
    ledger = UsageLedger(sink, batch_size=2, flush_interval_s=60)
    for n in range(5):
        ledger.record(row(n))
    await ledger.close()
    assert sink.batches == [ids(0, 1), ids(2, 3), ids(4)]
    assert ledger.written == 5


async def test_flush_reports_failure_and_keeps_rows() -> None:
    sink = Sink(fail_on=[1])
    ledger = UsageLedger(sink, batch_size=10)
    ledger.record(row(0))
    assert await ledger.flush() is False
    assert ledger.pending == 1
    assert await ledger.flush() is True
    assert sink.written == ids(0)


async def test_failing_sink_loses_and_duplicates_nothing() -> None:
    sink = Sink(fail_on=[2, 3, 4])
    ledger = UsageLedger(sink, batch_size=2, flush_interval_s=0.01)
    ledger.start()
    for n in range(5):
        ledger.record(row(n))
    await eventually(lambda: ledger.written == 5)
    assert sink.calls == 6
    assert sink.written == ids(0, 1, 2, 3, 4)
    await ledger.close()
    assert sink.written == ids(0, 1, 2, 3, 4)


async def test_close_retries_a_failing_sink() -> None:
    sink = Sink(fail_on=[1])
    ledger = UsageLedger(sink, batch_size=10, flush_interval_s=60)
    ledger.record(row(0))
    await ledger.close()
    assert sink.written == ids(0)


async def test_buffer_overflow_drops_oldest_and_reports_count() -> None:
    drops: list[int] = []
    sink = Sink()
    ledger = UsageLedger(sink, batch_size=100, max_buffered=3, on_drop=drops.append)
    for n in range(5):
        ledger.record(row(n))
    assert drops == [1, 1]
    assert ledger.pending == 3
    await ledger.flush()
    assert sink.written == ids(2, 3, 4)


async def test_overflow_during_a_write_loses_only_the_oldest_rows() -> None:
    drops: list[int] = []
    sink = Sink()
    sink.gate = asyncio.Event()
    ledger = UsageLedger(sink, batch_size=2, max_buffered=3, on_drop=drops.append)
    for n in range(3):
        ledger.record(row(n))
    writing = asyncio.create_task(ledger.flush())
    await asyncio.sleep(0)  # rows 0 and 1 are now being written
    ledger.record(row(3))  # over max_buffered: the oldest row is dropped
    sink.gate.set()
    await writing
    missing = [r for r in ids(0, 1, 2, 3) if r not in sink.written]
    assert len(missing) <= sum(drops)
    assert set(missing) <= set(ids(*range(sum(drops))))  # only the oldest may be missing
