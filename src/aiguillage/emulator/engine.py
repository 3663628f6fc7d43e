"""The scheduling model of an emulated vLLM engine.

Why a model and not sleeps in handlers: the dispatcher is judged by how backends
behave *under load*: requests that queue once the batch is full, TTFT and ITL that
grow with the batch, prefills that are cheap when the prefix is cached. Those
effects come from one shared scheduler per engine, so that is what is emulated.

`EmulatedEngine` is a discrete-event simulation that never reads a clock: every
call takes `now`, so tests can drive it with made-up times and get exact answers.
`AsyncEngine` binds it to the asyncio loop with a single timer per engine (the time
of its next event), which is why hundreds of emulated sequences cost next to no CPU.

Token times are *nominal*: the next token of a sequence is due one ITL after the
previous one was due, not after the loop got round to it, so a busy event loop
delays delivery but does not slow the emulated engine down.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SeqState = Literal["waiting", "prefill", "decode", "finished", "aborted"]
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class EngineProfile:
    """How fast one emulated engine is, and how it degrades with load.

    Times are in seconds at `slowdown=1`; `slowdown` multiplies every one of them,
    to emulate an older or busier GPU next to the others.
    """

    max_num_seqs: int = 4
    """Continuous-batching capacity: sequences running at once; the rest wait (FIFO)."""
    base_ttft_s: float = 0.1
    """Fixed cost of a prefill (scheduling, first forward pass), whatever the prompt."""
    prefill_s_per_1k_tokens: float = 0.1
    """Prompt-length-dependent prefill cost, for prompt tokens not in the prefix cache."""
    ttft_growth: float = 0.25
    """Prefill contends with decoding: prefill time * (1 + ttft_growth * others running)."""
    base_itl_s: float = 0.02
    """Inter-token latency with one sequence running."""
    itl_growth: float = 0.1
    """Bigger batches decode slower: ITL = base_itl * (1 + itl_growth * (running - 1))."""
    prefix_cache: bool = True
    """Automatic prefix caching, as vLLM's: hashed full blocks of the prompt in an LRU."""
    prefix_block_chars: int = 64
    """Block size of the prefix cache, in characters (16 tokens at 4 characters a token)."""
    prefix_cache_blocks: int = 4096
    """Blocks the LRU keeps; the least recently used are evicted beyond that."""
    cached_prefill_cost: float = 0.1
    """Cost of a cached prompt token relative to an uncached one."""
    default_max_tokens: int = 64
    """The "natural" answer length: the model stops there (`stop`) unless capped first."""
    chars_per_token: int = 4
    """Prompt tokens are counted as ceil(characters / chars_per_token)."""
    slowdown: float = 1.0
    """Multiplies every time: 2.0 emulates a backend twice as slow."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.slowdown <= 0:
            raise ValueError("slowdown must be positive")
        if self.default_max_tokens < 1 or self.chars_per_token < 1:
            raise ValueError("default_max_tokens and chars_per_token must be at least 1")
        if self.prefix_block_chars < 1 or self.prefix_cache_blocks < 0:
            raise ValueError("prefix cache sizes must be positive")

    def prefill_s(self, prompt_tokens: int, cached_tokens: int, others_running: int) -> float:
        """Time from admission to the first token."""
        work = (prompt_tokens - cached_tokens) + cached_tokens * self.cached_prefill_cost
        alone = self.base_ttft_s + self.prefill_s_per_1k_tokens * work / 1000
        return alone * (1 + self.ttft_growth * others_running) * self.slowdown

    def itl_s(self, running: int) -> float:
        """Time to the next token of a sequence while `running` sequences share the batch."""
        return self.base_itl_s * (1 + self.itl_growth * max(running - 1, 0)) * self.slowdown


def token_text(index: int) -> str:
    """The deterministic output: "tok0 tok1 tok2 …", one token at a time."""
    return f"tok{index}" if index == 0 else f" tok{index}"


def output_text(tokens: int) -> str:
    return "".join(token_text(i) for i in range(tokens))


def _nothing() -> None:
    return None


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Times are the engine's (nominal) times."""

    id: int
    prompt_tokens: int
    max_tokens: int
    """Tokens it will produce if not aborted."""
    end_reason: FinishReason
    """Why it stops when it reaches `max_tokens`: `length` if capped by the request."""
    arrived_at: float
    blocks: tuple[int, ...] = ()
    state: SeqState = "waiting"
    cached_tokens: int = 0
    generated: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    next_at: float = math.inf
    listener: Callable[[], None] = _nothing
    """Called after each change (token, end): how `AsyncEngine` wakes the HTTP handler."""

    @property
    def done(self) -> bool:
        return self.state in ("finished", "aborted")

    @property
    def finish_reason(self) -> FinishReason | None:
        if self.state == "aborted":
            return "abort"
        return self.end_reason if self.state == "finished" else None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived_at

    @property
    def e2e(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.arrived_at

    def text(self) -> str:
        return output_text(self.generated)


def block_hashes(text: str, block_chars: int) -> tuple[int, ...]:
    """Chained hashes of the prompt's full blocks, as vLLM's automatic prefix caching:

    a block's hash covers everything before it, so only a shared *prefix* matches.
    """
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        parent = hash((parent, text[start : start + block_chars]))
        hashes.append(parent)
    return tuple(hashes)


class PrefixCache:
    """An LRU of block hashes; a hit is the run of leading blocks already present."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, blocks: tuple[int, ...]) -> int:
        """How many leading blocks are cached; those are touched (recently used)."""
        hits = 0
        for block in blocks:
            if block not in self._blocks:
                break
            self._blocks.move_to_end(block)
            hits += 1
        return hits

    def insert(self, blocks: tuple[int, ...]) -> None:
        for block in blocks:
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards and parsers see the same shape.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class EngineMetrics:
    """vLLM's Prometheus metrics for one engine, in its own registry.

    Names and labels (`model_name`, `engine`) are vLLM V1's, so whatever scrapes a
    real vLLM (the gateway, Prometheus, a dashboard) reads the emulator unchanged.
    The `vllm:gpu_prefix_cache_*` counters are the older names of `vllm:prefix_cache_*`.
    """

    def __init__(self, engine: EmulatedEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        names = list(labels)
        r = self.registry

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, names, registry=r).labels(**labels).set_function(read)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=r).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, registry=r, buckets=buckets).labels(**labels)

        gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            lambda: len(engine.running),
        )
        gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            lambda: len(engine.waiting),
        )
        gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage (emulated: running / max_num_seqs).",
            lambda: len(engine.running) / engine.profile.max_num_seqs,
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self.prefix_queries = [
            counter(name, "Prefix cache queries, in terms of number of queried tokens.")
            for name in ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")
        ]
        self.prefix_hits = [
            counter(name, "Prefix cache hits, in terms of number of cached tokens.")
            for name in ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")
        ]
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=r,
        )
        self.success = {
            reason: success.labels(**labels, finished_reason=reason)
            for reason in ("stop", "length", "abort")
        }
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )


class EmulatedEngine:
    """vLLM's scheduler in miniature: a FIFO waiting queue and up to `max_num_seqs` running.

    A request waits until a slot frees, is prefilled (its TTFT depends on prompt
    length, the prefix cache and how many others run), then yields tokens one by one,
    each after the ITL of the batch size at that moment. Ending or aborting frees
    the slot for the head of the queue at once.
    """

    def __init__(self, profile: EngineProfile | None = None, model_name: str = "emulated") -> None:
        self.profile = profile or EngineProfile()
        self.model_name = model_name
        self.waiting: deque[Sequence] = deque()
        self.running: set[Sequence] = set()
        self.peak_running = 0
        self.prefix_cache = PrefixCache(self.profile.prefix_cache_blocks)
        self.metrics = EngineMetrics(self, model_name)
        self._events: list[tuple[float, int, Sequence]] = []
        self._ids = itertools.count()

    def prompt_tokens(self, prompt: str) -> int:
        return max(1, math.ceil(len(prompt) / self.profile.chars_per_token))

    def submit(
        self,
        prompt: str,
        now: float,
        max_tokens: int | None = None,
        ignore_eos: bool = False,
    ) -> Sequence:
        """Queue a request arriving at `now`; it starts at once if a slot is free.

        It produces `default_max_tokens` (ending with `stop`, as if the model chose to
        stop) unless `max_tokens` is smaller, or `ignore_eos` asks for `max_tokens`
        exactly; then it ends with `length`.
        """
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.advance(now)
        natural = self.profile.default_max_tokens
        length: int
        reason: FinishReason
        if max_tokens is None:
            length, reason = natural, "stop"
        elif ignore_eos or max_tokens <= natural:
            length, reason = max_tokens, "length"
        else:
            length, reason = natural, "stop"
        blocks = (
            block_hashes(prompt, self.profile.prefix_block_chars)
            if self.profile.prefix_cache
            else ()
        )
        seq = Sequence(
            id=next(self._ids),
            prompt_tokens=self.prompt_tokens(prompt),
            max_tokens=length,
            end_reason=reason,
            arrived_at=now,
            blocks=blocks,
        )
        self.waiting.append(seq)
        self._admit(now)
        return seq

    def abort(self, seq: Sequence, now: float) -> None:
        """The client went away: drop the sequence and give its slot to the next one."""
        self.advance(now)
        if seq.done:
            return
        if seq.state == "waiting":
            self.waiting.remove(seq)
        else:
            self.running.discard(seq)
        seq.state = "aborted"
        seq.finished_at = now
        seq.next_at = math.inf
        self.metrics.success["abort"].inc()
        seq.listener()
        self._admit(now)

    def next_event_at(self) -> float | None:
        """When the next token is due, or None when nothing runs."""
        while self._events:
            due, _, seq = self._events[0]
            if seq.next_at == due and not seq.done:
                return due
            heapq.heappop(self._events)  # stale: aborted, or rescheduled
        return None

    def advance(self, now: float) -> None:
        """Process every event due by `now`, each at its own (nominal) time."""
        while (due := self.next_event_at()) is not None and due <= now:
            _, _, seq = heapq.heappop(self._events)
            self._emit(seq, due)

    def _schedule(self, seq: Sequence, at: float) -> None:
        seq.next_at = at
        heapq.heappush(self._events, (at, seq.id, seq))

    def _admit(self, now: float) -> None:
        profile = self.profile
        while self.waiting and len(self.running) < profile.max_num_seqs:
            seq = self.waiting.popleft()
            if profile.prefix_cache:
                matched = self.prefix_cache.match(seq.blocks)
                cached_chars = matched * profile.prefix_block_chars
                # As vLLM: the last prompt token is always computed, to get logits.
                seq.cached_tokens = min(
                    cached_chars // profile.chars_per_token, seq.prompt_tokens - 1
                )
                for queries, hits in zip(
                    self.metrics.prefix_queries, self.metrics.prefix_hits, strict=True
                ):
                    queries.inc(seq.prompt_tokens)
                    hits.inc(seq.cached_tokens)
            prefill = profile.prefill_s(seq.prompt_tokens, seq.cached_tokens, len(self.running))
            self.running.add(seq)
            self.peak_running = max(self.peak_running, len(self.running))
            seq.state = "prefill"
            seq.admitted_at = now
            self.metrics.queue_time.observe(now - seq.arrived_at)
            self._schedule(seq, now + prefill)

    def _emit(self, seq: Sequence, now: float) -> None:
        metrics = self.metrics
        seq.generated += 1
        metrics.generation_tokens.inc()
        if seq.state == "prefill":
            seq.state = "decode"
            seq.first_token_at = now
            metrics.ttft.observe(now - seq.arrived_at)
            metrics.prompt_tokens.inc(seq.prompt_tokens)
            if self.profile.prefix_cache:
                self.prefix_cache.insert(seq.blocks)
        elif seq.last_token_at is not None:
            metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if seq.generated >= seq.max_tokens:
            self.running.discard(seq)
            seq.state = "finished"
            seq.finished_at = now
            seq.next_at = math.inf
            metrics.e2e.observe(now - seq.arrived_at)
            metrics.success[seq.end_reason].inc()
            self._admit(now)
        else:
            self._schedule(seq, now + self.profile.itl_s(len(self.running)))
        seq.listener()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class AsyncEngine:
    """Runs an `EmulatedEngine` in real time on the running event loop.

    One `call_at` timer per engine, re-armed for the engine's next event after every
    change: no task per sequence, no polling. Handlers wait with `next_tokens`.
    """

    def __init__(self, engine: EmulatedEngine) -> None:
        self.engine = engine
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def submit(
        self, prompt: str, max_tokens: int | None = None, ignore_eos: bool = False
    ) -> Sequence:
        loop = asyncio.get_running_loop()
        seq = self.engine.submit(prompt, loop.time(), max_tokens, ignore_eos)
        self._arm(loop)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Abort unless already over: safe to call in every handler's `finally`."""
        if seq.done:
            return
        loop = asyncio.get_running_loop()
        self.engine.abort(seq, loop.time())
        self._arm(loop)

    def sync(self) -> None:
        """Bring the engine up to now (before reading its state, e.g. for /metrics)."""
        loop = asyncio.get_running_loop()
        self.engine.advance(loop.time())
        self._arm(loop)

    async def next_tokens(self, seq: Sequence, seen: int) -> int:
        """Wait until `seq` has more than `seen` tokens, or is over; return its count."""
        loop = asyncio.get_running_loop()
        while seq.generated <= seen and not seq.done:
            waiter: asyncio.Future[None] = loop.create_future()
            seq.listener = functools.partial(_wake, waiter)
            try:
                await waiter
            finally:
                seq.listener = _nothing
        return seq.generated

    async def wait_done(self, seq: Sequence) -> None:
        """Wait for the end only: a sequence never exceeds `max_tokens`, so no wake-up per token."""
        await self.next_tokens(seq, seq.max_tokens)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        # Timers may fire a hair early (clock resolution): the due event is processed anyway.
        now = max(loop.time(), self._timer_at or 0.0)
        self._timer = self._timer_at = None
        self.engine.advance(now)
        self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        at = self.engine.next_event_at()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else loop.call_at(at, self._tick)
