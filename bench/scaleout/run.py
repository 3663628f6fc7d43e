"""Scale-out benchmark: throughput of 1 vs 3 gateway replicas behind HAProxy (TCP mode).

    python bench/scaleout/run.py [--duration 10] [--conns 64] [--rate R] [--scheduler-url URL]

The engine is nginx answering a fixed chat completion (almost no CPU), so the
gateways are what is measured. Replicas share one PostgreSQL database (the local
server, database `aiguillage_bench_scaleout`, recreated each run). With
`--scheduler-url` they also share the Redis scheduler; without, each replica
schedules locally. Load: bench/out/loadgen through HAProxy, closed loop for
throughput or at `--rate` req/s for latency (the Redis engine's added latency
is the p50 difference at one fixed rate with and without `--scheduler-url`).
Besides throughput and latency, it reads each replica's CPU time from /proc,
which gives the CPU cost per request used to estimate what more cores would do.
Everything listens on 127.0.0.1; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
LOADGEN = REPO / "bench" / "out" / "loadgen"
AIGUILLAGE = [sys.executable, "-m", "aiguillage.cli"]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_DB = "aiguillage_bench_scaleout"
TICKS = os.sysconf("SC_CLK_TCK")
ANSWER = (
    '{"id":"c","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,'
    '"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing answers on port {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def recreate_database() -> None:
    connection = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{PG_DB}"')
    finally:
        await connection.close()


class Processes:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], log: Path, **options: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            command,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **options,
        )
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        self.started.clear()


def start_engine(processes: Processes, work: Path) -> int:
    port = free_port()
    (work / "engine.conf").write_text(
        f"""daemon off; worker_processes 1; pid {work}/engine.pid; error_log stderr;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {work}; proxy_temp_path {work};
  fastcgi_temp_path {work}; uwsgi_temp_path {work}; scgi_temp_path {work};
  server {{ listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{ANSWER}'; }} }} }}
"""
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    processes.start([nginx, "-c", str(work / "engine.conf")], work / "engine.log")
    time.sleep(0.5)
    return port


def start_balancer(processes: Processes, work: Path, ports: list[int]) -> int:
    port = free_port()
    servers = "\n".join(f"  server r{i} 127.0.0.1:{p}" for i, p in enumerate(ports))
    (work / "haproxy.cfg").write_text(
        f"""global
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen gateways
  bind 127.0.0.1:{port}
  balance roundrobin
{servers}
"""
    )
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    processes.start([haproxy, "-db", "-f", str(work / "haproxy.cfg")], work / "haproxy.log")
    time.sleep(0.5)
    return port


def run_once(replicas: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    processes = Processes()
    try:
        engine_port = start_engine(processes, work)
        settings: dict[str, Any] = {
            "database_url": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{PG_DB}",
            "models": [
                {
                    "name": "m",
                    "servers": [
                        {"url": f"http://127.0.0.1:{engine_port}/v1", "max_concurrency": 10_000}
                    ],
                }
            ],
        }
        if args.scheduler_url:
            settings["scheduler_url"] = args.scheduler_url
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump(settings))
        created = subprocess.run(
            [
                *AIGUILLAGE,
                "keys",
                "create",
                "--name",
                "bench",
                "--org",
                "bench",
                "--json",
                "--threshold",
                "100000",
                "--config",
                str(config),
            ],
            check=True,
            capture_output=True,
        )
        key = json.loads(created.stdout)["key"]
        ports = [free_port() for _ in range(replicas)]
        gateways = [
            processes.start(
                [
                    *AIGUILLAGE,
                    "serve",
                    "--config",
                    str(config),
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                work / f"replica-{port}.log",
            )
            for port in ports
        ]
        for port in ports:
            wait_port(port)
        balancer = start_balancer(processes, work, ports)
        body = work / "body.json"
        body.write_text('{"model":"m","messages":[{"role":"user","content":"Hello"}]}')
        cpu_before = sum(cpu_seconds(g.pid) for g in gateways)
        result = subprocess.run(
            [
                str(LOADGEN),
                "--port",
                str(balancer),
                "--path",
                "/v1/chat/completions",
                "--body-file",
                str(body),
                "--header",
                f"Authorization: Bearer {key}",
                "--header",
                "Content-Type: application/json",
                "--rate",
                "0",
                "--conns",
                str(args.conns),
                "--duration",
                str(args.duration),
                "--warmup",
                "2",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=args.duration + 60,
        )
        cpu_after = sum(cpu_seconds(g.pid) for g in gateways)
        load = json.loads(result.stdout)
        done = load["done"]
        return {
            "replicas": replicas,
            "load": load,
            "gateway_cpu_s": round(cpu_after - cpu_before, 2),
            "gateway_cpu_ms_per_request": round(1000 * (cpu_after - cpu_before) / max(done, 1), 3),
        }
    finally:
        processes.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--conns", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.0, help="req/s; 0 = closed loop")
    parser.add_argument("--replicas", default="1,3")
    parser.add_argument("--scheduler-url", default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "scaleout.json")
    args = parser.parse_args()
    if not LOADGEN.exists():
        LOADGEN.parent.mkdir(parents=True, exist_ok=True)
        source = REPO / "bench" / "overhead" / "loadgen.c"
        subprocess.run(["cc", "-O2", "-o", str(LOADGEN), str(source), "-lm"], check=True)
    results = []
    for count in (int(n) for n in args.replicas.split(",")):
        asyncio.run(recreate_database())
        with tempfile.TemporaryDirectory(prefix="aiguillage-scaleout-") as work:
            results.append(run_once(count, args, Path(work)))
        print(json.dumps(results[-1], indent=2), flush=True)
    args.out.write_text(json.dumps({"cores": os.cpu_count(), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
