"""`aiguillage loadtest`: the federation's traffic on a gateway, TTFT per priority class.

Without `--scenario` it runs the built-in `seeds` profile (interactive users
with a high-priority key amid batch users with a low-priority key). With a
scenario file, the file replaces that profile and any flag given explicitly
still wins over the file, so one file serves several runs. Mistakes end with
one `error:` line and exit code 2; a run in which no request succeeded exits 1
(a wrong key or model should not look like a finished benchmark). The first
Ctrl-C stops the run, writes the results so far and exits 130.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import uvloop
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from aiguillage.loadtest.report import percentile, summary_table, write_reports
from aiguillage.loadtest.runner import LoadRunner, Progress, RunResult
from aiguillage.loadtest.scenario import (
    DEFAULT_URL,
    Scenario,
    ScenarioError,
    UserClass,
    check_target,
    load_scenario,
    seeds_scenario,
)

INTERACTIVE_KEY_ENV = "AIGUILLAGE_LOADTEST_INTERACTIVE_KEY"
BATCH_KEY_ENV = "AIGUILLAGE_LOADTEST_BATCH_KEY"
LIVE_REFRESH_S = 0.5
LINE_EVERY_S = 5.0
TABLE_WIDTH_NOT_TTY = 140


def loadtest(
    url: Annotated[
        str | None,
        typer.Option(
            "--url", help=f"Gateway base URL (default: {DEFAULT_URL}).", show_default=False
        ),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model of every request.")] = None,
    users: Annotated[
        int | None, typer.Option("--users", min=1, help="Peak users (default: 50).")
    ] = None,
    ramp_up: Annotated[
        float | None, typer.Option("--ramp-up", min=0.0, help="Ramp-up seconds (default: 60).")
    ] = None,
    plateau: Annotated[
        float | None, typer.Option("--plateau", min=0.0, help="Plateau seconds (default: 180).")
    ] = None,
    ramp_down: Annotated[
        float | None,
        typer.Option("--ramp-down", min=0.0, help="Ramp-down seconds (default: 60)."),
    ] = None,
    interactive_key: Annotated[
        str | None,
        typer.Option(
            "--interactive-key", envvar=INTERACTIVE_KEY_ENV, help="API key of interactive users."
        ),
    ] = None,
    batch_key: Annotated[
        str | None,
        typer.Option("--batch-key", envvar=BATCH_KEY_ENV, help="API key of batch users."),
    ] = None,
    interactive_share: Annotated[
        float | None,
        typer.Option(
            "--interactive-share",
            min=0.0,
            max=1.0,
            help="Share of interactive users; batch gets the rest (default: 0.2).",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-tokens",
            min=1,
            help="max_tokens of every request (default: interactive 256, batch 512).",
        ),
    ] = None,
    scenario_file: Annotated[
        Path | None,
        typer.Option(
            "--scenario",
            exists=True,
            dir_okay=False,
            help="YAML scenario replacing the seeds profile; flags given still win.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            file_okay=False,
            help="Results directory (default: ./loadtest-<UTC time>).",
            show_default=False,
        ),
    ] = None,
    duration_scale: Annotated[
        float, typer.Option("--duration-scale", help="Multiplies every duration (short runs).")
    ] = 1.0,
    max_requests: Annotated[
        int | None,
        typer.Option("--max-requests", min=1, help="Hard bound on requests (default: 20000)."),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Per-request timeout, s (default: 120).")
    ] = None,
    metrics: Annotated[
        bool, typer.Option("--metrics/--no-metrics", help="Scrape /metrics for queue depth.")
    ] = True,
    allow_remote: Annotated[
        bool,
        typer.Option("--allow-remote", help="Allow a target that is not a loopback address."),
    ] = False,
) -> None:
    """Load-test a gateway with interactive and batch users; report TTFT per class."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # A pipe or a log file has no width: Rich would assume 80 columns and crush the table.
        console = Console(width=TABLE_WIDTH_NOT_TTY)
    try:
        scenario = _scenario(
            scenario_file,
            dict(
                base_url=url,
                model=model,
                users=users,
                ramp_up_s=ramp_up,
                plateau_s=plateau,
                ramp_down_s=ramp_down,
                max_requests=max_requests,
                request_timeout_s=timeout,
            ),
            interactive_key=interactive_key,
            batch_key=batch_key,
            interactive_share=interactive_share,
            max_tokens=max_tokens,
        )
        if not metrics:
            scenario = dataclasses.replace(scenario, scrape_metrics=False)
        scenario = scenario.scaled(duration_scale)
        check_target(scenario.base_url, allow_remote)
    except ScenarioError as error:
        _fail(str(error))
    out_dir = out or Path(f"loadtest-{datetime.now(UTC):%Y%m%d-%H%M%S}")
    console.print(_describe(scenario, out_dir), markup=False, highlight=False, soft_wrap=True)

    result = _run(LoadRunner(scenario, allow_remote=allow_remote), console)
    try:
        rows, paths = write_reports(result, out_dir)
    except OSError as error:
        _fail(f"cannot write the results to {out_dir}: {error}", code=1)
    console.print(summary_table(rows, title=f"{scenario.name}: {result.stop_reason}"))
    for path in paths.all():
        console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
    if not any(record.ok for record in result.requests):
        _fail("no request succeeded: check the URL, the model and the keys", code=1)
    if result.stop_reason == "interrupted":
        raise typer.Exit(130)


def _scenario(
    scenario_file: Path | None,
    overrides: dict[str, Any],
    *,
    interactive_key: str | None,
    batch_key: str | None,
    interactive_share: float | None,
    max_tokens: int | None,
) -> Scenario:
    """The seeds profile or the file, then the flags that were given."""
    given = {key: value for key, value in overrides.items() if value is not None}
    if scenario_file is None:
        if not given.get("model"):
            raise ScenarioError("--model is required (or a --scenario file that names one)")
        if not interactive_key or not batch_key:
            raise ScenarioError(
                f"the seeds scenario needs --interactive-key and --batch-key "
                f"(or ${INTERACTIVE_KEY_ENV} and ${BATCH_KEY_ENV})"
            )
        base = seeds_scenario(
            model=given.pop("model"), interactive_key=interactive_key, batch_key=batch_key
        )
    else:
        base = load_scenario(scenario_file)
    classes = {c.name: c for c in base.classes}
    if max_tokens is not None:
        classes = {n: dataclasses.replace(c, max_tokens=max_tokens) for n, c in classes.items()}
    for name, key in (("interactive", interactive_key), ("batch", batch_key)):
        if key is not None:
            classes[name] = dataclasses.replace(_named(classes, name), api_key=key)
    if interactive_share is not None:
        if set(classes) != {"interactive", "batch"}:
            raise ScenarioError(
                "--interactive-share needs a scenario with exactly the classes "
                "'interactive' and 'batch'"
            )
        classes["interactive"] = dataclasses.replace(
            classes["interactive"], share=interactive_share
        )
        classes["batch"] = dataclasses.replace(
            classes["batch"], share=round(1.0 - interactive_share, 12)
        )
    return dataclasses.replace(base, classes=tuple(classes.values()), **given)


def _named(classes: dict[str, UserClass], name: str) -> UserClass:
    if name not in classes:
        raise ScenarioError(
            f"--{name}-key (or its environment variable) is set but the scenario has no "
            f"class named {name!r}"
        )
    return classes[name]


def _describe(scenario: Scenario, out_dir: Path) -> str:
    counts = ", ".join(f"{n} {name}" for name, n in scenario.class_counts().items())
    return (
        f"loadtest {scenario.name}: {scenario.users} users ({counts}) on {scenario.model} "
        f"at {scenario.base_url}\n"
        f"ramp-up {scenario.ramp_up_s:g} s, plateau {scenario.plateau_s:g} s, "
        f"ramp-down {scenario.ramp_down_s:g} s; at most {scenario.max_requests} requests, "
        f"timeout {scenario.request_timeout_s:g} s; results in {out_dir}"
    )


def _run(runner: LoadRunner, console: Console) -> RunResult:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
        return loop_runner.run(_drive(runner, console))


async def _drive(
    runner: LoadRunner, console: Console, line_every_s: float = LINE_EVERY_S
) -> RunResult:
    """Run while showing progress; the first Ctrl-C ends the run and keeps its results."""
    loop = asyncio.get_running_loop()
    handled = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, runner.request_stop)
        handled = True
    task = asyncio.create_task(runner.run())
    try:
        if console.is_terminal:
            with Live(_panel(runner.progress()), console=console, auto_refresh=False) as live:
                while not task.done():
                    await asyncio.wait({task}, timeout=LIVE_REFRESH_S)
                    live.update(_panel(runner.progress()), refresh=True)
        else:
            last = time.monotonic()
            while not task.done():
                await asyncio.wait({task}, timeout=LIVE_REFRESH_S)
                if time.monotonic() - last >= line_every_s:
                    last = time.monotonic()
                    console.print(
                        _line(runner.progress()), markup=False, highlight=False, soft_wrap=True
                    )
        return await task
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)


def _p95_ttft(progress: Progress) -> dict[str, str]:
    return {
        name: "-" if (p95 := percentile(values, 95)) is None else f"{p95:.3f}s"
        for name, values in progress.recent_ttft_s.items()
    }


def _panel(progress: Progress) -> Panel:
    grid = Table.grid(padding=(0, 3))
    grid.add_row(
        "phase", progress.phase, "elapsed", f"{progress.elapsed_s:.0f} / {progress.total_s:.0f} s"
    )
    grid.add_row(
        "active users",
        f"{progress.active_users} (plan {progress.planned_users})",
        "in flight",
        str(progress.in_flight),
    )
    grid.add_row("requests done", str(progress.done), "errors", str(progress.errors))
    for name, p95 in _p95_ttft(progress).items():
        grid.add_row(f"p95 TTFT {name}", p95, "", "")
    return Panel(grid, title="aiguillage loadtest", expand=False)


def _line(progress: Progress) -> str:
    ttft = " ".join(f"{name}={p95}" for name, p95 in _p95_ttft(progress).items())
    return (
        f"[{progress.elapsed_s:7.1f}s {progress.phase}] users {progress.active_users}"
        f"/{progress.planned_users} in-flight {progress.in_flight} done {progress.done} "
        f"errors {progress.errors} p95 TTFT {ttft}"
    )


def _fail(message: str, code: int = 2) -> NoReturn:
    Console(stderr=True).print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)
