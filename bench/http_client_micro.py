"""Micro-benchmark: aiohttp's ClientSession against HttpPool, relaying to a fixed JSON answer.

    .venv/bin/python bench/http_client_micro.py [--seconds 2.5]

The engine is an aiohttp.web app in a child process on 127.0.0.1 answering a fixed JSON
body; the client runs on uvloop in this process. Where there are two cores or more, the
client and the server are pinned to different ones, so "client CPU us/req" (process CPU
time of the client divided by requests) is the client's own cost, whatever the server's
speed. Each client runs sequentially, then with 16 concurrent requests, for --seconds each
(so about 5 s per client by default). The server process is ended by its id at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import time
from collections.abc import Awaitable, Callable

import aiohttp
import uvloop
from aiohttp import web

from aiguillage.backends.http_client import HttpPool

ANSWER = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":'
    b'[{"index":0,"message":{"role":"assistant","content":"Hello there!"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}'
)
BODY = b'{"model":"m","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'
HEADERS = [("Authorization", "Bearer sk-engine-token"), ("Content-Type", "application/json")]
PATH = "/v1/chat/completions"


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {core})


def _serve(port: int) -> None:
    _pin(1)

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post(PATH, answer)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _wait_for_server(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return
    raise RuntimeError("the server did not start")


async def _measure(one: Callable[[], Awaitable[None]], concurrency: int, seconds: float) -> str:
    for _ in range(200):  # warm up: open connections, fill caches
        await one()
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await one()
            count += 1

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return f"{count / wall:>9,.0f} {cpu / count * 1e6:>9.1f}"


async def _run(port: int, seconds: float) -> None:
    await _wait_for_server(port)
    base = f"http://127.0.0.1:{port}"

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )
    aiohttp_headers = dict(HEADERS)

    async def via_aiohttp() -> None:
        async with session.post(base + PATH, data=BODY, headers=aiohttp_headers) as resp:
            assert len(await resp.read()) == len(ANSWER)

    pool = HttpPool(base, connect_timeout_s=5, read_timeout_s=30)

    async def via_pool() -> None:
        resp = await pool.request("POST", PATH, HEADERS, BODY)
        try:
            assert len(await resp.read()) == len(ANSWER)
        finally:
            resp.release()

    print(f"{'client':<22}{'concurrency':>12}{'req/s':>10}{'client CPU us/req':>19}")
    for name, one in (("aiohttp ClientSession", via_aiohttp), ("HttpPool", via_pool)):
        for concurrency in (1, 16):
            result = await _measure(one, concurrency, seconds)
            print(f"{name:<22}{concurrency:>12}{result}")
    await session.close()
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="per client and concurrency")
    args = parser.parse_args()
    port = _free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port,), daemon=True)
    server.start()
    try:
        _pin(0)
        uvloop.run(_run(port, args.seconds))
    finally:
        server.terminate()
        server.join(5)


if __name__ == "__main__":
    main()
