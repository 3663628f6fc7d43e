"""Aiguillage overhead benchmark: the same load against the engine, nginx, Aiguillage, LiteLLM.

Run it through `bash bench/overhead/run.sh` (which installs what is missing and builds
the load generator); see bench/overhead/README.md.  Standard library only, so that it
runs under any Python 3.11.

Layout on this 2-core machine (taskset):
  core 0: the proxy under test (nginx proxy, Aiguillage or LiteLLM), nothing else of ours
  core 1: the fake engine (nginx returning canned answers), the load generators, py-spy
Every server listens on 127.0.0.1 only; every load is bounded in time; every process
started here is in its own process group and is ended by its id at the end (also on
Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
REPO = BENCH.parent
OUT = BENCH / "out"
LOADGEN = OUT / "loadgen"
MAIN_VENV = REPO / ".venv"
LITELLM_VENV = BENCH / ".venvs" / "litellm"

ENGINE_CORE = "1"
PROXY_CORE = "0"
LOAD_CORE = "1"

# ports (loopback only)
ENGINE_NS, ENGINE_ST = 19101, 19102
NGINX_NS, NGINX_ST = 19201, 19202
AIGUILLAGE_PORT = 19301
LITELLM_PORT = 19401

N_STREAM_EVENTS = 20  # JSON chunk events per streamed answer, plus `data: [DONE]`

LITELLM_MASTER_KEY = "sk-bench-master-key"

_children: list[subprocess.Popen] = []


# --------------------------------------------------------------------------- canned answers


def canned_completion() -> str:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "fake-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! This is a canned answer."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
        },
        separators=(",", ":"),
    )


def canned_stream() -> str:
    """20 chunk events as vLLM sends them (role, content..., finish, usage) then [DONE]."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
    }
    events = [
        dict(
            base,
            choices=[
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        )
    ]
    n_content = N_STREAM_EVENTS - 3
    for i in range(n_content):
        events.append(
            dict(
                base,
                choices=[
                    {
                        "index": 0,
                        "delta": {"content": f"tok{i} "},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            )
        )
    events.append(
        dict(base, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
    )
    events.append(
        dict(
            base,
            choices=[],
            usage={
                "prompt_tokens": 12,
                "completion_tokens": n_content,
                "total_tokens": 12 + n_content,
            },
        )
    )
    assert len(events) == N_STREAM_EVENTS
    text = "".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events)
    return text + "data: [DONE]\n\n"


def nginx_quote(text: str) -> str:
    """A single-quoted nginx string; nginx turns \\n back into a newline."""
    assert "'" not in text and "$" not in text
    return "'" + text.replace("\\", "\\\\").replace("\n", "\\n") + "'"


def request_body(model: str, stream: bool) -> bytes:
    body: dict = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 32,
        "stream": stream,
    }
    if stream:
        # ask for the usage event so that every target relays the same 20 events
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- processes


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # the group this script created for this child


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        _kill_group(proc, signal.SIGTERM)
        _kill_group(proc, signal.SIGCONT)  # in case it was frozen
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait(5)
    else:
        _kill_group(proc, signal.SIGKILL)  # leftovers of an exited leader, if any
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    for proc in list(reversed(_children)):
        with contextlib.suppress(Exception):
            stop(proc, timeout=5)


def _on_signal(signum, frame):
    stop_all()
    sys.exit(128 + signum)


def spawn(
    cmd: list[str], log: Path, core: str | None, env: dict | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    if core is not None:
        cmd = ["taskset", "-c", core, *cmd]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    _children.append(proc)
    return proc


def proc_tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by a process tree, all threads, from schedstat.

    Not utime/stime: this kernel accounts those by sampling at each tick (250 Hz), and a
    fixed-rate load in step with the tick makes them wrong by a factor of two or more.
    The scheduler's own run time (first field of schedstat) is exact."""
    total = 0
    for p in proc_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                total += int(Path(f"/proc/{p}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def machine_jiffies() -> tuple[float, int]:
    """(monotonic time, idle+iowait of all cores in USER_HZ): idle time is exact with NOHZ."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return time.monotonic(), vals[3] + vals[4]


def busy_cores(before: tuple[float, int], after: tuple[float, int]) -> float:
    """Cores busy on average between two machine_jiffies() readings."""
    wall = after[0] - before[0]
    idle = (after[1] - before[1]) / os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    return round(min(max(ncpu - idle / wall, 0.0), ncpu), 2) if wall > 0 else 0.0


def _top_processes(n: int = 3) -> dict[int, tuple[str, int]]:
    """{pid: (name, run time ns of its main thread)} for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ns = int(Path(f"/proc/{entry}/schedstat").read_text().split()[0])
                name = Path(f"/proc/{entry}/comm").read_text().strip()
            except (OSError, ValueError, IndexError):
                continue
            out[int(entry)] = (name, ns)
    return out


def steal_jiffies() -> int:
    return int(Path("/proc/stat").read_text().splitlines()[0].split()[8])


def wait_quiet(threshold: float, max_wait: float) -> float:
    """Wait (bounded) until the machine uses fewer than `threshold` cores, counting the time
    the hypervisor steals from this VM.  Returns the busy cores of the last look."""
    deadline = time.monotonic() + max_wait
    while True:
        before, procs0, st0 = machine_jiffies(), _top_processes(), steal_jiffies()
        time.sleep(1.0)
        after, procs1, st1 = machine_jiffies(), _top_processes(), steal_jiffies()
        busy = busy_cores(before, after)
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        wall = after[0] - before[0]
        steal = (st1 - st0) / os.sysconf("SC_CLK_TCK") / wall
        users = sorted(
            ((procs1[p][1] - procs0[p][1]) / 1e9 / wall, procs1[p][0], p)
            for p in procs1
            if p in procs0
        )[::-1][:3]
        who = ", ".join(f"{name}[{pid}] {cores:.2f}" for cores, name, pid in users if cores > 0.02)
        print(
            f"   machine busy: {busy:.2f} cores (hypervisor steal {steal:.2f}; {who or '-'}),"
            f" waiting ...",
            flush=True,
        )
        time.sleep(1.0)


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"port {port} not open after {timeout}s")


def post(port: int, body: bytes, headers: dict, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_ready(target: dict, timeout: float, proc: subprocess.Popen | None) -> None:
    """Until the target answers a non-stream request with 200."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{target['name']} exited with {proc.returncode}")
        try:
            status, data = post(
                target["port_ns"],
                request_body(target["model_ns"], False),
                target["headers"],
                timeout=5,
            )
            if status == 200:
                return
            last = f"{status} {data[:300]!r}"
        except OSError as err:
            last = str(err)
        time.sleep(0.5)
    raise RuntimeError(f"{target['name']} not ready after {timeout}s: {last}")


# --------------------------------------------------------------------------- targets


def write_engine_conf(tmp: Path) -> Path:
    conf = tmp / "engine.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(f"""{user}worker_processes 1;
daemon off;
pid {tmp}/engine.pid;
error_log {tmp}/engine-error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
  access_log off;
  server_tokens off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  client_body_temp_path {tmp}/engine-body;
  proxy_temp_path {tmp}/engine-proxy;
  fastcgi_temp_path {tmp}/engine-fcgi;
  uwsgi_temp_path {tmp}/engine-uwsgi;
  scgi_temp_path {tmp}/engine-scgi;
  server {{
    listen 127.0.0.1:{ENGINE_NS} backlog=4096;
    location / {{ default_type application/json; return 200 {nginx_quote(canned_completion())}; }}
  }}
  server {{
    listen 127.0.0.1:{ENGINE_ST} backlog=4096;
    location / {{
      default_type text/event-stream;
      add_header Cache-Control no-cache;
      return 200 {nginx_quote(canned_stream())};
    }}
  }}
}}
""")
    return conf


def write_nginx_proxy_conf(tmp: Path) -> Path:
    conf = tmp / "proxy.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    upstream = "keepalive 64; keepalive_requests 100000000; keepalive_timeout 300s;"
    proxy = 'proxy_http_version 1.1; proxy_set_header Connection "";'
    conf.write_text(f"""{user}worker_processes 1;
daemon off;
pid {tmp}/proxy.pid;
error_log {tmp}/proxy-error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
  access_log off;
  server_tokens off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  client_body_temp_path {tmp}/proxy-body;
  proxy_temp_path {tmp}/proxy-proxy;
  fastcgi_temp_path {tmp}/proxy-fcgi;
  uwsgi_temp_path {tmp}/proxy-uwsgi;
  scgi_temp_path {tmp}/proxy-scgi;
  upstream engine_ns {{ server 127.0.0.1:{ENGINE_NS}; {upstream} }}
  upstream engine_st {{ server 127.0.0.1:{ENGINE_ST}; {upstream} }}
  server {{
    listen 127.0.0.1:{NGINX_NS} backlog=4096;
    location / {{ proxy_pass http://engine_ns; {proxy} }}
  }}
  server {{
    listen 127.0.0.1:{NGINX_ST} backlog=4096;
    location / {{ proxy_pass http://engine_st; {proxy} proxy_buffering off; }}
  }}
}}
""")
    return conf


def start_nginx(conf: Path, tmp: Path, core: str, log: Path) -> subprocess.Popen:
    return spawn(
        ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-start.log"), "-c", str(conf)], log, core
    )


def version_of(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (res.stdout + res.stderr).strip().splitlines()[-1].strip()
    except Exception as err:
        return f"unknown ({err})"


class Target:
    """Start/stop one target; fills a dict the load steps use."""

    def __init__(self, name: str, tmp: Path, logdir: Path):
        self.name, self.tmp, self.logdir = name, tmp, logdir
        self.proc: subprocess.Popen | None = None
        self.info: dict = {"name": name, "headers": {}}

    def start(self) -> dict:
        getattr(self, f"_start_{self.name}")()
        return self.info

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)  # may be frozen by isolate()
        stop(self.proc)
        self.proc = None

    # direct: the fake engine itself
    def _start_direct(self) -> None:
        self.info.update(
            port_ns=ENGINE_NS,
            port_st=ENGINE_ST,
            model_ns="fake",
            model_st="fake-stream",
            version="(fake engine: nginx return 200)",
        )

    def _start_nginx(self) -> None:
        conf = write_nginx_proxy_conf(self.tmp)
        self.proc = start_nginx(conf, self.tmp, PROXY_CORE, self.logdir / "nginx-proxy.log")
        self.info.update(
            port_ns=NGINX_NS,
            port_st=NGINX_ST,
            model_ns="fake",
            model_st="fake-stream",
            pid=self.proc.pid,
            version=version_of(["nginx", "-v"]),
        )
        wait_port(NGINX_NS, 10, self.proc)

    def _start_aiguillage(self) -> None:
        exe = MAIN_VENV / "bin" / "aiguillage"
        db = self.tmp / "aiguillage.db"
        if db.exists():
            db.unlink()
        url = f"sqlite+aiosqlite:///{db}"
        conf = self.tmp / "aiguillage.yaml"
        conf.write_text(
            json.dumps(
                {
                    "database_url": url,
                    "models": [
                        {
                            "name": "fake",
                            "model": "fake-model",
                            "servers": [
                                {
                                    "url": f"http://127.0.0.1:{ENGINE_NS}",
                                    "engine": "openai",
                                    "max_concurrency": 1000,
                                }
                            ],
                        },
                        {
                            "name": "fake-stream",
                            "model": "fake-model",
                            "servers": [
                                {
                                    "url": f"http://127.0.0.1:{ENGINE_ST}",
                                    "engine": "openai",
                                    "max_concurrency": 1000,
                                }
                            ],
                        },
                    ],
                },
                indent=2,
            )
        )
        env = dict(os.environ, AIGUILLAGE_DATABASE_URL=url)
        keys_log = self.logdir / "aiguillage-keys.log"
        res = subprocess.run(
            [str(exe), "keys", "create", "--name", "bench", "--org", "bench", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            cwd=self.tmp,
        )
        keys_log.write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise RuntimeError(f"aiguillage keys create failed: {res.stderr[-2000:]}")
        match = re.search(r"\{.*\}", res.stdout, re.S)
        key = json.loads(match.group(0))["key"] if match else None
        if not key:
            raise RuntimeError(f"no key in: {res.stdout[:500]}")
        self._serve(
            "aiguillage",
            [
                *(str(exe), "serve", "--config", str(conf), "--host", "127.0.0.1"),
                *("--port", str(AIGUILLAGE_PORT), "--workers", "1", "--log-level", "warning"),
            ],
            AIGUILLAGE_PORT,
            env,
            key,
            MAIN_VENV,
            started_within_s=60,
        )

    def _start_litellm(self) -> None:
        exe = LITELLM_VENV / "bin" / "litellm"
        conf = self.tmp / "litellm.yaml"

        def entry(name: str, port: int) -> dict:
            # Prices in model_info, as a deployment tracking spend would set them: without
            # prices LiteLLM 1.106 runs a "zero cost diagnostic" on every answer, and prices
            # in litellm_params re-register the model (and rebuild its cost map) per call.
            return {
                "model_name": name,
                "litellm_params": {
                    "model": "openai/fake-model",
                    "api_base": f"http://127.0.0.1:{port}/v1",
                    "api_key": "sk-fake-engine",
                },
                "model_info": {"input_cost_per_token": 1e-07, "output_cost_per_token": 2e-07},
            }

        # production settings from LiteLLM's "Best Practices for Production", minus the DB
        conf.write_text(
            json.dumps(
                {
                    "model_list": [entry("fake", ENGINE_NS), entry("fake-stream", ENGINE_ST)],
                    "general_settings": {
                        "master_key": LITELLM_MASTER_KEY,
                        "disable_spend_logs": True,
                        "disable_error_logs": True,
                    },
                    "litellm_settings": {
                        "telemetry": False,
                        "set_verbose": False,
                        "json_logs": True,
                        "request_timeout": 600,
                    },
                },
                indent=2,
            )
        )
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
        env.update(
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            LITELLM_LOG="ERROR",
            LITELLM_TELEMETRY="False",
            TELEMETRY="False",
            DISABLE_ADMIN_UI="True",
            HF_HUB_OFFLINE="1",
            NO_DOCS="True",
            PYTHONUNBUFFERED="1",
            LITELLM_MODE="PRODUCTION",
        )
        self._serve(
            "litellm",
            [
                *(str(exe), "--config", str(conf), "--host", "127.0.0.1"),
                *("--port", str(LITELLM_PORT), "--num_workers", "1"),
            ],
            LITELLM_PORT,
            env,
            LITELLM_MASTER_KEY,
            LITELLM_VENV,
            started_within_s=180,
        )

    def _serve(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str],
        api_key: str,
        venv: Path,
        started_within_s: float,
    ) -> None:
        """Start a gateway under test on the proxy's core: models "fake" and "fake-stream"
        on one port, `name` being both its log's name and its Python distribution's."""
        self.proc = spawn(argv, self.logdir / f"{name}.log", PROXY_CORE, env=env, cwd=self.tmp)
        version = f"import importlib.metadata as m;print('{name}', m.version('{name}'))"
        self.info.update(
            port_ns=port,
            port_st=port,
            model_ns="fake",
            model_st="fake-stream",
            pid=self.proc.pid,
            headers={"Authorization": f"Bearer {api_key}"},
            version=version_of([str(venv / "bin" / "python"), "-c", version]),
        )
        wait_port(port, started_within_s, self.proc)


# --------------------------------------------------------------------------- load


class Meter:
    """CPU accounting around one load run: the proxy's and the engine's own run time,
    the load generator's (a child of ours), the machine's busy time and the time the
    hypervisor stole from this VM.  `others` is what none of ours explains."""

    engine_pid: int | None = None

    def __init__(self, proxy_pid: int | None):
        self.proxy_pid = proxy_pid
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.c0 = ru.ru_utime + ru.ru_stime
        self.p0 = cpu_seconds(proxy_pid) if proxy_pid else 0.0
        self.e0 = cpu_seconds(self.engine_pid) if self.engine_pid else 0.0
        self.s0 = steal_jiffies()
        self.j0 = machine_jiffies()

    def done(self) -> dict:
        j1 = machine_jiffies()
        wall = j1[0] - self.j0[0]
        steal = (steal_jiffies() - self.s0) / os.sysconf("SC_CLK_TCK") / wall
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        load = ru.ru_utime + ru.ru_stime - self.c0
        proxy = cpu_seconds(self.proxy_pid) - self.p0 if self.proxy_pid else 0.0
        engine = cpu_seconds(self.engine_pid) - self.e0 if self.engine_pid else 0.0
        busy = busy_cores(self.j0, j1)  # steal included: not idle
        others = max(busy - steal - (proxy + engine + load) / wall, 0.0)
        return {
            "wall_s": round(wall, 2),
            "machine_busy_cores": busy,
            "steal_cores": round(steal, 2),
            "others_cores": round(others, 2),
            "interference_cores": round(steal + others, 2),
            "engine_cpu_cores": round(engine / wall, 3),
            "loadgen_cpu_cores": round(load / wall, 3),
            "proxy_cpu_s": round(proxy, 3),
        }


def run_loadgen(
    target: dict,
    stream: bool,
    rate: float,
    duration: float,
    warmup: float,
    tmp: Path,
    conns: int = 256,
) -> dict:
    body = tmp / ("body-stream.json" if stream else "body.json")
    body.write_bytes(request_body(target["model_st" if stream else "model_ns"], stream))
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        str(LOADGEN),
        "--port",
        str(target["port_st" if stream else "port_ns"]),
        "--body-file",
        str(body),
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--conns",
        str(conns),
        "--grace",
        "5",
    ]
    for k, v in target["headers"].items():
        cmd += ["--header", f"{k}: {v}"]
    pid = target.get("pid")
    meter = Meter(pid)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 30)
    m = meter.done()
    if res.returncode != 0:
        raise RuntimeError(f"loadgen failed ({res.returncode}): {res.stderr[-1000:]}")
    out = json.loads(res.stdout)
    out.update(m)
    if pid:
        # CPU of the proxy over the whole run (warm-up included): per request sent
        out["proxy_cpu_us_per_req"] = round(m["proxy_cpu_s"] / max(out["sent"], 1) * 1e6, 1)
        out["proxy_cpu_util"] = round(m["proxy_cpu_s"] / m["wall_s"], 3)
    saturated = (
        out["unfinished"] > 0
        or out["errors"] > 0
        or out["non2xx"] > 0
        or out["achieved_rps"] < 0.97 * rate
    )
    out["saturated"] = saturated
    return out


def run_wrk(target: dict, stream: bool, duration: float, conns: int, tmp: Path) -> dict:
    body = request_body(target["model_st" if stream else "model_ns"], stream).decode()
    script = tmp / ("wrk-stream.lua" if stream else "wrk.lua")
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    for k, v in target["headers"].items():
        lines.append(f'wrk.headers["{k}"] = "{v}"')
    lines.append(f"wrk.body = [==[{body}]==]")
    script.write_text("\n".join(lines) + "\n")
    port = target["port_st" if stream else "port_ns"]
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{int(duration)}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/v1/chat/completions",
    ]
    pid = target.get("pid")
    meter = Meter(pid)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    meas = meter.done()
    text = res.stdout + res.stderr
    out: dict = {"raw": text, "conns": conns, **meas}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if m:
            val = float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]
            out[f"p{p}_ms"] = round(val, 3)
    if pid:
        out["proxy_cpu_util"] = round(meas["proxy_cpu_s"] / meas["wall_s"], 3)
        if out["requests"]:
            out["proxy_cpu_us_per_req"] = round(meas["proxy_cpu_s"] / out["requests"] * 1e6, 1)
    return out


def profile(target: dict, tmp: Path, duration: float, rate: float, logdir: Path) -> dict:
    """py-spy on the proxy while the load generator keeps it busy (rate 0: wrk, flat out)."""
    pyspy = MAIN_VENV / "bin" / "py-spy"
    if not pyspy.exists():
        return {"error": "py-spy not installed in .venv"}
    tag = "max" if rate <= 0 else f"{rate:g}rps"
    raw = OUT / f"aiguillage-profile-{tag}.txt"
    pids = [p for p in proc_tree(target["pid"]) if _is_python(p)]
    # the serving process: the deepest python process of the tree
    pid = pids[-1] if pids else target["pid"]
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        str(pyspy),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(duration)),
        "--rate",
        "200",
        "--nonblocking",
        "--format",
        "raw",
        "-o",
        str(raw),
    ]
    prof = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    _children.append(prof)
    time.sleep(1.0)
    if rate > 0:
        load = run_loadgen(target, False, rate, duration - 1, 0.5, tmp)
    else:
        load = run_wrk(target, False, duration - 1, 32, tmp)
        load.pop("raw", None)
    try:
        text, _ = prof.communicate(timeout=duration + 30)
    finally:
        stop(prof)
    result = {
        "load": load,
        "pid": pid,
        "raw_file": str(raw.relative_to(REPO)),
        "mode": "record --nonblocking --rate 200",
        "seconds": int(duration),
        "pyspy_output": text.decode(errors="replace")[-500:] if text else "",
    }
    if raw.exists():
        shutil.copy(raw, logdir / raw.name)
        result.update(summarise_profile(raw))
    return result


def _is_python(pid: int) -> bool:
    try:
        return "python" in Path(f"/proc/{pid}/exe").resolve().name
    except OSError:
        return False


def summarise_profile(raw: Path, top: int = 25) -> dict:
    """Shares per function from py-spy's collapsed stacks (`--format raw`).

    self: samples whose innermost frame is that function.  With --native the innermost
    frame is often C (uvloop, libc, orjson...); `self_python` charges each sample to its
    innermost *Python* frame instead (so a socket write counts for the Python function that
    called it).  inclusive: samples with the function anywhere on the stack."""
    self_count: dict[str, int] = {}
    self_py: dict[str, int] = {}
    incl: dict[str, int] = {}
    files: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        while frames and frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        if not frames:
            continue
        total += count
        short = [_short(f) for f in frames]
        self_count[short[-1]] = self_count.get(short[-1], 0) + count
        py = [f for f, raw_f in zip(short, frames, strict=False) if _is_py_frame(raw_f)]
        leaf_py = py[-1] if py else short[-1]
        self_py[leaf_py] = self_py.get(leaf_py, 0) + count
        for key in set(short):
            incl[key] = incl.get(key, 0) + count
        mod = _module(next((f for f in reversed(frames) if _is_py_frame(f)), frames[-1]))
        files[mod] = files.get(mod, 0) + count

    def table(d: dict[str, int]) -> list[tuple[str, float]]:
        return [
            (k, round(100 * v / total, 1))
            for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]
        ]

    ours = {k: v for k, v in incl.items() if "aiguillage/" in k or "uvicorn/protocols" in k}
    return {
        "samples": total,
        "self_top": table(self_count),
        "self_python_top": table(self_py),
        "inclusive_top": table(incl),
        "inclusive_ours": table(ours),
        "self_by_module": table(files),
    }


def _is_py_frame(frame: str) -> bool:
    return bool(re.search(r"\((?:.*\.py|<frozen [^>]*>)(?::\d+)?\)$", frame))


def _short(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)' keeping the package for aiguillage."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    if "aiguillage/" in path:
        path = "aiguillage/" + path.split("aiguillage/", 1)[1]
    elif "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/lib/python" in path:
        path = "stdlib/" + path.split("/lib/python", 1)[1].split("/", 1)[-1]
    return f"{func} ({path})"


def _module(frame: str) -> str:
    m = re.match(r".* \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    path = m.group(1)
    if "aiguillage/" in path:
        return "aiguillage/" + path.split("aiguillage/", 1)[1]
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/lib/python" in path:
        return "stdlib/" + path.split("/lib/python", 1)[1].split("/", 1)[-1]
    return path


# --------------------------------------------------------------------------- report


def machine() -> dict:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "wrk": version_of(["sh", "-c", "wrk -v 2>&1 | head -1"]),
    }


def _ms(res: dict, dist: str, p: str) -> str:
    d = res.get(dist)
    return "—" if not d else f"{d[p]:.3f}"


def fmt(x: float | None, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _lat(run: dict | None, p: str, dist: str = "latency_ms") -> float | None:
    if not run or not run.get(dist):
        return None
    return run[dist][p]


def render(results: dict) -> str:
    r = results
    m = r["machine"]
    lines = [
        f"Run {r['date']} · machine: `nproc` = {m['nproc']}, {m['cpu']}, kernel "
        f"{m['kernel']}, Python {m['python']} · load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
        "",
        f"Command: `{r['command']}`",
        "",
        "Versions: "
        + "; ".join(f"{t['name']}: {t.get('version', '?')}" for t in r["targets"].values())
        + f"; wrk: {m['wrk']}; fixed-rate load generator: bench/overhead/loadgen.c",
        "",
        f"Pinning (taskset): proxy under test alone on core {PROXY_CORE} (the other proxies "
        f"are frozen with SIGSTOP meanwhile); fake engine (nginx), load generators and "
        f"py-spy on core {LOAD_CORE}. Fixed-rate runs: {r['params']['duration']:g} s "
        f"measured after {r['params']['warmup']:g} s of warm-up at the same rate; latency "
        f"counts from the *scheduled* send time (open loop, no coordinated omission); "
        f'"added" = target − direct at the same percentile and rate; *service* time '
        f"counts from the actual write instead, so it leaves out the load generator's own "
        f"lateness (send lag). Proxy CPU is the "
        f"proxy's own run time (schedstat) over the run, divided by requests sent. "
        f"Each step ran {r['params'].get('repeat', 1)}× per target; the table keeps the "
        f"run with the least interference: *steal* = CPU time the hypervisor took from "
        f"this VM, *others* = busy time that neither the proxy, the engine nor the load "
        f"generator explains (other work on the machine), both in cores, averaged over "
        f"the run.",
        "",
    ]
    names = [n for n in r["targets"] if n != "direct"]
    direct = r["targets"].get("direct")

    lines += [
        "### Added latency, non-stream, fixed rate",
        "",
        "| rate (req/s) | target | p50 (ms) | p99 (ms) | added p50 (ms) | added p99 (ms) "
        "| service p50 / p99 (ms) | added service p50 / p99 (ms) "
        "| achieved req/s | send lag p99 (ms) | proxy CPU µs/req | steal / others (cores) "
        "| note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for rate in r["params"]["rates"]:
        key = str(rate)
        d = direct.get("fixed", {}).get(key) if direct else None
        for name in ["direct", *names]:
            run = r["targets"][name].get("fixed", {}).get(key)
            if run is None:
                continue
            p50, p99 = _lat(run, "p50"), _lat(run, "p99")
            a50 = _sub(p50, _lat(d, "p50")) if name != "direct" else None
            a99 = _sub(p99, _lat(d, "p99")) if name != "direct" else None
            note = ""
            if run["saturated"]:
                note = (
                    f"SATURATED: {run['unfinished']} of {run['scheduled']} never answered "
                    f"in time; percentiles of the answered ones only"
                )
            s50, s99 = _lat(run, "p50", "service_ms"), _lat(run, "p99", "service_ms")
            if name != "direct":
                as_ = (
                    f"{fmt(_sub(s50, _lat(d, 'p50', 'service_ms')))} / "
                    f"{fmt(_sub(s99, _lat(d, 'p99', 'service_ms')))}"
                )
            else:
                as_ = "—"
            lines.append(
                f"| {rate} | {name} | {fmt(p50)} | {fmt(p99)} | {fmt(a50)} | {fmt(a99)} "
                f"| {fmt(s50)} / {fmt(s99)} | {as_} "
                f"| {run['achieved_rps']:.0f} | {fmt(_lat(run, 'p99', 'send_lag_ms'))} "
                f"| {run.get('proxy_cpu_us_per_req', '—')} "
                f"| {run.get('steal_cores', '—')} / {run.get('others_cores', '—')} "
                f"| {note} |"
            )
    lines += [
        "",
        f"### Maximum throughput, one worker (wrk -t1 -c{r['params']['max_conns']}, "
        f"closed loop, {r['params']['max_duration']:g} s)",
        "",
        "| target | non-stream req/s | p50 / p99 (ms) | proxy CPU (cores) | stream req/s "
        "| relayed chunks/s | stream p50 / p99 (ms) | steal (cores) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in ["direct", *names]:
        t = r["targets"][name]
        ns, st = t.get("max_ns"), t.get("max_st")
        if not ns:
            continue
        evs = [
            x["events_per_response"]["mean"]
            for x in t.get("stream_fixed", {}).values()
            if x.get("measured")
        ]
        ev = evs[0] if evs else None
        chunks = st["rps"] * ev if st and st.get("rps") and ev else None
        errs = (
            ", ".join(
                f"{k}: {v}"
                for k, v in (
                    ("non2xx", ns["non2xx"] + (st or {}).get("non2xx", 0)),
                    ("socket", ns["socket_errors"] + (st or {}).get("socket_errors", 0)),
                )
                if v
            )
            or "none"
        )
        lines.append(
            f"| {name} | {fmt(ns['rps'], 0)} | {fmt(ns.get('p50_ms'), 2)} / "
            f"{fmt(ns.get('p99_ms'), 2)} | {ns.get('proxy_cpu_util', '—')} "
            f"| {fmt(st and st['rps'], 0)} | {fmt(chunks, 0)} | "
            f"{fmt(st and st.get('p50_ms'), 2)} / {fmt(st and st.get('p99_ms'), 2)} "
            f"| {ns.get('steal_cores', '—')} / {(st or {}).get('steal_cores', '—')} "
            f"| {errs} |"
        )
    lines += [
        "",
        "relayed chunks/s = stream req/s × SSE `data:` events per answer (counted by "
        "the fixed-rate stream runs below; the fake engine sends 20 chunks + `[DONE]`).",
        "",
    ]
    lines += [
        "### Stream, fixed rate",
        "",
        "| rate (req/s) | target | events/answer | TTFB p50 / p99 (ms) | total p50 / p99 (ms) "
        "| added total p50 / p99 (ms) | proxy CPU µs/req | note |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for srate in r["params"]["stream_rates"]:
        dst = direct.get("stream_fixed", {}).get(str(srate)) if direct else None
        for name in ["direct", *names]:
            sr = r["targets"][name].get("stream_fixed", {}).get(str(srate))
            if not sr:
                continue
            a = (
                f"{fmt(_sub(_lat(sr, 'p50'), _lat(dst, 'p50')))} / "
                f"{fmt(_sub(_lat(sr, 'p99'), _lat(dst, 'p99')))}"
                if name != "direct"
                else "—"
            )
            lines.append(
                f"| {srate} | {name} | {sr['events_per_response']['mean']:.1f} | "
                f"{fmt(_lat(sr, 'p50', 'ttfb_ms'))} / {fmt(_lat(sr, 'p99', 'ttfb_ms'))} | "
                f"{fmt(_lat(sr, 'p50'))} / {fmt(_lat(sr, 'p99'))} | {a} | "
                f"{sr.get('proxy_cpu_us_per_req', '—')} | "
                f"{'SATURATED' if sr['saturated'] else ''} |"
            )
    lines += ["", "### Ratios and goals", ""]
    ag, ll, ng = (r["targets"].get(n) for n in ("aiguillage", "litellm", "nginx"))

    def run_of(t: dict | None, rate: int) -> dict | None:
        return (t or {}).get("fixed", {}).get(str(rate))

    def added(t: dict | None, rate: int, p: str) -> float | None:
        d = run_of(direct, rate)
        return _sub(_lat(run_of(t, rate), p), _lat(d, p))

    def ratio(rate: int, p: str) -> str:
        a, b = added(ag, rate, p), added(ll, rate, p)
        if a is None or b is None:
            return "—"
        sat = (run_of(ll, rate) or {}).get("saturated")
        if a <= 0.001:
            return f"LiteLLM +{b:.3f} ms vs Aiguillage +{a:.3f} ms"
        return f"{'≥ ' if sat else ''}{b / a:.0f}×{' (LiteLLM saturated)' if sat else ''}"

    for rate in r["params"]["rates"]:
        lines.append(
            f"- {rate} req/s: LiteLLM added ÷ Aiguillage added: p50 {ratio(rate, 'p50')},"
            f" p99 {ratio(rate, 'p99')}; Aiguillage added − nginx added: p50 "
            f"{fmt(_sub(added(ag, rate, 'p50'), added(ng, rate, 'p50')))} ms, p99 "
            f"{fmt(_sub(added(ag, rate, 'p99'), added(ng, rate, 'p99')))} ms"
        )
    if ag and ng and ag.get("max_ns") and ng.get("max_ns"):
        lines.append(
            f"- max throughput: Aiguillage {fmt(ag['max_ns']['rps'], 0)} req/s = "
            f"{ag['max_ns']['rps'] / ng['max_ns']['rps'] * 100:.1f} % of nginx's; "
            + (
                f"LiteLLM {fmt(ll['max_ns']['rps'], 0)} req/s "
                f"({ag['max_ns']['rps'] / ll['max_ns']['rps']:.0f}× less than Aiguillage)"
                if ll and ll.get("max_ns") and ll["max_ns"].get("rps")
                else ""
            )
        )
    if ag:
        a50, a99 = added(ag, 500, "p50"), added(ag, 500, "p99")
        mx = (ag.get("max_ns") or {}).get("rps")
        lines += [
            "",
            f"- goal: added p50 ≤ 0.3 ms at 500 req/s: {fmt(a50)} ms → "
            f"{'met' if a50 is not None and a50 <= 0.3 else 'NOT met'}",
            f"- goal: added p99 ≤ 1.5 ms at 500 req/s: {fmt(a99)} ms → "
            f"{'met' if a99 is not None and a99 <= 1.5 else 'NOT met'}",
            f"- goal: ≥ 3,000 req/s for one worker: {fmt(mx, 0)} req/s → "
            f"{'met' if mx and mx >= 3000 else 'NOT met'}",
        ]
        checks = []
        for rate in r["params"]["rates"]:
            a, b = added(ag, rate, "p50"), added(ll, rate, "p50")
            if a is not None and b is not None:
                checks.append(a <= 0.001 or b / a >= 10)
        lines.append(
            f"- goal: ≥ 10× less added latency than LiteLLM (p50, every rate measured): "
            f"{'met' if checks and all(checks) else 'NOT met' if checks else '—'}"
        )
    return "\n".join(lines) + "\n"


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def render_profile(p: dict) -> str:
    if not p or "self_top" not in p:
        return f"Profile: not available ({p.get('error') if p else 'not run'})\n"
    load = p["load"]
    rps = load.get("rps") or load.get("achieved_rps")
    lines = [
        f"py-spy ({p.get('mode', '')}) took {p.get('samples')} samples of the serving "
        f"process (pid {p['pid']}, idle samples dropped) during {p.get('seconds')} s of "
        f"load at {rps} req/s non-stream (proxy CPU {load.get('proxy_cpu_util')} cores, "
        f"steal {load.get('steal_cores')} cores). Raw collapsed stacks: "
        f"`{p['raw_file']}` (drop it on https://www.speedscope.app or flamegraph.pl).",
        "",
        "Self time (the innermost Python frame; time in C code such as a socket write "
        "counts for the Python function that called it):",
        "",
        "| self % | function (file) |",
        "|---:|---|",
    ]
    lines += [f"| {s} | `{f}` |" for f, s in p["self_top"][:20]]
    lines += [
        "",
        "Inclusive time, Aiguillage and uvicorn protocol functions:",
        "",
        "| inclusive % | function (file) |",
        "|---:|---|",
    ]
    lines += [f"| {s} | `{f}` |" for f, s in p.get("inclusive_ours", p["inclusive_top"])[:25]]
    lines += ["", "Self time by module:", "", "| self % | module |", "|---:|---|"]
    lines += [f"| {s} | `{f}` |" for f, s in p["self_by_module"][:15]]
    return "\n".join(lines) + "\n"


def update_results_md(section: str) -> None:
    path = BENCH / "RESULTS.md"
    begin, end = "<!-- overhead:begin -->", "<!-- overhead:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{section}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="direct,nginx,aiguillage,litellm")
    ap.add_argument(
        "--rates",
        default="20,100,500,1000",
        help="fixed rates, non-stream (20: one that LiteLLM sustains)",
    )
    ap.add_argument("--duration", type=float, default=12, help="seconds measured per fixed rate")
    ap.add_argument("--warmup", type=float, default=2, help="warm-up seconds before each rate")
    ap.add_argument("--max-duration", type=float, default=10, help="seconds per wrk run")
    ap.add_argument("--max-conns", type=int, default=32, help="wrk connections")
    ap.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs of each step per target; the least disturbed one is kept",
    )
    ap.add_argument("--stream-rates", default="20,200", help="fixed rates for stream runs")
    ap.add_argument("--profile", action="store_true", help="py-spy Aiguillage under load")
    ap.add_argument(
        "--profile-rate",
        type=float,
        default=500,
        help="fixed rate of the second profile (the first is flat out)",
    )
    ap.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="wait before each target until other work uses fewer cores than this",
    )
    ap.add_argument(
        "--quiet-wait", type=float, default=45, help="at most this long (s) before each step"
    )
    ap.add_argument(
        "--quiet-budget",
        type=float,
        default=360,
        help="at most this long (s) of such waits over the whole run",
    )
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--command", default="", help="the command line, for the report")
    args = ap.parse_args()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    atexit.register(stop_all)

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    rates = [int(x) for x in args.rates.split(",")]
    stream_rates = [int(x) for x in args.stream_rates.split(",")]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logdir = OUT / f"overhead-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="aiguillage-bench-"))
    results: dict = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": args.command or " ".join(sys.argv),
        "machine": machine(),
        "params": {
            "rates": rates,
            "duration": args.duration,
            "warmup": args.warmup,
            "max_duration": args.max_duration,
            "max_conns": args.max_conns,
            "stream_rates": stream_rates,
            "repeat": args.repeat,
        },
        "targets": {},
    }
    print(f"logs: {logdir}\ntmp: {tmp}", flush=True)
    engine = start_nginx(write_engine_conf(tmp), tmp, ENGINE_CORE, logdir / "engine.log")
    Meter.engine_pid = engine.pid
    running: dict[str, tuple[Target, dict]] = {}
    entries: dict[str, dict] = {}

    def attempt(name: str, what: str, fn):
        """Run one step for one target; a failure is recorded and that target dropped."""
        try:
            return fn()
        except Exception as err:
            entries[name]["error"] = f"{what}: {type(err).__name__}: {err}"
            print(f"   ERROR {name}: {entries[name]['error']}", flush=True)
            tgt, _ = running.pop(name, (None, None))
            if tgt is not None:
                tgt.stop()
            return None

    quiet_left = [args.quiet_budget]

    def isolate(name: str | None, wait: bool = True) -> float:
        """Freeze (SIGSTOP) every other proxy so that only `name` runs on the proxy core,
        then wait (bounded) for the machine to be quiet.  Returns the busy cores seen."""
        for other, (tgt, _) in running.items():
            if tgt.proc is not None and tgt.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(tgt.proc.pid, signal.SIGCONT if other == name else signal.SIGSTOP)
        if not wait:
            return 0.0
        # per step at most --quiet-wait s, over the whole run at most --quiet-budget s
        t0 = time.monotonic()
        limit = max(min(args.quiet_wait, quiet_left[0]), 0.0)
        busy = wait_quiet(args.quiet_threshold, limit)
        quiet_left[0] -= time.monotonic() - t0 - 1.0
        return busy

    try:
        wait_port(ENGINE_NS, 10, engine)
        wait_port(ENGINE_ST, 10, engine)
        # 1. start every target (proxies on core 0, idle while the others are measured)
        for name in targets:
            entries[name] = results["targets"][name] = {"name": name}
            tgt = Target(name, tmp, logdir)
            running[name] = (tgt, {})

            def start(tgt: Target = tgt, name: str = name) -> dict:
                print(f"== starting {name}", flush=True)
                info = tgt.start()
                wait_ready(info, 180, tgt.proc)
                entries[name]["version"] = info.get("version")
                s1, b1 = post(
                    info["port_ns"], request_body(info["model_ns"], False), info["headers"]
                )
                s2, b2 = post(
                    info["port_st"], request_body(info["model_st"], True), info["headers"]
                )
                (logdir / f"{name}-sample.json").write_bytes(b1)
                (logdir / f"{name}-sample-stream.txt").write_bytes(b2)
                entries[name]["sample"] = {
                    "status": s1,
                    "stream_status": s2,
                    "stream_events": b2.count(b"data:"),
                }
                print(
                    f"   {name} {info.get('version')}: sample {s1}, stream {s2} with "
                    f"{b2.count(b'data:')} data: lines",
                    flush=True,
                )
                if s1 != 200 or s2 != 200:
                    raise RuntimeError(
                        f"sample requests failed: {s1} {b1[:300]!r} / {s2} {b2[:300]!r}"
                    )
                return info

            info = attempt(name, "start", start)
            if info is not None:
                running[name] = (tgt, info)
                isolate(None, wait=False)  # freeze it (and the others) until its turn

        # Every step runs each target in turn (the others frozen), `--repeat` times over;
        # the repetition with the least interference (steal + other work) is the one kept.
        def keep(name: str, group: str, key: str, res: dict) -> None:
            entries[name].setdefault(group + "_all", {}).setdefault(key, []).append(res)
            cur = entries[name].setdefault(group, {}).get(key)
            if cur is None or res["interference_cores"] < cur["interference_cores"]:
                entries[name][group][key] = res

        def at_fixed_rates(stream: bool, rates: list[int], group: str) -> None:
            """Every target at one rate, then the next rate, `--repeat` times each."""
            for rate in rates:
                for rep in range(args.repeat):
                    for name in list(running):
                        info = running[name][1]
                        busy = isolate(name)
                        label = f"{'stream ' if stream else ''}{rate} req/s"
                        res = attempt(
                            name,
                            label,
                            lambda info=info, rate=rate: run_loadgen(
                                info, stream, rate, args.duration, args.warmup, tmp
                            ),
                        )
                        if res is None:
                            continue
                        res["machine_busy_before"] = busy
                        keep(name, group, str(rate), res)
                        latency = (
                            f"ttfb p50 {_ms(res, 'ttfb_ms', 'p50')} ms, total p50 "
                            f"{_ms(res, 'latency_ms', 'p50')} ms p99 "
                            f"{_ms(res, 'latency_ms', 'p99')} ms, events/response "
                            f"{res['events_per_response']['mean']}"
                            if stream
                            else f"p50 {_ms(res, 'latency_ms', 'p50')} ms, p99 "
                            f"{_ms(res, 'latency_ms', 'p99')} ms, achieved "
                            f"{res['achieved_rps']:.0f}, send lag p99 "
                            f"{_ms(res, 'send_lag_ms', 'p99')} ms, errors {res['errors']}, "
                            f"non2xx {res['non2xx']}, unfinished {res['unfinished']}"
                        )
                        print(
                            f"   {label:>17} {name:>10} #{rep + 1}: {latency}, proxy CPU "
                            f"{res.get('proxy_cpu_us_per_req')} us/req, steal "
                            f"{res['steal_cores']}, others {res['others_cores']}"
                            f"{', SATURATED' if res['saturated'] else ''}",
                            flush=True,
                        )

        # 2. fixed rates, non-stream; 3. stream at fixed rates (events per answer, TTFB)
        at_fixed_rates(False, rates, "fixed")
        at_fixed_rates(True, stream_rates, "stream_fixed")
        # 4. maximum throughput (closed loop, wrk)
        for stream, key in ((False, "max_ns"), (True, "max_st")):
            for rep in range(args.repeat):
                for name in list(running):
                    info = running[name][1]
                    isolate(name)
                    w = attempt(
                        name,
                        key,
                        lambda info=info, stream=stream: run_wrk(
                            info, stream, args.max_duration, args.max_conns, tmp
                        ),
                    )
                    if w is None:
                        continue
                    kind = "stream" if stream else "plain"
                    (logdir / f"{name}-wrk-{kind}-{rep + 1}.txt").write_text(w.pop("raw"))
                    keep(name, "max", key, w)
                    print(
                        f"   max {kind:>6} {name:>10} #{rep + 1}: {w['rps']} req/s, p50 "
                        f"{w.get('p50_ms')} ms, p99 {w.get('p99_ms')} ms, non2xx "
                        f"{w['non2xx']}, socket errors {w['socket_errors']}, proxy CPU "
                        f"{w.get('proxy_cpu_util')}, steal {w['steal_cores']}, others "
                        f"{w['others_cores']}",
                        flush=True,
                    )
        for entry in entries.values():
            for key, w in entry.get("max", {}).items():
                entry[key] = w
        # 5. where Aiguillage spends its time
        if args.profile and "aiguillage" in running:
            for prate in (0.0, args.profile_rate):
                label = "flat out (wrk)" if prate <= 0 else f"{prate:g} req/s"
                print(f"   profiling aiguillage with py-spy, {label} ...", flush=True)
                isolate("aiguillage")
                prof = attempt(
                    "aiguillage",
                    "profile",
                    lambda prate=prate: profile(running["aiguillage"][1], tmp, 12, prate, logdir),
                )
                if prof is None:
                    break
                results.setdefault("profile", {})[label] = prof
                entries["aiguillage"].setdefault("profile", {})[label] = prof
    finally:
        for tgt, _ in running.values():
            tgt.stop()
        stop(engine)
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    (logdir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    section = f"## Overhead benchmark — {results['date']}\n\n" + render(results)
    for label, prof in results.get("profile", {}).items():
        section += f"\n### Where Aiguillage spends its time (py-spy, {label})\n\n" + render_profile(
            prof
        )
    errors = {n: t["error"] for n, t in results["targets"].items() if "error" in t}
    if errors:
        section += "\nErrors: " + "; ".join(f"{n}: {e}" for n, e in errors.items()) + "\n"
    (logdir / "results.md").write_text(section)
    shutil.copy(logdir / "results.md", OUT / "overhead-latest.md")
    if not args.no_write:
        update_results_md(section)
    print(section)
    print(f"results: {logdir}/results.json")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
