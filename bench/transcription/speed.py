"""Transcription speed of the embedded engines on this CPU: real-time factor per model.

    PYTHONPATH=src python bench/transcription/speed.py --seconds 60 --threads 2

espeak-ng reads a lecture-like text until the audio lasts `--seconds`; each model
transcribes it once to warm up (model load, first allocation) and `--runs` times
measured. RTF = processing time / audio duration (below 1: faster than real time).
The word error rate is not measured: the synthetic voice says nothing about real speech.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from aiguillage.speech.engines import LocalWhisper
from aiguillage.speech.media import decode

TEXT = (
    "Good morning everyone. Today we continue our course on linear algebra. "
    "Last week we saw how to multiply two matrices, and why the order matters. "
    "This morning we will look at determinants, then at eigenvalues and eigenvectors, "
    "which appear everywhere from mechanics to the ranking of web pages. "
)


def lecture(seconds: float, directory: Path) -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is needed: apt-get install -y espeak-ng")
    text = TEXT
    while True:
        path = directory / "lecture.wav"
        subprocess.run([espeak, "-v", "en-us", "-w", str(path), text], check=True)
        if decode(path).duration >= seconds:
            return path
        text += TEXT


async def measure(model: str, media: Path, threads: int, runs: int) -> list[float]:
    engine = LocalWhisper(model, cpu_threads=threads)
    await engine.transcribe(media, language="en")  # warm-up
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        await engine.transcribe(media, language="en")
        timings.append(time.perf_counter() - started)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        media = lecture(options.seconds, Path(directory))
        duration = decode(media).duration
        print(
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} · {platform.processor() or ''}"
            f" nproc={os.cpu_count()} · load {os.getloadavg()[0]:.2f} · audio {duration:.1f} s"
            f" · cpu_threads={options.threads}"
        )
        print("| model | runs (s) | best RTF | audio seconds per second |")
        print("|---|---|---:|---:|")
        for model in options.models:
            timings = asyncio.run(measure(model, media, options.threads, options.runs))
            best = min(timings)
            runs = ", ".join(f"{t:.1f}" for t in timings)
            print(f"| {model} | {runs} | {best / duration:.3f} | {duration / best:.1f} |")


if __name__ == "__main__":
    main()
