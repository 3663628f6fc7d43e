"""Throughput of 1 and 3 gateway replicas behind HAProxy, and what the Redis scheduler costs.

Run: .venv/bin/python bench/scaleout/run.py [--duration 10] [--connections 64]
Needs nginx (the canned engine), HAProxy (the TCP balancer), wrk (the load) and Redis
on 127.0.0.1:6379; install the first three with `apt-get install nginx-light haproxy wrk`.

Side by side in one run, every setup behind the same HAProxy, against the same canned
engine: one replica with the in-process scheduler, one with the Redis scheduler, three
with the Redis scheduler. For each: requests/s, wrk's latency p50/p99, and the gateway
processes' CPU time per request (the number that predicts throughput on more cores).
Every process listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis
import yaml

from aiguillage.backends.local_engine import free_port

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "overhead"))
from bench import ENGINE_NS, write_engine_conf  # type: ignore[import-not-found]  # noqa: E402

AIGUILLAGE = [sys.executable, "-m", "aiguillage.cli"]
REDIS_URL = "redis://127.0.0.1:6379/15"  # a database of its own: its keys are removed after
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def key_for(config: Path) -> str:
    created = subprocess.run(
        [*AIGUILLAGE, "keys", "create", "--name", "bench", "--org", "bench", "--json",
         "--threshold", "100000", "--config", str(config)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(json.loads(created.stdout)["key"])


def haproxy_conf(tmp: Path, port: int, replicas: list[int]) -> Path:
    servers = "\n".join(f"  server r{i} 127.0.0.1:{p}" for i, p in enumerate(replicas))
    conf = tmp / f"haproxy-{port}.cfg"
    conf.write_text(
        f"""global
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend gateways
  bind 127.0.0.1:{port}
  default_backend replicas
backend replicas
  balance roundrobin
{servers}
"""
    )
    return conf


def wrk(port: int, key: str, duration: int, connections: int, tmp: Path) -> dict[str, float]:
    script = tmp / "post.lua"
    body = json.dumps({"model": "canned", "messages": [{"role": "user", "content": "hi"}]})
    script.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{body}'\n"
        f"wrk.headers['Content-Type'] = 'application/json'\n"
        f"wrk.headers['Authorization'] = 'Bearer {key}'\n"
        "shown = false\n"
        "response = function(status, headers, body)\n"
        "  if status ~= 200 and not shown then print(status, body); shown = true end\n"
        "end\n"
    )
    run = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{port}/v1/chat/completions"],
        capture_output=True, text=True,
    )  # fmt: skip
    output = run.stdout
    if run.returncode or "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk failed or some requests did:\n{output}{run.stderr}")

    def latency_ms(percent: str) -> float:
        value, unit = re.search(rf"{percent}%\s+([\d.]+)(us|ms|s)", output).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    return {"rate": rate, "requests": requests, "p50": latency_ms("50"), "p99": latency_ms("99")}


def run_setup(
    tmp: Path, replicas: int, shared: bool, duration: int, connections: int
) -> dict[str, float]:
    config = tmp / f"gw-{replicas}-{shared}.yaml"
    document: dict[str, object] = {
        "database_url": f"sqlite+aiosqlite:///{tmp / f'gw-{replicas}-{shared}.db'}",
        "models": [
            {
                "name": "canned",
                "servers": [{"url": f"http://127.0.0.1:{ENGINE_NS}", "max_concurrency": 10_000}],
            }
        ],
    }
    if shared:
        document |= {"scheduler_url": REDIS_URL}
    config.write_text(yaml.safe_dump(document))
    key = key_for(config)
    ports = [free_port() for _ in range(replicas)]
    balancer = free_port()
    with processes() as started:
        for port in ports:
            command = [*AIGUILLAGE, "serve", "--config", str(config), "--port", str(port)]
            started.append(
                subprocess.Popen(
                    [*command, "--log-level", "warning"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
            )
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/readyz")
        started.append(subprocess.Popen(["haproxy", "-f", str(haproxy_conf(tmp, balancer, ports))]))
        wait_http(f"http://127.0.0.1:{balancer}/readyz")
        wrk(balancer, key, 2, connections, tmp)  # warm-up
        gateways = started[:replicas]
        before = sum(cpu_seconds(p.pid) for p in gateways)
        result = wrk(balancer, key, duration, connections, tmp)
        used = sum(cpu_seconds(p.pid) for p in gateways) - before
    result["cpu_ms_per_request"] = used * 1000 / result["requests"]
    if shared:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match="aiguillage:*"))
        if keys:
            client.delete(*keys)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name, processes() as engine:
        tmp = Path(name)
        conf = write_engine_conf(tmp)
        engine.append(subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(conf)]))
        wait_http(f"http://127.0.0.1:{ENGINE_NS}/")
        setups = [("1 replica, in-process scheduler", 1, False),
                  ("1 replica, Redis scheduler", 1, True),
                  ("3 replicas, Redis scheduler", 3, True)]  # fmt: skip
        rows = [(label, run_setup(tmp, n, shared, args.duration, args.connections))
                for label, n, shared in setups]  # fmt: skip
    base = rows[0][1]["rate"]
    print(
        f"# scale-out, {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}; wrk -t1 -c{args.connections} "
        f"-d{args.duration}s through HAProxy (TCP, round-robin) to the replicas; canned engine"
    )
    print()
    print("| setup | requests/s | vs 1 local | p50 (ms) | p99 (ms) | gateway CPU / request (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in rows:
        print(
            f"| {label} | {row['rate']:.0f} | {row['rate'] / base:.2f}x | {row['p50']:.2f} | "
            f"{row['p99']:.2f} | {row['cpu_ms_per_request']:.3f} |"
        )


if __name__ == "__main__":
    main()
