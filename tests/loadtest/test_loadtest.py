"""`aiguillage loadtest` against a tiny fake gateway on 127.0.0.1.

The fake streams a few chunks per answer, a usage chunk when asked, and the
gateway's queue-time and backend headers; it logs each request with its
arrival and end on the monotonic clock, so the closed-loop property is checked
from the server's side too, not only from the runner's own records.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import itertools
import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
from aiohttp import web
from rich.console import Console
from typer.testing import CliRunner

from aiguillage.cli.loadtest import _drive, loadtest
from aiguillage.loadtest.report import (
    CSV_COLUMNS,
    percentile,
    summarize,
    write_reports,
)
from aiguillage.loadtest.runner import (
    LoadRunner,
    RequestRecord,
    RunResult,
    UserTrace,
    parse_gauge_sum,
)
from aiguillage.loadtest.scenario import (
    RemoteTargetError,
    Scenario,
    ScenarioError,
    UserClass,
    check_target,
    load_scenario,
    seeds_scenario,
)

pytestmark = pytest.mark.timeout(30)

INTERACTIVE_KEY = "key-interactive-0123456789abcdef"
BATCH_KEY = "key-batch-0123456789abcdef"
BAD_KEY = "key-refused"
CHUNKS = 3
CHUNK_DELAY_S = 0.03
METRICS_TEXT = """# HELP aiguillage_queue_depth Requests waiting for a backend.
# TYPE aiguillage_queue_depth gauge
aiguillage_queue_depth{model="m",priority="10"} 2.0
aiguillage_queue_depth{model="m",priority="0"} 3.0
aiguillage_queue_depth_something_else 100
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass
class Seen:
    key: str
    user_id: int
    seq: int
    body: dict[str, Any]
    arrived: float
    finished: float | None = None


class FakeGateway:
    """An OpenAI-compatible streaming server on its own thread and loop."""

    def __init__(self, *, gateway_headers: bool = True, metrics: bool = True) -> None:
        self.gateway_headers = gateway_headers
        self.metrics = metrics
        self.seen: list[Seen] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._ready = threading.Event()

    def start(self) -> FakeGateway:
        self._thread.start()
        assert self._ready.wait(5), "the fake gateway did not start"
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _main(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self.metrics:
            raise web.HTTPNotFound()
        return web.Response(text=METRICS_TEXT, content_type="text/plain")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        body = await request.json()
        tag = re.match(r"\[user (\d+) request (\d+)\]", body["messages"][-1]["content"])
        assert tag is not None
        seen = Seen(key, int(tag[1]), int(tag[2]), body, arrived)
        self.seen.append(seen)
        if key == BAD_KEY:
            seen.finished = time.monotonic()
            return web.json_response({"error": {"message": "invalid API key"}}, status=401)
        headers = (
            {"x-aiguillage-queue-ms": "12.5", "x-aiguillage-backend": "fake-a"}
            if self.gateway_headers
            else {}
        )
        usage = {"prompt_tokens": 9, "completion_tokens": CHUNKS, "total_tokens": 9 + CHUNKS}
        if not body.get("stream"):
            await asyncio.sleep(CHUNK_DELAY_S * CHUNKS)
            answer = {"choices": [{"message": {"content": "tok " * CHUNKS}}], "usage": usage}
            seen.finished = time.monotonic()
            return web.json_response(answer, headers=headers)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await response.prepare(request)
        await response.write(_event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
        for i in range(CHUNKS):
            await asyncio.sleep(CHUNK_DELAY_S)
            await response.write(_event({"choices": [{"delta": {"content": f"tok{i} "}}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(_event({"choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        seen.finished = time.monotonic()
        return response


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _classes(interactive_share: float = 1 / 3) -> tuple[UserClass, ...]:
    return (
        UserClass(
            "interactive",
            INTERACTIVE_KEY,
            interactive_share,
            "high",
            max_tokens=16,
            prompt_words=10,
            shared_prefix_words=20,
            think_time_s=0.05,
        ),
        UserClass("batch", BATCH_KEY, 1 - interactive_share, "low", max_tokens=32, prompt_words=40),
    )


def _scenario(url: str, **changes: Any) -> Scenario:
    fields: dict[str, Any] = dict(
        base_url=url,
        model="fake-model",
        users=6,
        ramp_up_s=1.0,
        plateau_s=1.0,
        ramp_down_s=1.0,
        classes=_classes(),
        request_timeout_s=5.0,
        sample_interval_s=0.1,
        error_backoff_s=0.2,
    )
    fields.update(changes)
    return Scenario(**fields)


@dataclasses.dataclass
class Run:
    result: RunResult
    seen: list[Seen]


@pytest.fixture(scope="module")
def main_run() -> Iterator[Run]:
    """The short scenario of the brief: 6 users, 1 s ramp-up, 1 s plateau, 1 s ramp-down."""
    server = FakeGateway().start()
    try:
        result = asyncio.run(LoadRunner(_scenario(server.url)).run())
    finally:
        server.stop()
    yield Run(result, server.seen)


@pytest.fixture(scope="module")
def gateway() -> Iterator[FakeGateway]:
    server = FakeGateway().start()
    yield server
    server.stop()


# -- plan ----------------------------------------------------------------------


def test_plan_ramps_up_in_order_and_leaves_in_reverse() -> None:
    scenario = _scenario("http://127.0.0.1:1")
    plan = scenario.plan()
    assert [p.start_s for p in plan] == pytest.approx([i / 6 for i in range(6)])
    leaves = [p.leave_s for p in plan]
    assert leaves == sorted(leaves, reverse=True)  # last in, first out
    assert leaves[0] == pytest.approx(3.0) and leaves[-1] == pytest.approx(2.0 + 1 / 6)
    times = (0.0, 0.4, 0.5, 1.0, 1.9, 2.5, 3.0)
    expected = (1, 3, 4, 6, 6, 3, 0)  # 0.5 s is user 3's own start: it counts
    assert tuple(scenario.planned_active(t) for t in times) == expected
    assert scenario.class_counts() == {"interactive": 2, "batch": 4}


def test_shares_become_whole_users_spread_along_the_ramp() -> None:
    scenario = seeds_scenario(model="m", interactive_key="a", batch_key="b", users=50)
    plan = scenario.plan()
    assert scenario.class_counts() == {"interactive": 10, "batch": 40}
    interactive = [p.user_id for p in plan if p.user_class.name == "interactive"]
    assert len(interactive) == 10
    # One interactive user in every block of five along the ramp, not all at one end.
    assert [i // 5 for i in interactive] == list(range(10))


def test_scaled_multiplies_durations_but_not_the_timeout() -> None:
    scenario = _scenario("http://127.0.0.1:1", sample_interval_s=1.0).scaled(0.5)
    assert (scenario.ramp_up_s, scenario.plateau_s, scenario.ramp_down_s) == (0.5, 0.5, 0.5)
    assert scenario.classes[0].think_time_s == pytest.approx(0.025)
    assert scenario.request_timeout_s == 5.0
    assert scenario.sample_interval_s == 0.5
    with pytest.raises(ScenarioError):
        scenario.scaled(0)


# -- the run ---------------------------------------------------------------------


def test_active_users_follow_the_ramp_and_never_exceed_the_plan(main_run: Run) -> None:
    result = main_run.result
    plan = result.scenario.plan()
    lag = 0.3  # how late a user may join after its planned time on a busy machine
    assert len(result.samples) >= 25
    for sample in result.samples:
        planned = sum(1 for p in plan if p.start_s <= sample.t_s < p.leave_s)
        late_ok = sum(1 for p in plan if p.start_s + lag <= sample.t_s < p.leave_s)
        assert sample.planned_users == planned
        assert late_ok <= sample.active_users <= planned, sample
        # A closed loop: never more requests open than users still in the system.
        assert sample.in_flight <= sample.active_users + sample.draining_users
    assert max(s.active_users for s in result.samples) == 6
    assert result.samples[-1].active_users == 0
    assert result.samples[-1].in_flight == 0
    for trace, user in zip(result.users, plan, strict=True):
        assert trace.joined_s is not None and trace.finished_s is not None
        assert user.start_s <= trace.joined_s < user.start_s + lag
        assert user.leave_s <= trace.finished_s < user.leave_s + 0.5  # finishes its last answer


def test_each_user_sends_one_request_at_a_time(main_run: Run) -> None:
    by_user: dict[int, list[RequestRecord]] = defaultdict(list)
    for record in main_run.result.requests:
        by_user[record.user_id].append(record)
    assert sorted(by_user) == list(range(6))
    for records in by_user.values():
        records.sort(key=lambda r: r.seq)
        assert [r.seq for r in records] == list(range(len(records)))
        for before, after in itertools.pairwise(records):
            assert before.end_s is not None and after.start_s >= before.end_s
    # The server saw the same: a user's next request arrives after its previous answer ended.
    served: dict[int, list[Seen]] = defaultdict(list)
    for seen in main_run.seen:
        served[seen.user_id].append(seen)
    assert len(main_run.seen) == len(main_run.result.requests)
    for seen_list in served.values():
        seen_list.sort(key=lambda s: s.seq)
        for earlier, later in itertools.pairwise(seen_list):
            assert earlier.finished is not None and later.arrived >= earlier.finished


def test_no_request_starts_after_its_user_left(main_run: Run) -> None:
    leave = {p.user_id: p.leave_s for p in main_run.result.scenario.plan()}
    join = {t.user_id: t.joined_s for t in main_run.result.users}
    for record in main_run.result.requests:
        joined = join[record.user_id]
        assert joined is not None and joined <= record.start_s < leave[record.user_id]
    assert main_run.result.stop_reason == "completed"


def test_class_shares_and_keys(main_run: Run) -> None:
    users = defaultdict(set)
    for record in main_run.result.requests:
        users[record.class_name].add(record.user_id)
    assert {name: len(ids) for name, ids in users.items()} == {"interactive": 2, "batch": 4}
    keys = {"interactive": INTERACTIVE_KEY, "batch": BATCH_KEY}
    user_class = {r.user_id: r.class_name for r in main_run.result.requests}
    for seen in main_run.seen:
        assert seen.key == keys[user_class[seen.user_id]]
        assert seen.body["model"] == "fake-model"
        assert seen.body["stream"] is True
        assert seen.body["stream_options"] == {"include_usage": True}
        expected_max = 16 if user_class[seen.user_id] == "interactive" else 32
        assert seen.body["max_tokens"] == expected_max
        has_system = seen.body["messages"][0]["role"] == "system"
        assert has_system == (user_class[seen.user_id] == "interactive")


def test_records_carry_ttft_usage_and_gateway_headers(main_run: Run) -> None:
    for record in main_run.result.requests:
        assert record.ok, record
        assert record.status == 200
        assert record.completion_tokens == CHUNKS and record.prompt_tokens == 9
        assert record.content_chunks == CHUNKS
        assert record.queue_ms == 12.5 and record.backend == "fake-a"
        assert record.ttft_s is not None and record.latency_s is not None
        assert CHUNK_DELAY_S * 0.9 <= record.ttft_s < record.latency_s


def test_queue_depth_is_summed_from_metrics(main_run: Run) -> None:
    assert main_run.result.metrics_available
    depths = {s.queue_depth for s in main_run.result.samples[:-1]}
    assert depths == {5.0}


def test_reports_csv_png_and_summaries(main_run: Run, tmp_path: Path) -> None:
    rows, paths = write_reports(main_run.result, tmp_path / "out")
    with paths.requests_csv.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        lines = list(reader)
    assert tuple(header) == CSV_COLUMNS
    assert {
        "class_name",
        "user_id",
        "start_s",
        "ttft_s",
        "latency_s",
        "completion_tokens",
        "status",
        "error",
        "queue_ms",
        "backend",
    } <= set(header)
    assert len(lines) == len(main_run.result.requests)
    first = dict(zip(header, lines[0], strict=True))
    assert first["status"] == "200" and first["error"] == "" and first["backend"] == "fake-a"
    assert paths.plot_png.read_bytes()[:8] == PNG_MAGIC
    summary = json.loads(paths.summary_json.read_text())
    assert summary["requests"] == len(main_run.result.requests)
    assert summary["peak_queue_depth"] == 5.0
    assert [c["name"] for c in summary["classes"]] == ["interactive", "batch", "all"]
    assert summary["classes"][-1]["requests"] == sum(r.requests for r in rows[:-1])
    for path in paths.all():  # keys never reach the result files
        assert INTERACTIVE_KEY not in path.read_bytes().decode("latin-1")
    assert "| interactive | high |" in paths.summary_md.read_text()


async def test_max_requests_bounds_the_run(gateway: FakeGateway) -> None:
    scenario = _scenario(gateway.url, ramp_up_s=0.0, plateau_s=5.0, ramp_down_s=0.0, max_requests=7)
    started = time.monotonic()
    result = await LoadRunner(scenario).run()
    assert len(result.requests) == 7
    assert result.stop_reason == "max_requests"
    assert time.monotonic() - started < 2.0  # it did not sit out the 5 s plateau


async def test_failures_are_recorded_with_backoff(gateway: FakeGateway) -> None:
    refused = UserClass("refused", BAD_KEY, 1.0, "low", prompt_words=3)
    scenario = _scenario(
        gateway.url,
        users=1,
        ramp_up_s=0.0,
        plateau_s=0.5,
        ramp_down_s=0.0,
        classes=(refused,),
        error_backoff_s=0.2,
    )
    result = await LoadRunner(scenario).run()
    assert 2 <= len(result.requests) <= 3  # one try per 0.2 s back-off, not a hot loop
    for record in result.requests:
        assert record.status == 401 and not record.ok
        assert record.error is not None and "invalid API key" in record.error
    row, _ = summarize(result)
    assert row.errors == len(result.requests) and row.ttft_p50_s is None


async def test_plain_backend_without_metrics_or_streaming() -> None:
    server = FakeGateway(gateway_headers=False, metrics=False).start()
    try:
        plain = UserClass("plain", BATCH_KEY, 1.0, stream=False, prompt_words=5)
        scenario = _scenario(
            server.url, users=2, ramp_up_s=0.1, plateau_s=0.3, ramp_down_s=0.1, classes=(plain,)
        )
        result = await LoadRunner(scenario).run()
    finally:
        server.stop()
    assert result.requests and all(r.ok for r in result.requests)
    assert all(s.queue_depth is None for s in result.samples)
    assert not result.metrics_available
    for record in result.requests:
        assert record.queue_ms is None and record.backend is None
        assert record.ttft_s is not None and record.ttft_s <= (record.latency_s or 0)
        assert record.completion_tokens == CHUNKS
    assert all("stream_options" not in s.body for s in server.seen)


# -- statistics --------------------------------------------------------------------


def test_percentile_on_known_data() -> None:
    data = [50.0, 15.0, 40.0, 35.0, 20.0]  # unsorted on purpose
    assert percentile(data, 0) == 15.0
    assert percentile(data, 50) == 35.0
    assert percentile(data, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert percentile(data, 95) == pytest.approx(48.0)  # rank 3.8: 40 + 0.8 * 10
    assert percentile(data, 100) == 50.0
    assert percentile(range(1, 101), 99) == pytest.approx(99.01)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(data, 101)


def test_percentile_matches_numpy() -> None:
    numpy = pytest.importorskip("numpy")
    values = [((i * 7919) % 1009) / 13.0 for i in range(257)]
    for q in (1, 50, 90, 95, 99):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))


def test_summary_from_known_records() -> None:
    scenario = _scenario("http://127.0.0.1:1")
    records = [
        RequestRecord(
            "interactive",
            "high",
            0,
            i,
            float(i),
            ttft_s=t,
            latency_s=2 * t,
            completion_tokens=10,
            status=200,
        )
        for i, t in enumerate([0.1, 0.2, 0.3, 0.4, 0.5])
    ] + [RequestRecord("batch", "low", 1, 0, 0.0, latency_s=0.01, status=503, error="busy")]
    traces = [UserTrace(0, "interactive", 0, 9, joined_s=0.0), UserTrace(1, "batch", 0, 9, 0.0)]
    result = RunResult(scenario, datetime.now(UTC), 5.0, records, [], traces, "completed")
    interactive, batch, everything = summarize(result)
    assert (interactive.requests, interactive.errors, interactive.users) == (5, 0, 1)
    assert interactive.ttft_p50_s == pytest.approx(0.3)
    assert interactive.ttft_p95_s == pytest.approx(0.48)
    assert interactive.latency_p99_s == pytest.approx(0.992)
    assert interactive.tokens_per_s == pytest.approx(50 / 5.0)  # first start 0, last end 5.0
    assert (batch.requests, batch.errors, batch.ttft_p95_s) == (1, 1, None)
    assert (everything.requests, everything.errors, everything.users) == (6, 1, 2)


def test_gauge_parsing() -> None:
    assert parse_gauge_sum(METRICS_TEXT, "aiguillage_queue_depth") == 5.0
    assert parse_gauge_sum("aiguillage_queue_depth 4 1712345678\n", "aiguillage_queue_depth") == 4
    assert parse_gauge_sum("other_metric 3\n", "aiguillage_queue_depth") is None


# -- safety, files, command line ----------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5:8000",
        "https://api.example.org",
        "http://0.0.0.0:8000",
        "http://127.0.0.1@example.org/",
        "http://[::ffff:10.0.0.1]:80",
        "http://localhost.evil.org",
    ],
)
def test_non_loopback_targets_are_refused(url: str) -> None:
    with pytest.raises(RemoteTargetError):
        check_target(url)
    with pytest.raises(RemoteTargetError):
        LoadRunner(_scenario(url))
    check_target(url, allow_remote=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://127.9.8.7",
        "http://localhost:1",
        "http://LOCALHOST",
        "http://[::1]:8000/v1",
        "http://[::ffff:127.0.0.1]:80",
    ],
)
def test_loopback_targets_are_accepted(url: str) -> None:
    check_target(url)


def test_chat_and_metrics_urls_accept_openai_style_base() -> None:
    scenario = _scenario("http://127.0.0.1:8000/v1/")
    assert scenario.chat_url == "http://127.0.0.1:8000/v1/chat/completions"
    assert scenario.metrics_url == "http://127.0.0.1:8000/metrics"


def test_scenario_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOADTEST_KEY_B", "from-env")
    path = tmp_path / "night.yaml"
    path.write_text(
        "model: m\nusers: 10\nramp_up_s: 5\nplateau_s: 10\nramp_down_s: 5\n"
        "classes:\n"
        "  - {name: interactive, api_key: a, share: 0.3, priority_label: high, stream: false}\n"
        "  - {name: batch, api_key_env: LOADTEST_KEY_B, share: 0.7, think_time_s: 2}\n"
    )
    scenario = load_scenario(path)
    assert scenario.name == "night" and scenario.base_url == "http://127.0.0.1:8000"
    assert scenario.class_counts() == {"interactive": 3, "batch": 7}
    assert scenario.classes[1].api_key == "from-env" and scenario.classes[1].think_time_s == 2
    path.write_text(path.read_text().replace("users: 10", "userz: 10"))
    with pytest.raises(ScenarioError, match="userz"):
        load_scenario(path)


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(loadtest)
    return app


def test_cli_refuses_a_remote_url(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        _cli(),
        [
            "--url",
            "http://192.0.2.10:8000",
            "--model",
            "m",
            "--interactive-key",
            "a",
            "--batch-key",
            "b",
            "--out",
            str(tmp_path / "never"),
        ],
    )
    assert result.exit_code == 2
    assert "not a loopback address" in result.output and "--allow-remote" in result.output
    assert not (tmp_path / "never").exists()


def test_cli_seeds_run_end_to_end(gateway: FakeGateway, tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = CliRunner().invoke(
        _cli(),
        [
            "--url",
            gateway.url,
            "--model",
            "fake-model",
            "--users",
            "5",
            "--ramp-up",
            "2",
            "--plateau",
            "2",
            "--ramp-down",
            "2",
            "--duration-scale",
            "0.2",
            "--interactive-key",
            INTERACTIVE_KEY,
            "--batch-key",
            BATCH_KEY,
            "--interactive-share",
            "0.4",
            "--max-tokens",
            "8",
            "--max-requests",
            "500",
            "--timeout",
            "5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("requests.csv", "summary.json", "plot.png", "summary.md"):
        assert (out / name).is_file()
        assert f"wrote {out / name}" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["name"] == "seeds" and summary["scenario"]["users"] == 5
    assert summary["scenario"]["ramp_up_s"] == pytest.approx(0.4)
    assert {c["name"]: c["users"] for c in summary["classes"]} == {
        "interactive": 2,
        "batch": 3,
        "all": 5,
    }
    assert summary["classes"][-1]["errors"] == 0
    assert INTERACTIVE_KEY not in result.output


def test_cli_scenario_file_with_overrides(gateway: FakeGateway, tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"base_url: {gateway.url}\nmodel: fake-model\nusers: 9\nramp_up_s: 0.2\nplateau_s: 0.2\n"
        "ramp_down_s: 0.2\nmax_requests: 3\nsample_interval_s: 0.1\n"
        "classes:\n  - {name: batch, api_key: old-key, share: 1.0, prompt_words: 2}\n"
    )
    result = CliRunner().invoke(
        _cli(),
        [
            "--scenario",
            str(path),
            "--users",
            "2",
            "--batch-key",
            BATCH_KEY,
            "--no-metrics",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["scenario"]["users"] == 2 and summary["requests"] == 3
    assert summary["stop_reason"] == "max_requests"
    assert summary["peak_queue_depth"] is None
    refused = CliRunner().invoke(_cli(), ["--scenario", str(path), "--interactive-key", "x"])
    assert refused.exit_code == 2 and "no class named 'interactive'" in refused.output


async def test_stop_request_ends_the_run_and_keeps_the_records(gateway: FakeGateway) -> None:
    scenario = _scenario(gateway.url, ramp_up_s=0.0, plateau_s=10.0, ramp_down_s=0.0)
    runner = LoadRunner(scenario)
    asyncio.get_running_loop().call_later(0.3, runner.request_stop)
    result = await runner.run()
    assert result.stop_reason == "interrupted" and result.duration_s < 1.5
    assert result.requests and all(r.latency_s is not None for r in result.requests)
    cut = [r for r in result.requests if not r.ok]
    assert len(cut) <= scenario.users
    assert all(r.cut and r.error == "cancelled before the answer ended" for r in cut)
    everything = summarize(result)[-1]
    assert everything.errors == 0 and everything.requests == len(result.requests) - len(cut)


async def test_live_panel_on_a_terminal(gateway: FakeGateway) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    scenario = _scenario(gateway.url, users=2, ramp_up_s=0.1, plateau_s=0.5, ramp_down_s=0.1)
    result = await _drive(LoadRunner(scenario), console)
    assert result.requests
    shown = buffer.getvalue()
    assert "aiguillage loadtest" in shown and "p95 TTFT interactive" in shown
    assert "active users" in shown


async def test_progress_lines_when_not_a_terminal(gateway: FakeGateway) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    scenario = _scenario(gateway.url, users=2, ramp_up_s=0.1, plateau_s=0.6, ramp_down_s=0.1)
    await _drive(LoadRunner(scenario), console, line_every_s=0.25)
    lines = [line for line in buffer.getvalue().splitlines() if "in-flight" in line]
    assert len(lines) >= 2
    assert "interactive=" in lines[-1] and "errors 0" in lines[-1]
