"""The vLLM emulator: its scheduling model on a made-up clock, then its HTTP face in real time.

The model tests drive `EmulatedEngine` with explicit times, so their numbers are
exact. The HTTP tests use engines a few milliseconds fast on 127.0.0.1, and check
server-side (nominal) times where a number matters, so a busy CI machine does not
make them flaky.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aiguillage.emulator.engine import EmulatedEngine, EngineProfile, PrefixCache, output_text
from aiguillage.emulator.server import (
    EngineSpec,
    RunningEngine,
    parse_args,
    serve_engines,
    stop_engines,
)

# A profile whose numbers are easy to compute with by hand.
SIMPLE = EngineProfile(
    max_num_seqs=2,
    base_ttft_s=0.1,
    prefill_s_per_1k_tokens=0.0,
    ttft_growth=0.5,
    base_itl_s=0.01,
    itl_growth=0.5,
    default_max_tokens=10,
)
# Fast enough for HTTP tests that take a few tens of milliseconds.
FAST = EngineProfile(
    max_num_seqs=2,
    base_ttft_s=0.01,
    prefill_s_per_1k_tokens=0.0,
    base_itl_s=0.005,
    default_max_tokens=8,
)
LONG: dict[str, Any] = {"max_tokens": 100_000, "ignore_eos": True}  # runs until the client leaves


def run_until_idle(engine: EmulatedEngine, check: Any = None) -> None:
    """Play the engine's events in time order, calling `check()` after each."""
    while (due := engine.next_event_at()) is not None:
        engine.advance(due)
        if check is not None:
            check()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (parsed by prometheus_client)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise KeyError(f"{name} {labels} not in the exposition")


def registry_text(engine: EmulatedEngine) -> str:
    from prometheus_client import generate_latest

    return generate_latest(engine.metrics.registry).decode()


# ---------------------------------------------------------------- the scheduling model


def test_running_never_exceeds_max_num_seqs_and_the_rest_waits_in_fifo_order() -> None:
    engine = EmulatedEngine(SIMPLE)
    seqs = [engine.submit("hello", now=0.0) for _ in range(5)]

    assert len(engine.running) == 2
    assert list(engine.waiting) == seqs[2:]
    text = registry_text(engine)
    assert metric(text, "vllm:num_requests_running") == 2
    assert metric(text, "vllm:num_requests_waiting") == 3
    assert metric(text, "vllm:kv_cache_usage_perc") == 1.0

    def check() -> None:
        assert len(engine.running) <= SIMPLE.max_num_seqs

    run_until_idle(engine, check)
    assert engine.peak_running == 2
    assert all(seq.state == "finished" and seq.generated == 10 for seq in seqs)
    admitted = [seq.admitted_at for seq in seqs if seq.admitted_at is not None]
    assert len(admitted) == 5 and admitted == sorted(admitted)  # FIFO
    assert seqs[2].admitted_at == seqs[0].finished_at  # a slot is reused at once


def test_ttft_grows_with_the_batch_and_with_queueing() -> None:
    engine = EmulatedEngine(SIMPLE)
    alone = engine.submit("a", now=0.0)
    run_until_idle(engine)
    first, second, queued = (engine.submit("a", now=10.0) for _ in range(3))
    run_until_idle(engine)

    assert alone.ttft == pytest.approx(0.1)
    assert first.ttft == pytest.approx(0.1)
    assert second.ttft == pytest.approx(0.1 * (1 + 0.5 * 1))  # prefill beside one running
    assert queued.ttft is not None and second.ttft is not None
    assert queued.ttft > second.ttft + 0.1  # waited for a slot, then prefilled
    text = registry_text(engine)
    assert metric(text, "vllm:time_to_first_token_seconds_count") == 4
    assert metric(text, "vllm:request_queue_time_seconds_count") == 4


def test_itl_grows_with_the_number_running() -> None:
    engine = EmulatedEngine(replace(SIMPLE, max_num_seqs=4, ttft_growth=0.0))
    alone = engine.submit("a", now=0.0, max_tokens=2)
    run_until_idle(engine)
    batch = [engine.submit("a", now=10.0, max_tokens=2) for _ in range(3)]
    run_until_idle(engine)

    assert alone.finished_at is not None and alone.first_token_at is not None
    assert alone.finished_at - alone.first_token_at == pytest.approx(0.01)
    for seq in batch:
        assert seq.finished_at is not None and seq.first_token_at is not None
        # Three running while each scheduled its second token: ITL * (1 + 0.5 * 2).
        assert seq.finished_at - seq.first_token_at == pytest.approx(0.02)


def test_a_repeated_prefix_prefills_much_faster_than_a_fresh_prompt() -> None:
    profile = replace(SIMPLE, base_ttft_s=0.01, prefill_s_per_1k_tokens=1.0)
    engine = EmulatedEngine(profile)
    shared = "You are a helpful assistant. " * 140  # 4060 characters: 1015 tokens
    first = engine.submit(shared + "Question one?", now=0.0, max_tokens=1)
    run_until_idle(engine)
    again = engine.submit(shared + "Question two?", now=5.0, max_tokens=1)
    run_until_idle(engine)
    fresh = engine.submit("Another system prompt entirely. " * 127, now=10.0, max_tokens=1)
    run_until_idle(engine)

    assert first.cached_tokens == 0 and fresh.cached_tokens == 0
    assert again.cached_tokens == 1008  # 63 full blocks of 64 characters
    assert again.ttft is not None and fresh.ttft is not None and first.ttft is not None
    assert again.ttft < 0.2 * fresh.ttft
    assert first.ttft == pytest.approx(0.01 + 1.0 * first.prompt_tokens / 1000)
    text = registry_text(engine)
    queried = first.prompt_tokens + again.prompt_tokens + fresh.prompt_tokens
    for prefix in ("vllm:prefix_cache", "vllm:gpu_prefix_cache"):
        assert metric(text, f"{prefix}_hits_total") == 1008
        assert metric(text, f"{prefix}_queries_total") == queried

    no_cache = EmulatedEngine(replace(profile, prefix_cache=False))
    no_cache.submit(shared + "Question one?", now=0.0, max_tokens=1)
    run_until_idle(no_cache)
    repeat = no_cache.submit(shared + "Question two?", now=5.0, max_tokens=1)
    run_until_idle(no_cache)
    assert repeat.cached_tokens == 0 and repeat.ttft == pytest.approx(first.ttft)


def test_prefix_cache_is_an_lru_of_blocks() -> None:
    cache = PrefixCache(capacity_blocks=3)
    cache.insert((1, 2))
    cache.insert((3,))
    assert cache.match((1, 2, 9)) == 2  # touches 1 and 2: 3 is now the oldest
    cache.insert((4,))
    assert len(cache) == 3
    assert cache.match((3,)) == 0
    assert cache.match((1, 2)) == 2


def test_slowdown_two_doubles_every_latency() -> None:
    results = []
    for slowdown in (1.0, 2.0):
        engine = EmulatedEngine(replace(SIMPLE, prefill_s_per_1k_tokens=0.5, slowdown=slowdown))
        seqs = [engine.submit("x" * 2000, now=0.0) for _ in range(3)]
        run_until_idle(engine)
        results.append([(seq.ttft, seq.e2e) for seq in seqs])
    for (ttft1, e2e1), (ttft2, e2e2) in zip(*results, strict=True):
        assert ttft2 == pytest.approx(2 * ttft1)
        assert e2e2 == pytest.approx(2 * e2e1)


def test_abort_frees_the_slot_for_the_head_of_the_queue() -> None:
    engine = EmulatedEngine(replace(SIMPLE, max_num_seqs=1))
    running = engine.submit("a", now=0.0, **LONG)
    queued = engine.submit("b", now=0.0)
    behind = engine.submit("c", now=0.0)
    engine.advance(1.0)
    assert running.generated > 10 and queued.state == "waiting"

    engine.abort(behind, now=1.0)  # leaves the queue without ever running
    engine.abort(running, now=1.5)
    assert running.finish_reason == "abort" and behind.finish_reason == "abort"
    assert queued.admitted_at == 1.5 and list(engine.running) == [queued]
    assert not engine.waiting
    engine.abort(running, now=2.0)  # a second abort changes nothing
    run_until_idle(engine)
    assert queued.finish_reason == "stop"
    assert metric(registry_text(engine), "vllm:request_success_total", finished_reason="abort") == 2


@pytest.mark.parametrize(
    ("max_tokens", "ignore_eos", "expected", "reason"),
    [(None, False, 10, "stop"), (3, False, 3, "length"), (50, False, 10, "stop"),
     (50, True, 50, "length")],
)  # fmt: skip
def test_answer_length_and_finish_reason(
    max_tokens: int | None, ignore_eos: bool, expected: int, reason: str
) -> None:
    engine = EmulatedEngine(SIMPLE)
    seq = engine.submit("hi", now=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    run_until_idle(engine)
    assert (seq.generated, seq.finish_reason) == (expected, reason)
    assert seq.text() == output_text(expected) == " ".join(f"tok{i}" for i in range(expected))
    assert seq.prompt_tokens == 1  # ceil(2 characters / 4)


# ---------------------------------------------------------------- HTTP


@contextlib.asynccontextmanager
async def served(*profiles: EngineProfile) -> AsyncIterator[list[RunningEngine]]:
    engines = await serve_engines([EngineSpec(profile) for profile in profiles])
    try:
        yield engines
    finally:
        await stop_engines(engines)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


def chat(content: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": "emulated", "messages": [{"role": "user", "content": content}], **extra}


def sse_documents(raw: str) -> list[Any]:
    events = [block for block in raw.split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    return [orjson.loads(event.removeprefix("data: ")) for event in events[:-1]]


async def wait_for(condition: Any, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def scrape(session: aiohttp.ClientSession, engine: RunningEngine) -> str:
    async with session.get(f"{engine.url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


async def test_chat_stream_yields_max_tokens_chunks_then_finish_usage_and_done(
    session: aiohttp.ClientSession,
) -> None:
    async with served(FAST) as [engine]:
        body = chat(max_tokens=5, stream=True, stream_options={"include_usage": True})
        async with session.post(f"{engine.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            documents = sse_documents(await response.text())

    *chunks, final, usage = documents
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:]]
    assert contents == ["tok0", " tok1", " tok2", " tok3", " tok4"]
    assert all(c["object"] == "chat.completion.chunk" for c in documents)
    assert final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 5


async def test_completions_stream_and_plain_answers(session: aiohttp.ClientSession) -> None:
    async with served(FAST) as [engine]:
        body = {"model": "emulated", "prompt": "Once upon a time", "stream": True}
        async with session.post(f"{engine.url}/v1/completions", json=body) as response:
            *chunks, final = sse_documents(await response.text())
        async with session.post(f"{engine.url}/v1/completions", json=body | {"stream": False}) as r:
            completion = await r.json()
        async with session.post(f"{engine.url}/v1/chat/completions", json=chat(max_tokens=3)) as r:
            answer = await r.json()

    assert "".join(c["choices"][0]["text"] for c in chunks) == output_text(8)  # no usage chunk
    assert final["choices"][0]["finish_reason"] == "stop"  # the default length, not capped
    assert completion["choices"][0]["text"] == output_text(8)
    assert completion["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 8,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2"}
    assert answer["choices"][0]["finish_reason"] == "length"


async def test_models_health_and_errors(session: aiohttp.ClientSession) -> None:
    async with served(FAST) as [engine]:
        async with session.get(f"{engine.url}/health") as response:
            assert response.status == 200
        async with session.get(f"{engine.url}/v1/models") as response:
            assert [card["id"] for card in (await response.json())["data"]] == ["emulated"]
        url = f"{engine.url}/v1/chat/completions"
        async with session.post(url, json=chat() | {"model": "other"}) as response:
            assert response.status == 404
        async with session.post(url, data=b"{not json") as response:
            assert response.status == 400
        async with session.post(url, json=chat(max_tokens=0)) as response:
            assert response.status == 400
            assert "max_tokens" in (await response.json())["error"]["message"]
        async with session.post(f"{engine.url}/v1/completions", json={"prompt": 3}) as response:
            assert response.status == 400
        assert not engine.engine.engine.running and not engine.engine.engine.waiting


async def test_metrics_have_vllm_names_and_values_at_a_known_load(
    session: aiohttp.ClientSession,
) -> None:
    async with served(FAST) as [engine]:
        prompt = {"model": "emulated", "prompt": "a" * 400, "max_tokens": 3}  # 100 tokens
        for _ in range(2):  # the second finds 6 cached blocks: 96 tokens
            async with session.post(f"{engine.url}/v1/completions", json=prompt) as response:
                assert (await response.json())["usage"]["completion_tokens"] == 3
        streams = [
            await session.post(f"{engine.url}/v1/chat/completions", json=chat(stream=True, **LONG))
            for _ in range(3)
        ]  # headers are back: all three are in the engine, two running, one waiting
        text = await scrape(session, engine)
        for stream in streams:
            stream.close()
        await wait_for(
            lambda: not engine.engine.engine.running and not engine.engine.engine.waiting
        )
        after = await scrape(session, engine)

    labels = {"model_name": "emulated", "engine": "0"}
    assert metric(text, "vllm:num_requests_running", **labels) == 2
    assert metric(text, "vllm:num_requests_waiting", **labels) == 1
    assert metric(text, "vllm:kv_cache_usage_perc", **labels) == 1.0
    assert metric(text, "vllm:prompt_tokens_total") >= 200
    assert metric(text, "vllm:prefix_cache_hits_total") == 96
    assert metric(text, "vllm:gpu_prefix_cache_hits_total") == 96
    assert metric(text, "vllm:request_success_total", finished_reason="length") == 2
    assert metric(text, "vllm:e2e_request_latency_seconds_count") == 2
    e2e_sum = metric(text, "vllm:e2e_request_latency_seconds_sum")
    assert e2e_sum == pytest.approx(2 * (0.01 + 2 * 0.005))  # nominal: exact
    assert metric(text, "vllm:time_to_first_token_seconds_bucket", le="0.02") >= 2
    assert metric(text, "vllm:time_to_first_token_seconds_bucket", le="+Inf") >= 2
    assert metric(after, "vllm:num_requests_running") == 0
    assert metric(after, "vllm:num_requests_waiting") == 0
    assert metric(after, "vllm:request_success_total", finished_reason="abort") == 3
    assert metric(after, "vllm:e2e_request_latency_seconds_count") == 2  # aborts are not timed


async def test_a_client_disconnect_frees_the_slot_for_a_waiting_request(
    session: aiohttp.ClientSession,
) -> None:
    async with served(replace(FAST, max_num_seqs=1)) as [engine]:
        model = engine.engine.engine
        url = f"{engine.url}/v1/chat/completions"
        first = await session.post(url, json=chat(stream=True, **LONG))
        await first.content.readline()  # a token arrived: it runs
        second = asyncio.create_task(session.post(url, json=chat(max_tokens=2)))
        await wait_for(lambda: len(model.waiting) == 1)
        assert len(model.running) == 1

        first.close()  # the client goes away mid-stream
        response = await asyncio.wait_for(second, 3)
        answer = await response.json()

    assert answer["choices"][0]["message"]["content"] == "tok0 tok1"
    assert model.peak_running == 1
    assert metric(registry_text(model), "vllm:request_success_total", finished_reason="abort") == 1


async def test_a_client_that_gives_up_while_queued_leaves_the_queue(
    session: aiohttp.ClientSession,
) -> None:
    async with served(replace(FAST, max_num_seqs=1)) as [engine]:
        model = engine.engine.engine
        url = f"{engine.url}/v1/chat/completions"
        running = await session.post(url, json=chat(stream=True, **LONG))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(session.post(url, json=chat()), 0.2)
        await wait_for(lambda: not model.waiting)
        assert len(model.running) == 1
        running.close()
        await wait_for(lambda: not model.running)


async def test_slowdown_two_roughly_doubles_latency_over_http(
    session: aiohttp.ClientSession,
) -> None:
    profile = replace(FAST, base_ttft_s=0.05, base_itl_s=0.01, default_max_tokens=10)
    async with served(profile, replace(profile, slowdown=2.0)) as engines:
        assert engines[0].url != engines[1].url

        async def timed(engine: RunningEngine) -> float:
            start = time.monotonic()
            async with session.post(f"{engine.url}/v1/chat/completions", json=chat()) as r:
                assert (await r.json())["usage"]["completion_tokens"] == 10
            return time.monotonic() - start

        normal, slow = await asyncio.gather(*(timed(engine) for engine in engines))
        texts = [await scrape(session, engine) for engine in engines]

    assert 1.5 < slow / normal < 2.8
    sums = [metric(text, "vllm:e2e_request_latency_seconds_sum") for text in texts]
    assert sums == pytest.approx([0.14, 0.28])  # nominal engine times: exact


async def test_the_openai_sdk_streams_from_the_emulator() -> None:
    async with (
        served(FAST) as [engine],
        openai.AsyncOpenAI(base_url=f"{engine.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        stream = await client.chat.completions.create(
            model="emulated",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


# ---------------------------------------------------------------- command line


def test_command_line_builds_one_spec_per_engine() -> None:
    specs, host = parse_args(
        shlex.split(
            "--engines 4 --base-port 9001 --max-num-seqs 8 --ttft 0.2 --itl 0.03 "
            "--slowdown 1,2,1,1 --no-prefix-cache"
        )
    )
    assert host == "127.0.0.1"
    assert [spec.port for spec in specs] == [9001, 9002, 9003, 9004]
    assert [spec.profile.slowdown for spec in specs] == [1, 2, 1, 1]
    assert {
        (s.profile.max_num_seqs, s.profile.base_ttft_s, s.profile.base_itl_s) for s in specs
    } == {(8, 0.2, 0.03)}
    assert not any(spec.profile.prefix_cache for spec in specs)
    assert [spec.port for spec in parse_args(["--engines", "2", "--base-port", "0"])[0]] == [0, 0]
    with pytest.raises(SystemExit):
        parse_args(["--engines", "3", "--slowdown", "1,2"])


def test_python_m_emulator_serves_until_ctrl_c() -> None:
    command = [sys.executable, "-m", "aiguillage.emulator", "--engines", "2", "--base-port", "0"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            lines = [process.stdout.readline() for _ in range(3)]
            assert lines[2].startswith("Ctrl-C"), lines
            for line in lines[:2]:
                with urllib.request.urlopen(f"{line.split()[0]}/health", timeout=5) as response:
                    assert response.status == 200
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0
            assert "Traceback" not in process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()


def test_profile_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        EngineProfile(max_num_seqs=0)
    with pytest.raises(ValueError):
        EngineProfile(slowdown=0)
    assert math.isclose(EngineProfile(slowdown=2).itl_s(1), 0.04)
