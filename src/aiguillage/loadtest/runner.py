"""Run a scenario: one asyncio task per user, every request recorded.

Users are closed loops, as people and batch jobs are: a user sends its next
request only once the previous answer has ended, so the offered load follows
the gateway's speed instead of piling up unboundedly. A user leaving during
the ramp-down finishes its current request and sends no other. Times are
seconds since the start of the run on the monotonic clock.

Everything is bounded: at most `max_requests` requests are sent, each is cut
at `request_timeout_s`, and the whole run is cancelled at a hard deadline
after the planned end.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from aiguillage.loadtest.scenario import Scenario, UserClass, UserPlan, check_target

QUEUE_HEADER = "x-aiguillage-queue-ms"
BACKEND_HEADER = "x-aiguillage-backend"
QUEUE_DEPTH_METRIC = "aiguillage_queue_depth"
RECENT_TTFT_WINDOW = 200
_ERROR_TEXT_LIMIT = 300


@dataclass
class RequestRecord:
    """One request as the client saw it; `ttft_s` is the first content chunk.

    For a non-streaming request the first content arrives with the whole body,
    so its TTFT equals its latency. `queue_ms` and `backend` are the gateway's
    own headers, absent (None) when the target is not an Aiguillage gateway.
    `cut` marks a request the load generator itself abandoned (Ctrl-C, hard
    deadline): it says nothing about the gateway, so reports leave it out.
    """

    class_name: str
    priority: str
    user_id: int
    seq: int
    start_s: float
    ttft_s: float | None = None
    latency_s: float | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    content_chunks: int = 0
    status: int | None = None
    error: str | None = None
    queue_ms: float | None = None
    backend: str | None = None
    cut: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def end_s(self) -> float | None:
        return None if self.latency_s is None else self.start_s + self.latency_s


@dataclass(frozen=True)
class Sample:
    """The system every `sample_interval_s`: users in it, requests open, gateway queue.

    `draining_users` have passed their leave time but are still finishing
    their last request; they are not counted as active.
    """

    t_s: float
    planned_users: int
    active_users: int
    draining_users: int
    in_flight: int
    queue_depth: float | None


@dataclass
class UserTrace:
    """What one user actually did, against its plan."""

    user_id: int
    class_name: str
    start_s: float
    leave_s: float
    joined_s: float | None = None
    finished_s: float | None = None
    requests: int = 0


@dataclass(frozen=True)
class Progress:
    """A live view for the terminal; `recent_ttft_s` holds each class's latest TTFTs."""

    phase: str
    elapsed_s: float
    total_s: float
    planned_users: int
    active_users: int
    in_flight: int
    done: int
    errors: int
    recent_ttft_s: dict[str, list[float]]


@dataclass
class RunResult:
    """Everything a run saw. `stop_reason`: completed, max_requests, interrupted, deadline."""

    scenario: Scenario
    started_at: datetime
    duration_s: float
    requests: list[RequestRecord]
    samples: list[Sample]
    users: list[UserTrace]
    stop_reason: str
    metrics_available: bool = False


class LoadRunner:
    """Sends a scenario's traffic once; `progress()` may be polled while `run()` goes."""

    def __init__(self, scenario: Scenario, *, allow_remote: bool = False) -> None:
        check_target(scenario.base_url, allow_remote)
        self.scenario = scenario
        self._plans = scenario.plan()
        self._traces = [
            UserTrace(p.user_id, p.user_class.name, p.start_s, p.leave_s) for p in self._plans
        ]
        self._records: list[RequestRecord] = []
        self._samples: list[Sample] = []
        self._recent: dict[str, deque[float]] = {
            c.name: deque(maxlen=RECENT_TTFT_WINDOW) for c in scenario.classes
        }
        self._t0: float | None = None
        self._in_flight = 0
        self._sent = 0
        self._done = 0
        self._errors = 0
        self._stop_reason = "completed"
        self._stop = asyncio.Event()
        self._metrics_seen = False
        self._metrics_gone = not scenario.scrape_metrics

    def request_stop(self) -> None:
        """End the run early (Ctrl-C): open requests are cancelled, the result is kept."""
        self._stop_reason = "interrupted"
        self._stop.set()

    def progress(self) -> Progress:
        t = self._now() if self._t0 is not None else 0.0
        return Progress(
            phase=self.scenario.phase(t) if self._t0 is not None else "starting",
            elapsed_s=t,
            total_s=self.scenario.total_s,
            planned_users=self._planned(t),
            active_users=self._active(t),
            in_flight=self._in_flight,
            done=self._done,
            errors=self._errors,
            recent_ttft_s={name: list(values) for name, values in self._recent.items()},
        )

    async def run(self) -> RunResult:
        if self._t0 is not None:
            raise RuntimeError("a LoadRunner runs once")
        scenario = self.scenario
        connector = aiohttp.TCPConnector(limit=scenario.users + 8, limit_per_host=0)
        hard_deadline = scenario.total_s + scenario.request_timeout_s + scenario.error_backoff_s
        started_at = datetime.now(UTC)
        self._t0 = time.monotonic()
        async with aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": "aiguillage-loadtest"}
        ) as session:
            sampler = asyncio.create_task(self._sample_loop(session))
            users = [asyncio.create_task(self._user(session, p)) for p in self._plans]
            everyone = asyncio.gather(*users)
            stop = asyncio.create_task(self._stop.wait())
            try:
                waited: list[asyncio.Future[Any]] = [everyone, stop]
                await asyncio.wait(
                    waited,
                    timeout=hard_deadline + 5.0,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not everyone.done() and not self._stop.is_set():
                    self._stop_reason = "deadline"
            finally:
                for task in [*users, stop, sampler]:
                    task.cancel()
                await asyncio.gather(everyone, stop, sampler, return_exceptions=True)
            self._samples.append(self._sample(None))
        for task in users:  # a bug in a user task must not pass for a quiet run
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
        return RunResult(
            scenario=scenario,
            started_at=started_at,
            duration_s=self._now(),
            requests=list(self._records),
            samples=list(self._samples),
            users=list(self._traces),
            stop_reason=self._stop_reason,
            metrics_available=self._metrics_seen,
        )

    # -- users ---------------------------------------------------------------

    async def _user(self, session: aiohttp.ClientSession, plan: UserPlan) -> None:
        trace = self._traces[plan.user_id]
        await self._sleep_until(plan.start_s)
        if self._sent >= self.scenario.max_requests:
            self._stop_reason = "max_requests"
            return
        trace.joined_s = self._now()
        rng = random.Random(self.scenario.seed * 1_000_003 + plan.user_id)
        try:
            while True:
                start = self._now()
                if start >= plan.leave_s:
                    break
                if self._sent >= self.scenario.max_requests:
                    self._stop_reason = "max_requests"
                    break
                self._sent += 1
                record = await self._request(session, plan, trace.requests, start, rng)
                trace.requests += 1
                pause = plan.user_class.think_time_s
                if not record.ok:
                    pause = max(pause, self.scenario.error_backoff_s)
                if pause > 0:
                    await self._sleep_until(min(self._now() + pause, plan.leave_s))
        finally:
            trace.finished_s = self._now()

    async def _request(
        self,
        session: aiohttp.ClientSession,
        plan: UserPlan,
        seq: int,
        start: float,
        rng: random.Random,
    ) -> RequestRecord:
        user_class = plan.user_class
        record = RequestRecord(user_class.name, user_class.priority_label, plan.user_id, seq, start)
        self._records.append(record)
        self._in_flight += 1
        try:
            await self._exchange(session, user_class, record, self._body(plan, seq, rng))
        except asyncio.CancelledError:
            record.cut = True
            record.error = record.error or "cancelled before the answer ended"
            raise
        except TimeoutError:
            record.error = f"timeout after {self.scenario.request_timeout_s:g} s"
        except aiohttp.ClientError as error:
            record.error = _short(f"{type(error).__name__}: {error}")
        except ValueError as error:  # undecodable JSON in the answer
            record.error = _short(f"bad answer: {error}")
        finally:
            record.latency_s = self._now() - start
            self._in_flight -= 1
            self._done += 1
            if not record.ok:
                self._errors += 0 if record.cut else 1
            elif record.ttft_s is not None:
                self._recent[user_class.name].append(record.ttft_s)
        return record

    def _body(self, plan: UserPlan, seq: int, rng: random.Random) -> bytes:
        user_class = plan.user_class
        body: dict[str, Any] = {
            "model": self.scenario.model,
            "messages": user_class.messages(plan.user_id, seq, rng),
            "max_tokens": user_class.max_tokens,
            "stream": user_class.stream,
        }
        if user_class.stream:
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def _exchange(
        self,
        session: aiohttp.ClientSession,
        user_class: UserClass,
        record: RequestRecord,
        body: bytes,
    ) -> None:
        headers = {
            "Authorization": f"Bearer {user_class.api_key}",
            "Content-Type": "application/json",
        }
        timeout = aiohttp.ClientTimeout(total=self.scenario.request_timeout_s)
        async with session.post(
            self.scenario.chat_url, data=body, headers=headers, timeout=timeout
        ) as response:
            record.status = response.status
            record.queue_ms = _float_or_none(response.headers.get(QUEUE_HEADER))
            record.backend = response.headers.get(BACKEND_HEADER)
            if response.status != 200:
                text = await response.text(errors="replace")
                record.error = _short(text.strip()) or f"HTTP {response.status}"
            elif user_class.stream:
                await self._read_stream(response, record)
            else:
                self._read_json(orjson.loads(await response.read()), record)

    async def _read_stream(self, response: aiohttp.ClientResponse, record: RequestRecord) -> None:
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            event = orjson.loads(data)
            if not isinstance(event, dict):
                continue
            if event.get("error") is not None:
                record.error = _short(f"error event: {orjson.dumps(event['error']).decode()}")
            _read_usage(event, record)
            for choice in event.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and (
                    delta.get("content") or delta.get("reasoning_content")
                ):
                    record.content_chunks += 1
                    if record.ttft_s is None:
                        record.ttft_s = self._now() - record.start_s
        record.error = record.error or "stream ended without [DONE]"

    def _read_json(self, answer: Any, record: RequestRecord) -> None:
        if not isinstance(answer, dict):
            raise ValueError("the answer is not a JSON object")
        _read_usage(answer, record)
        record.ttft_s = self._now() - record.start_s
        record.content_chunks = sum(
            1
            for choice in answer.get("choices") or ()
            if isinstance(choice, dict) and (choice.get("message") or {}).get("content")
        )

    # -- sampling ------------------------------------------------------------

    async def _sample_loop(self, session: aiohttp.ClientSession) -> None:
        next_t = 0.0
        while True:
            depth = await self._scrape_queue_depth(session)
            self._samples.append(self._sample(depth))
            next_t += self.scenario.sample_interval_s
            await self._sleep_until(next_t)

    async def _scrape_queue_depth(self, session: aiohttp.ClientSession) -> float | None:
        """Sum of the gateway's queue-depth gauge; None when it cannot be had.

        A 404 means the target has no /metrics: scraping stops for the run.
        Other failures are taken as passing and tried again at the next sample.
        """
        if self._metrics_gone:
            return None
        timeout = aiohttp.ClientTimeout(total=max(0.05, min(2.0, self.scenario.sample_interval_s)))
        try:
            async with session.get(self.scenario.metrics_url, timeout=timeout) as response:
                if response.status == 404:
                    self._metrics_gone = True
                    return None
                if response.status != 200:
                    return None
                text = await response.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError):
            return None
        depth = parse_gauge_sum(text, QUEUE_DEPTH_METRIC)
        self._metrics_seen = self._metrics_seen or depth is not None
        return depth

    def _sample(self, queue_depth: float | None) -> Sample:
        t = self._now()
        draining = sum(
            1
            for trace in self._traces
            if trace.joined_s is not None and trace.finished_s is None and t >= trace.leave_s
        )
        return Sample(t, self._planned(t), self._active(t), draining, self._in_flight, queue_depth)

    def _active(self, t: float) -> int:
        """Users that have joined, have not left, and are before their leave time."""
        return sum(
            1
            for trace in self._traces
            if trace.joined_s is not None and trace.finished_s is None and t < trace.leave_s
        )

    def _planned(self, t: float) -> int:
        return sum(1 for p in self._plans if p.start_s <= t < p.leave_s)

    # -- clock ---------------------------------------------------------------

    def _now(self) -> float:
        assert self._t0 is not None
        return time.monotonic() - self._t0

    async def _sleep_until(self, t: float) -> None:
        """Sleep until `t`, never waking early: plans are checked against this clock."""
        # asyncio (and uvloop's millisecond timers) may wake a hair early: sleep again.
        while (now := self._now()) < t:  # noqa: ASYNC110
            await asyncio.sleep(t - now)


def parse_gauge_sum(text: str, name: str) -> float | None:
    """Sum every sample of a Prometheus gauge in exposition text; None if it is absent."""
    total: float | None = None
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        rest = line[len(name) :]
        if rest.startswith("{"):
            end = rest.rfind("}")
            if end < 0:
                continue
            rest = rest[end + 1 :]
        elif not rest[:1].isspace():
            continue  # another metric whose name starts with this one
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        total = value if total is None else total + value
    return total


def _read_usage(event: dict[str, Any], record: RequestRecord) -> None:
    usage = event.get("usage")
    if isinstance(usage, dict):
        completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
        if isinstance(completion, int):
            record.completion_tokens = completion
        if isinstance(prompt, int):
            record.prompt_tokens = prompt


def _float_or_none(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_TEXT_LIMIT else text[: _ERROR_TEXT_LIMIT - 1] + "…"
