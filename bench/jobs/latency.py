"""Transcription jobs end to end, as deployed: `aiguillage serve`, N `aiguillage worker`s, HTTP.

Speech comes from espeak-ng (the same sentence repeated up to the wanted duration).
Jobs are submitted at once; for each we read its history and report the time spent
waiting, transcribing (and the real-time factor: audio seconds per second of work)
and the total from creation to SUCCESS.

    python bench/jobs/latency.py --jobs 4 --workers 2 --seconds 60 --model tiny.en
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import yaml

SENTENCE = "Hello everyone. Today we will learn about the history of computers and the internet. "
SECONDS_PER_SENTENCE = 5.0  # espeak-ng at 140 words per minute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio length per job")
    parser.add_argument("--model", default="tiny.en")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run(Path(folder), args)


def run(folder: Path, args: argparse.Namespace) -> None:
    port = 18000 + os.getpid() % 1000
    config = folder / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": f"sqlite+aiosqlite:///{folder / 'db.sqlite'}",
                "jobs": {
                    "storage_dir": str(folder / "media"),
                    "poll_interval_s": 0.2,
                    "transcriber": {"engine": "local", "model": args.model},
                },
            }
        )
    )
    cli = [sys.executable, "-m", "aiguillage.cli"]
    client = json.loads(
        subprocess.run(
            [
                *cli,
                "clients",
                "create",
                "--name",
                "bench",
                "--org",
                "bench",
                "--json",
                "-c",
                str(config),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    wav = folder / "speech.wav"
    repeat = max(1, round(args.seconds / SECONDS_PER_SENTENCE))
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(wav), SENTENCE * repeat], check=True)
    quiet = subprocess.DEVNULL
    server = subprocess.Popen(
        [*cli, "serve", "-c", str(config), "--port", str(port), "--log-level", "warning"],
        stdout=quiet,
        stderr=quiet,
    )
    workers = [
        subprocess.Popen([*cli, "worker", "-c", str(config), "--log-level", "warning"])
        for _ in range(args.workers)
    ]
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(base)
        token = httpx.post(
            f"{base}/oauth/token",
            data={
                "grant_type": "client_credentials",
                **{k: client[k] for k in ("client_id", "client_secret")},
            },
        ).json()["access_token"]
        api = httpx.Client(base_url=base, headers={"authorization": f"Bearer {token}"}, timeout=60)
        ids = [
            api.post("/v1/transcription-jobs", files={"file": ("a.wav", wav.read_bytes())}).json()[
                "id"
            ]
            for _ in range(args.jobs)
        ]
        done = [_wait(api, job_id) for job_id in ids]
    finally:
        for process in (*workers, server):
            process.terminate()
        for process in (*workers, server):
            process.wait(60)
    report(done, args)


def _wait_until_up(base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the gateway did not start")


def _wait(api: httpx.Client, job_id: str) -> dict[str, object]:
    while True:
        job = api.get(f"/v1/transcription-jobs/{job_id}").json()
        if job["state"] in ("SUCCESS", "FAILURE"):
            return job  # type: ignore[no-any-return]
        time.sleep(0.2)


def _at(job: dict[str, object], state: str) -> float:
    for event in job["history"]:  # type: ignore[attr-defined]
        if event["state"] == state:
            return datetime.fromisoformat(event["at"]).timestamp()
    raise KeyError(state)


def report(jobs: list[dict[str, object]], args: argparse.Namespace) -> None:
    ok = [job for job in jobs if job["state"] == "SUCCESS"]
    waits = [_at(j, "TRANSCRIBING") - _at(j, "WAITING_TRANSCRIPTION") for j in ok]
    work = [_at(j, "SUCCESS") - _at(j, "TRANSCRIBING") for j in ok]
    total = [_at(j, "SUCCESS") - _at(j, "UPLOADING") for j in ok]
    duration = float(ok[0]["result"]["duration"]) if ok else 0.0  # type: ignore[index]
    when = datetime.now().isoformat(timespec="seconds")
    print(f"{when} · {platform.node()} · nproc {os.cpu_count()} · load {os.getloadavg()[0]:.2f}")
    print(
        f"model {args.model} · {args.jobs} jobs of {duration:.1f} s audio · {args.workers} workers"
    )
    print(
        "| jobs ok | wait p50 (s) | transcribe p50 (s) | real-time factor | total p50 / max (s) |"
    )
    print("|---:|---:|---:|---:|---:|")
    speed = duration / statistics.median(work)
    print(
        f"| {len(ok)}/{len(jobs)} | {statistics.median(waits):.2f} | {statistics.median(work):.2f}"
        f" | {speed:.1f}× | {statistics.median(total):.2f} / {max(total):.2f} |"
    )


if __name__ == "__main__":
    main()
