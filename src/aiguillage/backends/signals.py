"""Engine load signals: each engine's Prometheus `/metrics`, reduced to one normalised load.

The dispatcher ranks backends by load: our own in-flight count plus what the
engine itself reports (requests it queues, KV cache it has filled, how fast it
answers first tokens lately). Every engine kind names those numbers its own way,
so one small table per kind says which metric means what, and everything else
(parsing, summing, the TTFT quantile) is shared.

What each kind exposes (checked against the engines' sources and docs):

- vLLM: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
  `vllm:kv_cache_usage_perc` (before 0.9 `vllm:gpu_cache_usage_perc`, read as a
  fallback), TTFT histogram `vllm:time_to_first_token_seconds`.
- SGLang (`--enable-metrics`): `sglang:num_running_reqs`, `sglang:num_queue_reqs`,
  `sglang:token_usage`, TTFT histogram `sglang:time_to_first_token_seconds`.
- TGI: `tgi_batch_current_size` (running), `tgi_queue_size` (waiting). No KV
  gauge and no time-to-first-token histogram (it has queue, validation and
  per-batch prefill durations, none of which is a request's first token).
- llama.cpp (`--metrics`): `llamacpp:requests_processing`,
  `llamacpp:requests_deferred`; `llamacpp:kv_cache_usage_ratio` only in older
  builds (current ones dropped it, see the recorded fixture); no TTFT histogram.
- LMDeploy: `lmdeploy:num_requests_running`; waiting is
  `lmdeploy:num_requests_waiting` (engine queue) plus
  `lmdeploy:num_api_requests_waiting` (requests the API server holds until a
  request handle frees up, since v0.12.1); `lmdeploy:gpu_cache_usage_perc`; TTFT
  histogram `lmdeploy:time_to_first_token_seconds`.
- Ollama and a plain `openai` upstream have no metrics: nothing is scraped and
  the dispatcher uses our own in-flight counts only.

Several series of one metric (vLLM data-parallel engines, SGLang DP ranks) are
summed for counts and averaged for the KV fraction. SGLang's
`--enable-metrics-for-all-schedulers` makes every TP rank report the same batch;
with it, running and waiting would be counted once per rank.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from aiguillage.backends.periodic import Periodic

log = logging.getLogger(__name__)

TTFT_QUANTILE = 0.95

# One histogram series: its labels other than `le`, sorted, so two scrapes line up.
SeriesKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """An engine's own view of its load, normalised across engine kinds.

    A field is None when the engine does not expose it (or did not this time);
    the dispatcher then leans on our in-flight count alone for that part.
    """

    running: float | None  # sequences being processed by the engine
    waiting: float | None  # requests queued inside the engine
    kv_cache_usage: float | None  # 0..1
    ttft_p95_s: float | None  # p95 TTFT over the observations made between two scrapes
    scraped_at: float  # monotonic time


@dataclass(frozen=True, slots=True)
class EngineSample:
    """One scrape: the gauges now, and the TTFT histogram as the engine's running total.

    The histogram is kept cumulative (per series, `le` -> count) because only the
    difference between two scrapes says anything about recent first tokens.
    """

    running: float | None
    waiting: float | None
    kv_cache_usage: float | None
    ttft_buckets: Mapping[SeriesKey, Mapping[float, float]]
    scraped_at: float


@dataclass(frozen=True, slots=True)
class _EngineMetrics:
    running: tuple[str, ...]  # summed over names and series
    waiting: tuple[str, ...]  # summed over names and series
    kv_usage: tuple[str, ...]  # the first name present wins, averaged over series
    ttft: str | None  # histogram base name


_ENGINE_METRICS: dict[str, _EngineMetrics] = {
    "vllm": _EngineMetrics(
        running=("vllm:num_requests_running",),
        waiting=("vllm:num_requests_waiting",),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        ttft="vllm:time_to_first_token_seconds",
    ),
    "sglang": _EngineMetrics(
        running=("sglang:num_running_reqs",),
        waiting=("sglang:num_queue_reqs",),
        kv_usage=("sglang:token_usage",),
        ttft="sglang:time_to_first_token_seconds",
    ),
    "tgi": _EngineMetrics(
        running=("tgi_batch_current_size",),
        waiting=("tgi_queue_size",),
        kv_usage=(),
        ttft=None,
    ),
    "llamacpp": _EngineMetrics(
        running=("llamacpp:requests_processing",),
        waiting=("llamacpp:requests_deferred",),
        kv_usage=("llamacpp:kv_cache_usage_ratio",),
        ttft=None,
    ),
    "lmdeploy": _EngineMetrics(
        running=("lmdeploy:num_requests_running",),
        waiting=("lmdeploy:num_requests_waiting", "lmdeploy:num_api_requests_waiting"),
        kv_usage=("lmdeploy:gpu_cache_usage_perc",),
        ttft="lmdeploy:time_to_first_token_seconds",
    ),
}


def has_metrics(engine: str) -> bool:
    """Whether this engine kind exposes load metrics worth scraping."""
    return engine in _ENGINE_METRICS


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample, keeping what parsed before any bad line.

    An engine answering an HTML error page, or a truncated body, must not make the
    scraper raise: what cannot be parsed is simply absent.
    """
    found: list[tuple[str, dict[str, str], float]] = []
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found.append((sample.name, dict(sample.labels), float(sample.value)))
    except (ValueError, TypeError, IndexError, KeyError) as error:
        log.debug("metrics text unreadable past some point: %s", error)
    return found


def parse_metrics(engine: str, text: str, *, scraped_at: float | None = None) -> EngineSample:
    """Reduce one `/metrics` text to the engine's load gauges and TTFT histogram.

    Never raises: an unknown engine kind or unreadable text gives a sample whose
    fields are all None and which holds no histogram.
    """
    when = time.monotonic() if scraped_at is None else scraped_at
    names = _ENGINE_METRICS.get(engine)
    if names is None:
        return EngineSample(None, None, None, {}, when)
    values: dict[str, list[float]] = {}
    buckets: dict[SeriesKey, dict[float, float]] = {}
    ttft_bucket = f"{names.ttft}_bucket" if names.ttft else None
    for name, labels, value in _samples(text):
        if not math.isfinite(value):  # NaN gauges (nothing measured yet) count as absent
            continue
        if name == ttft_bucket:
            try:
                le = float(labels.pop("le"))
            except (KeyError, ValueError):
                continue
            if not math.isnan(le):
                buckets.setdefault(tuple(sorted(labels.items())), {})[le] = value
        else:
            values.setdefault(name, []).append(value)

    def total(metric_names: tuple[str, ...]) -> float | None:
        present = [sum(values[name]) for name in metric_names if name in values]
        return sum(present) if present else None

    kv_usage: float | None = None
    for name in names.kv_usage:
        if name in values:
            kv_usage = min(1.0, max(0.0, sum(values[name]) / len(values[name])))
            break
    return EngineSample(
        running=total(names.running),
        waiting=total(names.waiting),
        kv_cache_usage=kv_usage,
        ttft_buckets=buckets,
        scraped_at=when,
    )


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The q-quantile of a cumulative histogram (`le` -> count), as Prometheus computes it.

    Linear interpolation inside the bucket holding the rank, the lower bound of the
    first bucket taken as 0, and the highest finite bound returned when the rank
    falls in the +Inf bucket. None when there is no +Inf bucket or no observation.
    """
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][0] != math.inf:
        return None
    bounds = [le for le, _ in ordered]
    counts: list[float] = []
    for _, count in ordered:  # tolerate non-monotonic counts, as Prometheus does
        counts.append(max(count, counts[-1]) if counts else count)
    observed = counts[-1]
    if observed <= 0:
        return None
    rank = q * observed
    index = next(i for i, count in enumerate(counts) if count >= rank)
    if bounds[index] == math.inf:
        return bounds[index - 1] if index > 0 else None
    if index == 0 and bounds[0] <= 0:
        return bounds[0]
    lower = bounds[index - 1] if index > 0 else 0.0
    below = counts[index - 1] if index > 0 else 0.0
    return lower + (bounds[index] - lower) * (rank - below) / (counts[index] - below)


def _new_observations(previous: EngineSample, current: EngineSample) -> dict[float, float]:
    """Per-`le` counts observed between two scrapes, summed over series.

    A series whose total went down was reset (engine restart): all its current
    counts are new. A series absent before is new too.
    """
    delta: dict[float, float] = {}
    for series, now in current.ttft_buckets.items():
        before = previous.ttft_buckets.get(series, {})
        reset = now.get(math.inf, 0.0) < before.get(math.inf, 0.0)
        for le, count in now.items():
            new = count if reset else count - before.get(le, 0.0)
            delta[le] = delta.get(le, 0.0) + max(new, 0.0)
    return delta


def load_between(previous: EngineSample | None, current: EngineSample) -> EngineLoad:
    """The load at `current`, with TTFT p95 over what the engine observed since `previous`.

    Engines publish TTFT as a histogram counted since they started; a quantile of
    that would describe hours of history. Without a previous scrape, or with no new
    first token since, there is no recent TTFT: None.
    """
    ttft: float | None = None
    if previous is not None:
        ttft = histogram_quantile(TTFT_QUANTILE, _new_observations(previous, current))
    return EngineLoad(
        running=current.running,
        waiting=current.waiting,
        kv_cache_usage=current.kv_cache_usage,
        ttft_p95_s=ttft,
        scraped_at=current.scraped_at,
    )


def _recognised(sample: EngineSample) -> bool:
    return (
        sample.running is not None
        or sample.waiting is not None
        or sample.kv_cache_usage is not None
        or bool(sample.ttft_buckets)
    )


class ScrapeTarget(Protocol):
    """What the scraper needs of a backend: where to scrape, and where to put the result.

    `name`, `engine` and `metrics_url` are only read (so a `Backend` with an
    `EngineKind` engine and a `metrics_url` property fits); `load` and
    `load_stale` are written by the scraper and read by the dispatcher.
    """

    @property
    def name(self) -> str: ...
    @property
    def engine(self) -> str: ...
    @property
    def metrics_url(self) -> str: ...

    load: EngineLoad | None
    load_stale: bool


@dataclass(slots=True)
class _Tracked:
    target: ScrapeTarget
    previous: EngineSample | None = None  # the last good sample, for the TTFT delta
    stale: bool = False


class SignalScraper:
    """Scrapes every backend's /metrics on an interval, off the hot path.

    Each target's `load` is replaced after a good scrape. A failed scrape (the fetch
    raised or timed out, or the text held none of the engine's metrics) leaves
    `load` as it was and sets `target.load_stale = True`, so the dispatcher can stop
    trusting an old number; the next good scrape clears it. Targets whose engine
    has no metrics (ollama, openai) are never scraped and keep `load = None`: the
    dispatcher then has only our own in-flight count for them.

    `fetch` (url -> body, raising on HTTP errors) stays the caller's, so the
    scraper shares the backend's connection pool and auth; each fetch is cut off
    after `timeout_s` (default: one interval) so one hung engine cannot stall the
    others' signals.
    """

    def __init__(
        self,
        targets: Sequence[ScrapeTarget],
        fetch: Callable[[str], Awaitable[str]],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        timeout_s: float | None = None,
    ) -> None:
        self._tracked: list[_Tracked] = []
        self._started = False
        self.track(targets)
        self._fetch = fetch
        self._timeout = interval_s if timeout_s is None else timeout_s
        self._clock = clock
        self._periodic = Periodic("signal-scraper", self.scrape_once, interval_s)

    def track(self, targets: Sequence[ScrapeTarget]) -> None:
        """Scrape these targets from now on; those already tracked keep their last sample."""
        known = {id(tracked.target): tracked for tracked in self._tracked}
        self._tracked = [
            known.get(id(target)) or _Tracked(target)
            for target in targets
            if has_metrics(target.engine)
        ]
        if self._started and self._tracked:  # the first engine with metrics came at run time
            self._periodic.start()

    @property
    def targets(self) -> list[ScrapeTarget]:
        """The targets actually scraped (those whose engine exposes metrics)."""
        return [tracked.target for tracked in self._tracked]

    async def scrape_once(self) -> None:
        """Scrape all targets concurrently; never raises."""
        await asyncio.gather(
            *(self._scrape(tracked) for tracked in self._tracked), return_exceptions=True
        )

    async def _scrape(self, tracked: _Tracked) -> None:
        target = tracked.target
        try:
            async with asyncio.timeout(self._timeout):
                text = await self._fetch(target.metrics_url)
            sample = parse_metrics(target.engine, text, scraped_at=self._clock())
            if not _recognised(sample):
                raise ValueError(f"no {target.engine} metrics in the answer")
        except Exception as error:  # any failure only makes the load stale
            if not tracked.stale:
                reason = str(error) or type(error).__name__
                log.warning("load signal of %s is stale: %s", target.name, reason)
            tracked.stale = target.load_stale = True
            return
        target.load = load_between(tracked.previous, sample)
        tracked.previous = sample
        if tracked.stale:
            log.info("load signal of %s is fresh again", target.name)
        tracked.stale = target.load_stale = False

    def start(self) -> None:
        self._started = True
        if self._tracked:
            self._periodic.start()

    async def stop(self) -> None:
        self._started = False
        await self._periodic.stop()
