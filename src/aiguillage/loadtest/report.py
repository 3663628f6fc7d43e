"""Turn a run into evidence: a table per class, every request as CSV, a summary, a plot.

Percentiles are over successful requests only; failures are counted apart, so
a burst of fast 429s cannot make the latency look better. Requests the load
generator cut itself (Ctrl-C) are left out of the summaries but kept in the CSV. Throughput is the
class's completion tokens over the span between its first request and its last
answer, which is what the gateway delivered to that class.

matplotlib is imported inside `write_plot` and drives its Agg canvas directly
(no pyplot, no global backend switch): the CLI starts fast, and plotting works
on machines without a display.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from aiguillage.loadtest.runner import RequestRecord, RunResult

CSV_COLUMNS = (
    *(f.name for f in dataclasses.fields(RequestRecord)),
    "end_s",
    "ok",
)
ALL = "all"


@dataclass(frozen=True)
class ClassSummary:
    """One row of the report; the row named `all` covers every class."""

    name: str
    priority: str
    users: int
    requests: int
    errors: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    queue_ms_p50: float | None
    queue_ms_p95: float | None
    completion_tokens: int
    tokens_per_s: float | None


@dataclass(frozen=True)
class OutputPaths:
    requests_csv: Path
    summary_json: Path
    summary_md: Path
    plot_png: Path

    def all(self) -> list[Path]:
        return [self.requests_csv, self.summary_json, self.summary_md, self.plot_png]


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between ranks; None if empty.

    Same definition as numpy's default, so numbers match other tools' reports.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile out of range: {q}")
    data = sorted(values)
    if not data:
        return None
    rank = (len(data) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def summarize(result: RunResult) -> list[ClassSummary]:
    """One summary per class in scenario order, then one for all requests."""
    users = {c.name: 0 for c in result.scenario.classes}
    for trace in result.users:
        if trace.joined_s is not None:
            users[trace.class_name] += 1
    measured = [r for r in result.requests if not r.cut]
    rows = []
    for user_class in result.scenario.classes:
        records = [r for r in measured if r.class_name == user_class.name]
        rows.append(
            _summary(user_class.name, user_class.priority_label, users[user_class.name], records)
        )
    rows.append(_summary(ALL, "", sum(users.values()), measured))
    return rows


def _summary(
    name: str, priority: str, users: int, records: Sequence[RequestRecord]
) -> ClassSummary:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    latency = [r.latency_s for r in ok if r.latency_s is not None]
    queue = [r.queue_ms for r in ok if r.queue_ms is not None]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    ends = [end for r in records if (end := r.end_s) is not None]
    span = max(ends) - min(r.start_s for r in records) if ends else 0.0
    return ClassSummary(
        name=name,
        priority=priority,
        users=users,
        requests=len(records),
        errors=len(records) - len(ok),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p95_s=percentile(ttft, 95),
        ttft_p99_s=percentile(ttft, 99),
        latency_p50_s=percentile(latency, 50),
        latency_p95_s=percentile(latency, 95),
        latency_p99_s=percentile(latency, 99),
        queue_ms_p50=percentile(queue, 50),
        queue_ms_p95=percentile(queue, 95),
        completion_tokens=tokens,
        tokens_per_s=tokens / span if tokens and span > 0 else None,
    )


def write_csv(result: RunResult, path: Path) -> None:
    """Every request, one row each, in the order they were sent; empty cells for None."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for record in sorted(result.requests, key=lambda r: r.start_s):
            row = [*dataclasses.astuple(record), record.end_s, record.ok]
            writer.writerow(["" if value is None else _cell(value) for value in row])


def write_summary_json(result: RunResult, rows: Sequence[ClassSummary], path: Path) -> None:
    data = {
        "scenario": result.scenario.redacted(),
        "started_at": result.started_at.isoformat(),
        "duration_s": round(result.duration_s, 3),
        "stop_reason": result.stop_reason,
        "requests": len(result.requests),
        "cut_requests": sum(1 for r in result.requests if r.cut),
        "peak_active_users": max((s.active_users for s in result.samples), default=0),
        "peak_queue_depth": _peak_queue_depth(result),
        "classes": [dataclasses.asdict(row) for row in rows],
    }
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def write_summary_md(result: RunResult, rows: Sequence[ClassSummary], path: Path) -> None:
    s = result.scenario
    lines = [
        f"# Load test `{s.name}`: {s.users} users on {s.model}",
        "",
        f"- target: {s.base_url}",
        f"- started: {result.started_at.isoformat(timespec='seconds')}, "
        f"ran {result.duration_s:.1f} s ({result.stop_reason})",
        f"- shape: ramp-up {s.ramp_up_s:g} s, plateau {s.plateau_s:g} s, "
        f"ramp-down {s.ramp_down_s:g} s, at most {s.max_requests} requests",
        f"- peak queue depth: {_fmt(_peak_queue_depth(result), '{:g}')}",
        "",
        "| " + " | ".join(_HEADERS) + " |",
        "|" + "---|" * len(_HEADERS),
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def summary_table(rows: Sequence[ClassSummary], title: str = "Load test") -> Table:
    table = Table(*_HEADERS, title=title)
    for row in rows:
        table.add_row(*_cells(row), style="bold" if row.name == ALL else None)
    return table


def write_reports(result: RunResult, out_dir: Path) -> tuple[list[ClassSummary], OutputPaths]:
    """All four files in `out_dir` (created if needed); returns the rows and the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = OutputPaths(
        out_dir / "requests.csv",
        out_dir / "summary.json",
        out_dir / "summary.md",
        out_dir / "plot.png",
    )
    rows = summarize(result)
    write_csv(result, paths.requests_csv)
    write_summary_json(result, rows, paths.summary_json)
    write_summary_md(result, rows, paths.summary_md)
    write_plot(result, paths.plot_png)
    return rows, paths


def write_plot(result: RunResult, path: Path) -> None:
    """Three stacked panels on one time axis: users, TTFT per class, gateway queue depth."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 9), layout="constrained")
    FigureCanvasAgg(figure)
    users_ax, ttft_ax, queue_ax = figure.subplots(3, 1, sharex=True)
    s = result.scenario
    figure.suptitle(f"{s.name}: {s.users} users, {s.model} at {s.base_url}")
    times = [x.t_s for x in result.samples]

    users_ax.step(
        times,
        [x.planned_users for x in result.samples],
        where="post",
        linestyle="--",
        color="grey",
        label="planned users",
    )
    users_ax.step(
        times, [x.active_users for x in result.samples], where="post", label="active users"
    )
    users_ax.plot(
        times, [x.in_flight for x in result.samples], alpha=0.7, label="requests in flight"
    )
    users_ax.set_ylabel("users")
    users_ax.legend(loc="upper right")

    _plot_ttft(ttft_ax, result)

    depth = [(x.t_s, x.queue_depth) for x in result.samples if x.queue_depth is not None]
    if depth:
        queue_ax.step([t for t, _ in depth], [d for _, d in depth], where="post")
    else:
        queue_ax.text(
            0.5,
            0.5,
            f"no queue depth: {_QUEUE_METRIC} not found at /metrics",
            ha="center",
            va="center",
            transform=queue_ax.transAxes,
        )
    queue_ax.set_ylabel("queue depth")
    for ax in (users_ax, ttft_ax, queue_ax):
        ax.set_ylim(bottom=0)
    queue_ax.set_xlabel("seconds since start")

    for ax in (users_ax, ttft_ax, queue_ax):
        for boundary in (s.ramp_up_s, s.ramp_up_s + s.plateau_s, s.total_s):
            ax.axvline(boundary, color="lightgrey", linewidth=0.8, zorder=0)
    figure.savefig(path, format="png", dpi=100)


def _plot_ttft(ax: Any, result: RunResult) -> None:
    """Each successful request's TTFT at its send time, with a rolling p95 line per class."""
    width = max(result.scenario.total_s / 40.0, result.scenario.sample_interval_s)
    for user_class in result.scenario.classes:
        points = [
            (r.start_s, r.ttft_s)
            for r in result.requests
            if r.class_name == user_class.name and r.ok and r.ttft_s is not None
        ]
        if not points:
            continue
        dots = ax.scatter(
            [t for t, _ in points],
            [v for _, v in points],
            s=6,
            alpha=0.35,
            label=f"{user_class.name} ({user_class.priority_label or 'n/a'})",
        )
        bins: dict[int, list[float]] = {}
        for t, value in points:
            bins.setdefault(int(t // width), []).append(value)
        line = sorted((k, percentile(v, 95)) for k, v in bins.items() if len(v) >= 3)
        if line:
            ax.plot(
                [(k + 0.5) * width for k, _ in line],
                [v for _, v in line],
                color=dots.get_facecolor()[0],
                alpha=1.0,
                linewidth=1.5,
                label=f"{user_class.name} p95",
            )
    failed = [r.start_s for r in result.requests if not r.ok]
    if failed:
        ax.scatter(failed, [0.0] * len(failed), marker="x", color="red", s=12, label="errors")
    ax.set_ylabel("TTFT (s)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")


_QUEUE_METRIC = "aiguillage_queue_depth"
_HEADERS = (
    "class",
    "prio",
    "users",
    "requests",
    "errors",
    "TTFT p50",
    "TTFT p95",
    "TTFT p99",
    "lat p50",
    "lat p95",
    "lat p99",
    "queue p95 ms",
    "tok/s",
)


def _cells(row: ClassSummary) -> list[str]:
    seconds = "{:.3f}"
    return [
        row.name,
        row.priority or "-",
        str(row.users),
        str(row.requests),
        str(row.errors),
        _fmt(row.ttft_p50_s, seconds),
        _fmt(row.ttft_p95_s, seconds),
        _fmt(row.ttft_p99_s, seconds),
        _fmt(row.latency_p50_s, seconds),
        _fmt(row.latency_p95_s, seconds),
        _fmt(row.latency_p99_s, seconds),
        _fmt(row.queue_ms_p95, "{:.1f}"),
        _fmt(row.tokens_per_s, "{:.1f}"),
    ]


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _cell(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _peak_queue_depth(result: RunResult) -> float | None:
    depths = [x.queue_depth for x in result.samples if x.queue_depth is not None]
    return max(depths) if depths else None
