"""Engine load adapters on recorded (llama.cpp) and source-built /metrics texts; the scraper."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from aiguillage.backends.signals import (
    EngineLoad,
    SignalScraper,
    has_metrics,
    histogram_quantile,
    load_between,
    parse_metrics,
)

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- one adapter per engine, on its fixture -------------------------------------------


def test_vllm_sums_data_parallel_engines_and_averages_kv_usage() -> None:
    sample = parse_metrics("vllm", fixture("vllm_scrape1.txt"), scraped_at=5.0)
    assert sample.running == 21  # 12 + 9
    assert sample.waiting == 4  # 3 + 1; num_requests_waiting_by_reason is not added on top
    assert sample.kv_cache_usage == pytest.approx(0.38)  # mean of 0.41 and 0.35
    assert len(sample.ttft_buckets) == 2  # one TTFT series per engine
    assert sample.scraped_at == 5.0


def test_vllm_older_releases_report_kv_usage_as_gpu_cache_usage_perc() -> None:
    # vLLM <= 0.8 names, as in docs.vllm.ai/en/v0.8.5/serving/metrics.html
    older = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m"} 3.0\n'
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.25\n'
    )
    assert parse_metrics("vllm", older).kv_cache_usage == 0.25
    # 0.9 and 0.10 publish both names: the newer one is read (different values tell which).
    both = older + "# TYPE vllm:kv_cache_usage_perc gauge\n"
    both += 'vllm:kv_cache_usage_perc{model_name="m"} 0.5\n'
    assert parse_metrics("vllm", both).kv_cache_usage == 0.5


def test_sglang() -> None:
    sample = parse_metrics("sglang", fixture("sglang.txt"))
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == (37, 5, 0.62)
    assert len(sample.ttft_buckets) == 1


def test_tgi_has_queue_and_batch_but_no_kv_or_ttft() -> None:
    sample = parse_metrics("tgi", fixture("tgi.txt"))
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == (13, 4, None)
    assert sample.ttft_buckets == {}


def test_llamacpp_recorded_during_three_concurrent_requests() -> None:
    # --parallel 2: two slots busy, the third request deferred
    sample = parse_metrics("llamacpp", fixture("llamacpp.txt"))
    assert (sample.running, sample.waiting) == (2, 1)
    assert sample.kv_cache_usage is None  # this build no longer exports kv_cache_usage_ratio
    assert sample.ttft_buckets == {}


def test_llamacpp_older_builds_kv_cache_usage_ratio_is_read() -> None:
    older = (
        "# TYPE llamacpp:kv_cache_usage_ratio gauge\n"
        "llamacpp:kv_cache_usage_ratio 0.75\n"
        "# TYPE llamacpp:requests_processing gauge\n"
        "llamacpp:requests_processing 1\n"
    )
    sample = parse_metrics("llamacpp", older)
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == (1, None, 0.75)


def test_lmdeploy_waiting_counts_engine_queue_and_requests_waiting_for_a_handle() -> None:
    sample = parse_metrics("lmdeploy", fixture("lmdeploy.txt"))
    assert sample.running == 6
    assert sample.waiting == 5  # num_requests_waiting 2 + num_api_requests_waiting 3
    assert sample.kv_cache_usage == 0.27


def test_engines_without_metrics() -> None:
    assert not has_metrics("ollama")
    assert not has_metrics("openai")
    assert all(has_metrics(kind) for kind in ("vllm", "sglang", "tgi", "llamacpp", "lmdeploy"))


# --- TTFT p95 from the difference of two scrapes --------------------------------------


def test_ttft_p95_comes_from_new_observations_only() -> None:
    first = parse_metrics("vllm", fixture("vllm_scrape1.txt"), scraped_at=10.0)
    second = parse_metrics("vllm", fixture("vllm_scrape2.txt"), scraped_at=20.0)
    load = load_between(first, second)
    # 100 new: 20 in (0.08, 0.1], 50 in (0.1, 0.25], 20 in (0.25, 0.5], 6 in (0.5, 0.75],
    # 4 in (0.75, 1]. Rank 95 lies in (0.5, 0.75] after 90: 0.5 + 0.25 * 5/6.
    assert load.ttft_p95_s == pytest.approx(0.5 + 0.25 * 5 / 6)
    # The cumulative histogram (old 3-30 s first tokens included) would say far more.
    assert load_between(parse_metrics("vllm", ""), second).ttft_p95_s == pytest.approx(16.5)
    assert (load.running, load.waiting, load.scraped_at) == (24, 7, 20.0)
    assert load.kv_cache_usage == pytest.approx(0.5)  # mean of 0.52 and 0.48


def test_no_new_observation_or_no_previous_scrape_gives_no_ttft() -> None:
    second = parse_metrics("vllm", fixture("vllm_scrape2.txt"))
    assert load_between(second, second).ttft_p95_s is None
    assert load_between(None, second).ttft_p95_s is None
    assert load_between(None, second).running == 24


def test_a_restarted_engine_counts_all_its_observations_as_new() -> None:
    before_restart = parse_metrics("vllm", fixture("vllm_scrape2.txt"))
    after_restart = parse_metrics("vllm", fixture("vllm_scrape1.txt"))
    # scrape 1's 70 observations: 55 at 3 s, 10 at 12 s, 5 at 30 s; rank 66.5 in (20, 40]
    assert load_between(before_restart, after_restart).ttft_p95_s == pytest.approx(26.0)


@pytest.mark.parametrize(
    ("engine", "name", "p95"),
    [
        # 40 in (0.1, 0.2], 30 in (0.2, 0.4], 20 in (0.4, 0.6], 6 in (0.6, 0.8], 4 in (1, 2]
        ("sglang", "sglang.txt", 0.6 + 0.2 * 5 / 6),
        # 10 in (0.25, 0.5], 10 in (0.75, 1.0]: rank 19 lies in (0.75, 1.0] after 10
        ("lmdeploy", "lmdeploy.txt", 0.75 + 0.25 * 9 / 10),
    ],
)
def test_ttft_p95_of_a_series_first_seen(engine: str, name: str, p95: float) -> None:
    # A series absent from the previous scrape (SGLang creates it on the first request)
    # is all new.
    empty = parse_metrics(engine, "")
    assert load_between(empty, parse_metrics(engine, fixture(name))).ttft_p95_s == pytest.approx(
        p95
    )


def test_histogram_quantile_edges_follow_prometheus() -> None:
    inf = math.inf
    assert histogram_quantile(0.95, {1.0: 10, 2.0: 10, inf: 100}) == 2.0  # rank in +Inf
    assert histogram_quantile(0.5, {1.0: 10, inf: 10}) == 0.5  # first bucket from 0
    assert histogram_quantile(0.95, {1.0: 10, 2.0: 20}) is None  # no +Inf bucket
    assert histogram_quantile(0.95, {1.0: 0, inf: 0}) is None  # nothing observed
    assert histogram_quantile(0.95, {inf: 5}) is None  # only +Inf: no finite bound


# --- unreadable answers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<html><body>404 Not Found</body></html>",
        "hello world",
        "vllm:num_requests_running{model_name= 3",
        "",
        "\x00\xff binary",
    ],
)
def test_garbage_gives_all_none_without_raising(text: str) -> None:
    for engine in ("vllm", "sglang", "tgi", "llamacpp", "lmdeploy"):
        sample = parse_metrics(engine, text)
        assert (sample.running, sample.waiting, sample.kv_cache_usage) == (None, None, None)
        assert sample.ttft_buckets == {}
        assert load_between(sample, sample).ttft_p95_s is None


def test_unknown_engine_reads_nothing() -> None:
    sample = parse_metrics("ollama", fixture("vllm_scrape1.txt"))
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == (None, None, None)


def test_lines_before_a_broken_one_are_kept_and_nan_is_absent() -> None:
    text = (
        "llamacpp:requests_processing 2\n"
        "llamacpp:kv_cache_usage_ratio NaN\n"
        "this line is broken\n"
        "llamacpp:requests_deferred 7\n"
    )
    sample = parse_metrics("llamacpp", text)
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == (2, None, None)


# --- the scraper ----------------------------------------------------------------------


@dataclass
class Target:
    name: str
    engine: str
    metrics_url: str
    load: EngineLoad | None = None
    load_stale: bool = False


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeFetch:
    """url -> text; a url mapped to an exception raises it; every call is recorded."""

    def __init__(self, answers: dict[str, str | Exception]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, url: str) -> str:
        self.calls.append(url)
        answer = self.answers[url]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_scrape_once_updates_loads_and_survives_a_failing_target() -> None:
    vllm = Target("a:8000", "vllm", "http://a/metrics")
    broken = Target("b:8000", "sglang", "http://b/metrics")
    ollama = Target("c:11434", "ollama", "http://c/metrics")
    plain = Target("d:443", "openai", "http://d/metrics")
    fetch = FakeFetch(
        {"http://a/metrics": fixture("vllm_scrape1.txt"), "http://b/metrics": OSError("refused")}
    )
    clock = Clock()
    scraper = SignalScraper([vllm, broken, ollama, plain], fetch, interval_s=1.0, clock=clock)
    assert scraper.targets == [vllm, broken]

    await scraper.scrape_once()
    assert sorted(fetch.calls) == ["http://a/metrics", "http://b/metrics"]  # no ollama/openai
    assert vllm.load is not None
    assert (vllm.load.running, vllm.load.waiting, vllm.load.scraped_at) == (21, 4, 100.0)
    assert vllm.load.ttft_p95_s is None  # one scrape: nothing recent to measure yet
    assert not vllm.load_stale
    assert broken.load is None and broken.load_stale
    assert ollama.load is None and plain.load is None

    clock.now = 101.0
    fetch.answers["http://a/metrics"] = fixture("vllm_scrape2.txt")
    await scraper.scrape_once()
    assert vllm.load is not None
    assert vllm.load.scraped_at == 101.0
    assert vllm.load.ttft_p95_s == pytest.approx(0.5 + 0.25 * 5 / 6)  # delta of two scrapes


async def test_failed_scrape_keeps_the_last_load_but_marks_it_stale() -> None:
    target = Target("a:8000", "tgi", "http://a/metrics")
    fetch = FakeFetch({"http://a/metrics": fixture("tgi.txt")})
    clock = Clock()
    scraper = SignalScraper([target], fetch, interval_s=1.0, clock=clock)
    await scraper.scrape_once()
    good = target.load
    assert good is not None and good.waiting == 4

    clock.now = 200.0
    for failure in (ConnectionResetError(), "<html>502 Bad Gateway</html>"):
        fetch.answers["http://a/metrics"] = failure
        await scraper.scrape_once()
        assert target.load is good
        assert target.load_stale

    fetch.answers["http://a/metrics"] = fixture("tgi.txt")
    await scraper.scrape_once()
    assert target.load is not None and target.load.scraped_at == 200.0
    assert not target.load_stale


async def test_a_hanging_engine_times_out_and_does_not_hold_the_others() -> None:
    slow = Target("a:8000", "llamacpp", "http://a/metrics")
    fast = Target("b:8000", "llamacpp", "http://b/metrics")

    async def fetch(url: str) -> str:
        if url == "http://a/metrics":
            await asyncio.Event().wait()  # never answers
        return fixture("llamacpp.txt")

    scraper = SignalScraper([slow, fast], fetch, interval_s=10.0, timeout_s=0.05)
    await asyncio.wait_for(scraper.scrape_once(), timeout=5)
    assert slow.load is None and slow.load_stale
    assert fast.load is not None and fast.load.running == 2


async def test_start_scrapes_on_the_interval_and_stop_ends_the_task() -> None:
    target = Target("a:8000", "vllm", "http://a/metrics")
    scraped_twice = asyncio.Event()
    calls = 0

    async def fetch(url: str) -> str:
        nonlocal calls
        calls += 1
        if calls >= 2:
            scraped_twice.set()
        return fixture("vllm_scrape1.txt")

    scraper = SignalScraper([target], fetch, interval_s=0.01)
    scraper.start()
    await asyncio.wait_for(scraped_twice.wait(), timeout=5)
    await scraper.stop()
    assert not [task for task in asyncio.all_tasks() if task.get_name() == "signal-scraper"]
    after_stop = calls
    await asyncio.sleep(0.05)
    assert calls == after_stop
    assert target.load is not None
    await scraper.stop()  # a second stop is harmless


async def test_nothing_to_scrape_starts_no_task() -> None:
    scraper = SignalScraper(
        [Target("c:11434", "ollama", "http://c/metrics")], FakeFetch({}), interval_s=0.01
    )
    scraper.start()
    assert not [task for task in asyncio.all_tasks() if task.get_name() == "signal-scraper"]
    await scraper.stop()


async def test_an_engine_with_metrics_added_at_run_time_gets_scraped() -> None:
    ollama = Target("c:11434", "ollama", "http://c/metrics")
    vllm = Target("a:8000", "vllm", "http://a/metrics")
    scraped = asyncio.Event()

    async def fetch(url: str) -> str:
        scraped.set()
        return fixture("vllm_scrape1.txt")

    scraper = SignalScraper([ollama], fetch, interval_s=0.01)
    scraper.start()  # nothing to scrape yet: no task
    scraper.track([ollama, vllm])
    assert scraper.targets == [vllm]
    await asyncio.wait_for(scraped.wait(), timeout=5)
    await scraper.stop()
