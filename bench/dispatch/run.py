"""The dispatcher's measurements, each in one run, side by side.

    .venv/bin/python bench/dispatch/run.py ramp        # (a) priorities vs FIFO, emulated
    .venv/bin/python bench/dispatch/run.py slow        # (b) least-busy vs round-robin, 2x slower
    .venv/bin/python bench/dispatch/run.py prefix      # (c) prefix-affinity, llama.cpp
    .venv/bin/python bench/dispatch/run.py llama-ramp  # (d) a shortened ramp on llama.cpp
    .venv/bin/python bench/dispatch/run.py all

Every process listens on 127.0.0.1 and stops at the end; every load is bounded in time
and count. Results go to bench/out/dispatch-<experiment>-<time>/ and a markdown summary
is printed (copied into bench/RESULTS.md by hand, with the date and machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from aiguillage.backends.local_engine import LlamaCppServer, free_port

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
OUT = ROOT / "bench" / "out"


@dataclass
class Stack:
    """A gateway (and its keys) in front of some engines."""

    url: str
    keys: dict[str, str]
    workdir: Path


def _wait_http(url: str, process: subprocess.Popen[bytes] | None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout_s} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def emulated_engines(
    count: int, *, slowdown: list[float] | None = None, max_num_seqs: int = 4, max_tokens: int = 64
) -> Iterator[list[str]]:
    args = [
        PYTHON,
        "-m",
        "aiguillage.emulator",
        "--engines",
        str(count),
        "--base-port",
        "0",
        "--max-num-seqs",
        str(max_num_seqs),
        "--max-tokens",
        str(max_tokens),
    ]
    if slowdown:
        args += ["--slowdown", ",".join(str(s) for s in slowdown)]
    # the emulator picks free ports itself (--base-port 0) and prints its URLs
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"aiguillage-emulator-{os.getpid()}.log"
    process = subprocess.Popen(
        args,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    urls: list[str] = []
    deadline = time.monotonic() + 30
    while len(urls) < count and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        urls = [w for w in log.read_text().split() if w.startswith("http://127.0.0.1:")]
    if len(urls) < count:
        _stop(process)
        raise RuntimeError(f"the emulator did not print its URLs (see {log})")
    try:
        for url in urls:
            _wait_http(f"{url}/health", process)
        yield urls
    finally:
        _stop(process)


@contextlib.contextmanager
def llama_engines(
    count: int, workdir: Path, extra_args: tuple[str, ...] = ()
) -> Iterator[list[str]]:
    servers = [
        LlamaCppServer(
            parallel=2, threads=1, log_file=workdir / f"llama-{i}.log", extra_args=extra_args
        )
        for i in range(count)
    ]
    try:
        for server in servers:
            server.start()
        yield [server.url for server in servers]
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def gateway(
    workdir: Path, model: dict[str, Any], keys: dict[str, dict[str, Any]]
) -> Iterator[Stack]:
    workdir.mkdir(parents=True, exist_ok=True)
    database = f"sqlite+aiosqlite:///{workdir / 'gateway.db'}"
    config = workdir / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": database,
                "health_interval_s": 2,
                "signals_interval_s": 1,
                "models": [model],
            }
        )
    )
    secrets = {}
    for name, options in keys.items():
        args = [
            PYTHON,
            "-m",
            "aiguillage.cli",
            "keys",
            "create",
            "--name",
            name,
            "--org",
            options.get("org", name),
            "--priority",
            str(options.get("priority", 0)),
            "--threshold",
            str(options.get("threshold", 1000)),
            "--json",
            "--database-url",
            database,
        ]
        created = subprocess.run(args, check=True, capture_output=True)
        secrets[name] = json.loads(created.stdout)["key"]
    port = free_port()
    process = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "aiguillage.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=(workdir / "gateway.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/readyz", process)
        yield Stack(url, secrets, workdir)
    finally:
        _stop(process)


def loadtest(
    stack: Stack,
    out: Path,
    *,
    model: str,
    users: int,
    ramp_up: float,
    plateau: float,
    ramp_down: float,
    classes: list[dict[str, Any]],
) -> dict[str, Any]:
    """Run `aiguillage loadtest` on a scenario file and return its summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    scenario = {
        "base_url": stack.url,
        "model": model,
        "users": users,
        "ramp_up_s": ramp_up,
        "plateau_s": plateau,
        "ramp_down_s": ramp_down,
        "request_timeout_s": 300,
        "max_requests": 50_000,
        "classes": classes,
    }
    path = out / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    subprocess.run(
        [PYTHON, "-m", "aiguillage.cli", "loadtest", "--scenario", str(path), "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def user_class(name: str, key: str, share: float, **options: Any) -> dict[str, Any]:
    return {"name": name, "api_key": key, "share": share, "priority_label": name, **options}


def _class(summary: dict[str, Any], name: str) -> dict[str, Any]:
    for entry in summary["classes"]:
        if entry["name"] == name:
            return dict(entry)
    raise KeyError(name)


def unloaded_then_ramp(
    stack: Stack,
    out: Path,
    model: str,
    interactive: dict[str, Any],
    batch: dict[str, Any],
    *,
    users: int,
    ramp_s: float,
    plateau_s: float,
) -> tuple[float, dict[str, Any]]:
    """Interactive p95 TTFT of one interactive user alone, then the summary of the mixed ramp."""
    base = loadtest(
        stack,
        out.with_name(f"unloaded-{out.name}"),
        model=model,
        users=1,
        ramp_up=0,
        plateau=15,
        ramp_down=0,
        classes=[{**interactive, "share": 1.0}],
    )
    loaded = loadtest(
        stack,
        out,
        model=model,
        users=users,
        ramp_up=ramp_s,
        plateau=plateau_s,
        ramp_down=ramp_s,
        classes=[interactive, batch],
    )
    return float(_class(base, "interactive")["ttft_p95_s"]), loaded


def _interactive_alone(
    out: Path, servers: list[dict[str, Any]], *, users: int, ramp_s: float, plateau_s: float
) -> float:
    """Interactive p95 TTFT of the interactive users alone on the ramp: the load they put
    on the engines themselves, with no lower-priority traffic at all."""
    model = {"name": "emulated", "routing_strategy": "least-busy", "servers": servers}
    with gateway(out / f"gw-alone-{users}", model, {"interactive": {"priority": 10}}) as stack:
        summary = loadtest(
            stack,
            out / f"interactive-alone-{users}",
            model="emulated",
            users=users,
            ramp_up=ramp_s,
            plateau=plateau_s,
            ramp_down=ramp_s,
            classes=[
                user_class(
                    "interactive", stack.keys["interactive"], 1.0, prompt_words=60, max_tokens=64
                )
            ],
        )
    return float(_class(summary, "interactive")["ttft_p95_s"])


# --- the experiments ----------------------------------------------------------------------


def ramp(out: Path) -> str:
    """(a) Interactive high priority + batch low priority on saturated emulated backends."""
    engines, seqs = 4, 4
    rows = []
    with emulated_engines(engines, max_num_seqs=seqs) as urls:
        servers = [{"url": url, "engine": "vllm", "max_concurrency": seqs} for url in urls]
        threshold = {
            "policy": "parallel-threshold",
            "shares": [{"min_priority": 0, "share": 0.5}, {"min_priority": 10, "share": 1.0}],
        }
        quarter = {
            "policy": "parallel-threshold",
            "shares": [{"min_priority": 0, "share": 0.25}, {"min_priority": 10, "share": 1.0}],
        }
        performance = {"policy": "performance", "protected_priority": 10, "ttft_target_s": 0.15}
        # mode: (QoS, interactive priority, batch priority, same organisation for both,
        #        interactive users out of the 40)
        modes = {
            "plain FIFO (one priority, one organisation)": ({"policy": "none"}, 5, 5, True, 8),
            "priorities, QoS none": ({"policy": "none"}, 10, 1, False, 8),
            "priorities + parallel-threshold (batch 50%)": (threshold, 10, 1, False, 8),
            "priorities + parallel-threshold (batch 25%)": (quarter, 10, 1, False, 8),
            "priorities + performance (TTFT target 150 ms)": (performance, 10, 1, False, 8),
            "priorities + parallel-threshold (batch 25%), 2 interactive users": (
                quarter,
                10,
                1,
                False,
                2,
            ),
        }
        alone = {
            count: _interactive_alone(out, servers, users=count, ramp_s=30, plateau_s=60)
            for count in sorted({mode[4] for mode in modes.values()})
        }
        for label, (qos, high, low, one_org, interactive_users) in modes.items():
            model = {
                "name": "emulated",
                "routing_strategy": "least-busy",
                "qos": qos,
                "queue_timeout_s": 600,
                "servers": servers,
            }
            keys = {
                "interactive": {"priority": high, "org": "shared" if one_org else "interactive"},
                "batch": {"priority": low, "org": "shared" if one_org else "batch"},
            }
            slug = label.split(" ")[0].lower().strip(",")
            with gateway(out / f"gw-{slug}-{len(rows)}", model, keys) as stack:
                share = interactive_users / 40
                interactive = user_class(
                    "interactive",
                    stack.keys["interactive"],
                    share,
                    prompt_words=60,
                    max_tokens=64,
                )
                batch = user_class(
                    "batch", stack.keys["batch"], 1 - share, prompt_words=300, max_tokens=64
                )
                unloaded, loaded = unloaded_then_ramp(
                    stack,
                    out / f"ramp-{len(rows)}",
                    "emulated",
                    interactive,
                    batch,
                    users=40,
                    ramp_s=30,
                    plateau_s=60,
                )
            inter, batch = _class(loaded, "interactive"), _class(loaded, "batch")
            rows.append(
                f"| {label} | {unloaded * 1000:.0f} | {inter['ttft_p95_s'] * 1000:.0f} | "
                f"{inter['ttft_p95_s'] / unloaded:.2f}x | "
                f"{inter['ttft_p95_s'] / alone[interactive_users]:.2f}x | "
                f"{batch['ttft_p95_s'] * 1000:.0f} | "
                f"{inter['requests']} / {inter['errors']} | "
                f"{batch['requests']} / {batch['errors']} |"
            )
    return "\n".join(
        [
            f"4 emulated vLLM engines x {seqs} sequences; 40 users (8 interactive and 32 batch "
            "unless the mode says otherwise; streaming, 64 tokens), ramp 30 s, plateau 60 s, "
            "ramp-down 30 s; least-busy. Two references for the interactive p95 TTFT: one "
            "interactive user alone for 15 s (per mode), and the interactive users alone on the "
            "same ramp with no batch traffic: "
            + ", ".join(f"{n} users {v * 1000:.0f} ms" for n, v in alone.items())
            + ".",
            "",
            "| mode | interactive p95 TTFT, one user alone (ms) | interactive p95 TTFT loaded (ms) "
            "| ratio to one user alone | ratio to interactive traffic alone | "
            "batch p95 TTFT (ms) | interactive requests / errors | batch requests / errors |",
            "|---|---:|---:|---:|---:|---:|---|---|",
            *rows,
        ]
    )


# (users, think time s): back-to-back users as many as the engines' slots, then loads with
# thinking users that offer more than round-robin's half share lets the slow backend serve.
SLOW_LOADS = ((8, 0.0), (16, 2.0), (20, 2.0), (24, 3.0))
SLOW_STRATEGIES = ("round-robin", "least-busy", "latency")


def slow_backend(out: Path) -> str:
    """(b) Least-busy vs round-robin when one of two backends is twice as slow, over loads."""
    lines = []
    with emulated_engines(2, slowdown=[1.0, 2.0], max_num_seqs=4) as urls:
        servers = [{"url": url, "engine": "vllm", "max_concurrency": 16} for url in urls]
        for users, think in SLOW_LOADS:
            p95: dict[str, float] = {}
            for strategy in SLOW_STRATEGIES:
                model = {
                    "name": "emulated",
                    "routing_strategy": strategy,
                    "servers": servers,
                    "queue_timeout_s": 600,
                }
                run = f"{strategy}-{users}u-{think:g}s"
                with gateway(out / f"gw-{run}", model, {"user": {}}) as stack:
                    summary = loadtest(
                        stack,
                        out / run,
                        model="emulated",
                        users=users,
                        ramp_up=2,
                        plateau=40,
                        ramp_down=2,
                        classes=[
                            user_class(
                                "user",
                                stack.keys["user"],
                                1.0,
                                prompt_words=100,
                                max_tokens=64,
                                think_time_s=think,
                            )
                        ],
                    )
                entry = _class(summary, "user")
                p95[strategy] = entry["latency_p95_s"]
                gain = 1 - entry["latency_p95_s"] / p95["round-robin"]
                lines.append(
                    f"| {users} | {think:g} | {strategy} | {entry['latency_p50_s']:.2f} | "
                    f"{entry['latency_p95_s']:.2f} | {gain * 100:.0f}% | "
                    f"{entry['requests']} | {entry['errors']} |"
                )
    return "\n".join(
        [
            "2 emulated engines (4 sequences each, their own queue beyond), the second 2x "
            "slower; max_concurrency 16 each; closed-loop streaming users (100-word prompt, "
            "64 tokens) for 40 s, with the think time shown between an answer and the next "
            "request.",
            "",
            "| users | think (s) | strategy | latency p50 (s) | latency p95 (s) | "
            "p95 lower than round-robin | requests | errors |",
            "|---:|---:|---|---:|---:|---:|---:|---:|",
            *lines,
        ]
    )


def prefix(out: Path) -> str:
    """(c) Prefix-affinity vs round-robin on two real llama.cpp servers, shared long prefixes."""
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    # no host-RAM prompt cache: like a GPU engine, each server keeps only what its KV holds
    with llama_engines(2, out, ("--cache-ram", "0")) as urls:
        servers = [{"url": url, "engine": "llamacpp", "max_concurrency": 2} for url in urls]
        for strategy in ("round-robin", "prefix-affinity"):
            model = {
                "name": "smollm2",
                "model": "SmolLM2-135M-Instruct",
                "routing_strategy": strategy,
                "servers": servers,
                "queue_timeout_s": 600,
                "prefix_chars": 512,
            }
            with gateway(out / f"gw-{strategy}", model, {"user": {}}) as stack:
                prefixes = [
                    user_class(
                        f"prefix{i}",
                        stack.keys["user"],
                        0.25,
                        prompt_words=15,
                        shared_prefix_words=150,
                        max_tokens=8,
                        think_time_s=1.0,
                    )
                    for i in range(4)
                ]
                summary = loadtest(
                    stack,
                    out / strategy,
                    model="smollm2",
                    users=4,
                    ramp_up=0,
                    plateau=45,
                    ramp_down=0,
                    classes=prefixes,
                )
            rows.append((strategy, _class(summary, "all")))
    rr, pa = rows[0][1], rows[1][1]
    lines = [
        f"| {name} | {e['ttft_p50_s'] * 1000:.0f} | {e['ttft_p95_s'] * 1000:.0f} | "
        f"{e['requests']} |"
        for name, e in rows
    ]
    return "\n".join(
        [
            "2 llama.cpp servers (SmolLM2-135M, 2 slots, 1 thread each, `--cache-ram 0`: "
            "only the slots' KV cache, as on a GPU); 4 users, each with its own 150-word system "
            "prompt and a 15-word question, 1 s of thinking between requests (so the home server "
            "usually has room); 8 tokens out; 45 s.",
            "",
            "| strategy | TTFT p50 (ms) | TTFT p95 (ms) | requests |",
            "|---|---:|---:|---:|",
            *lines,
            "",
            f"prefix-affinity TTFT p50 is {rr['ttft_p50_s'] / pa['ttft_p50_s']:.2f}x lower "
            "(target ≥ 2x).",
        ]
    )


def llama_ramp(out: Path) -> str:
    """(d) A shortened ramp against two real llama.cpp servers, priorities on."""
    out.mkdir(parents=True, exist_ok=True)
    with llama_engines(2, out) as urls:
        servers = [{"url": url, "engine": "llamacpp", "max_concurrency": 2} for url in urls]
        model = {
            "name": "smollm2",
            "model": "SmolLM2-135M-Instruct",
            "routing_strategy": "least-busy",
            "servers": servers,
            "queue_timeout_s": 600,
            "qos": {
                "policy": "parallel-threshold",
                "shares": [{"min_priority": 0, "share": 0.5}, {"min_priority": 10, "share": 1.0}],
            },
        }
        keys = {
            "interactive": {"priority": 10, "org": "interactive"},
            "batch": {"priority": 1, "org": "batch"},
        }
        with gateway(out / "gw", model, keys) as stack:
            interactive = user_class(
                "interactive", stack.keys["interactive"], 0.2, prompt_words=40, max_tokens=16
            )
            batch = user_class("batch", stack.keys["batch"], 0.8, prompt_words=150, max_tokens=16)
            unloaded, loaded = unloaded_then_ramp(
                stack,
                out / "ramp",
                "smollm2",
                interactive,
                batch,
                users=10,
                ramp_s=20,
                plateau_s=40,
            )
    lines = []
    for name in ("interactive", "batch"):
        e = _class(loaded, name)
        lines.append(
            f"| {name} | {e['ttft_p50_s'] * 1000:.0f} | {e['ttft_p95_s'] * 1000:.0f} | "
            f"{e['latency_p95_s']:.2f} | {e['requests']} | {e['errors']} |"
        )
    return "\n".join(
        [
            "2 llama.cpp servers (SmolLM2-135M, 2 slots, 1 thread each); 10 users (2 interactive "
            "priority 10, 8 batch priority 1), ramp 20 s, plateau 40 s, ramp-down 20 s; 16 tokens; "
            "least-busy + parallel-threshold (batch ≤ 50%).",
            "",
            f"Interactive p95 TTFT alone: {unloaded * 1000:.0f} ms.",
            "",
            "| class | TTFT p50 (ms) | TTFT p95 (ms) | latency p95 (s) | requests | errors |",
            "|---|---:|---:|---:|---:|---:|",
            *lines,
        ]
    )


EXPERIMENTS = {"ramp": ramp, "slow": slow_backend, "prefix": prefix, "llama-ramp": llama_ramp}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    args = parser.parse_args()
    chosen = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(
        f"# dispatch benchmark, {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}"
    )
    for name in chosen:
        out = OUT / f"dispatch-{name}-{stamp}"
        started = time.monotonic()
        report = EXPERIMENTS[name](out)
        print(
            f"\n## {name} ({time.monotonic() - started:.0f} s; files in {out.relative_to(ROOT)})\n"
        )
        print(report, flush=True)


if __name__ == "__main__":
    main()
