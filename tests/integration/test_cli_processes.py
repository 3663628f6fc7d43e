"""The commands a user types, run as real processes: `aiguillage demo` and `aiguillage serve`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from aiguillage.backends.local_engine import EngineUnavailable, free_port, llama_server_binary
from tests.fakes.engine import FakeEngine
from tests.harness import wait_until_answering
from tests.speech.conftest import speak

AIGUILLAGE = [sys.executable, "-m", "aiguillage.cli"]


@pytest.fixture
def stop_at_end() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_demo_serves_a_real_model_and_stops_its_engines(
    tmp_path: Path, stop_at_end: list[subprocess.Popen[bytes]]
) -> None:
    try:
        llama_server_binary()
    except EngineUnavailable as error:
        pytest.skip(f"llama.cpp engine unavailable: {error}")
    port = free_port()
    demo = subprocess.Popen(
        [*AIGUILLAGE, "demo", "--port", str(port), "--engines", "1", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    stop_at_end.append(demo)
    url = f"http://127.0.0.1:{port}"
    wait_until_answering(url, demo)
    key = (tmp_path / "demo-key.txt").read_text().strip()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content
    speech = speak("The students are learning mathematics.", tmp_path / "speech.wav")
    transcript = client.audio.transcriptions.create(
        model="whisper-base", file=speech.open("rb"), response_format="text", language="en"
    )
    assert "mathematics" in str(transcript).lower()
    models = yaml.safe_load((tmp_path / "demo.yaml").read_text())["models"]
    engine_url, whisper_url = (model["servers"][0]["url"] for model in models)
    demo.send_signal(signal.SIGINT)
    output = demo.communicate(timeout=30)[0].decode()
    assert demo.returncode == 0, output
    assert key in output and "curl" in output and "from openai import OpenAI" in output
    for url in (engine_url, whisper_url):
        with pytest.raises(httpx.TransportError):  # the engines went away with the demo
            httpx.get(f"{url}/health", timeout=2)


def test_the_demo_s_engines_stop_when_the_demo_is_killed(
    tmp_path: Path, stop_at_end: list[subprocess.Popen[bytes]]
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    try:
        llama_server_binary()
    except EngineUnavailable as error:
        pytest.skip(f"llama.cpp engine unavailable: {error}")
    port = free_port()
    options = ["--port", str(port), "--engines", "1", "--no-whisper", "--workdir", str(tmp_path)]
    demo = subprocess.Popen(
        [*AIGUILLAGE, "demo", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    stop_at_end.append(demo)
    wait_until_answering(f"http://127.0.0.1:{port}", demo)
    engine_url = yaml.safe_load((tmp_path / "demo.yaml").read_text())["models"][0]["servers"][0]
    assert httpx.get(f"{engine_url['url']}/health", timeout=5).status_code == 200
    demo.kill()  # no chance to stop its engines itself
    demo.wait(10)
    deadline = time.monotonic() + 15
    while True:
        try:
            httpx.get(f"{engine_url['url']}/health", timeout=1)
        except httpx.TransportError:
            break  # the engine went with its parent
        assert time.monotonic() < deadline, "the engine outlived the killed demo"
        time.sleep(0.2)


def test_serve_with_two_workers_shares_keys_and_sums_metrics(
    tmp_path: Path, fake_engine: FakeEngine, stop_at_end: list[subprocess.Popen[bytes]]
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": database_url,
                "models": [{"name": "fake", "servers": [{"url": fake_engine.url("ok")}]}],
            }
        )
    )
    created = subprocess.run(
        [
            *AIGUILLAGE,
            "keys",
            "create",
            "--name",
            "w",
            "--org",
            "o",
            "--json",
            "--config",
            str(config),
        ],
        check=True,
        capture_output=True,
    )
    key = json.loads(created.stdout)["key"]
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    server = subprocess.Popen(
        [*AIGUILLAGE, "serve", "--config", str(config), "--port", str(port), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    stop_at_end.append(server)
    url = f"http://127.0.0.1:{port}"
    wait_until_answering(url, server)
    for _ in range(20):  # new connections each time, so both workers get some
        response = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "fake", "messages": []},
            timeout=10,
        )
        assert response.status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    line = next(
        line
        for line in metrics.splitlines()
        if line.startswith("aiguillage_requests_total{") and 'status="200"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) == 20.0  # summed over both workers
    # "liveall" gauges carry each worker's pid: both workers report into one /metrics
    pids = {
        part.split('pid="')[1].split('"')[0]
        for part in metrics.splitlines()
        if part.startswith("aiguillage_backend_up{")
    }
    assert len(pids) == 2
    server.send_signal(signal.SIGINT)
    server.wait(30)
