"""A small fake OpenAI-compatible engine for the failure paths a real engine won't show on demand.

Behaviour is chosen by the first path segment of the server URL, so one fake
serves many "backends": `http://127.0.0.1:PORT/ok`, `/status-503`, `/slow-2.5`,
`/die-mid-stream`, `/slow-stream-0.2`, `/down` (health 503). It runs on its own
thread and event loop, so sync and async tests can share it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from aiohttp import web


@dataclass
class Seen:
    """One request as the engine received it."""

    mode: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes


@dataclass
class EngineLog:
    requests: list[Seen] = field(default_factory=list)
    cancelled_streams: int = 0
    completed_streams: int = 0
    in_flight: int = 0  # inference requests being answered now, all modes together
    max_in_flight: int = 0  # the most ever answered at once: what a concurrency cap bounds

    def last(self) -> Seen:
        return self.requests[-1]


def _completion(model: str, text: str = "Hello from the fake engine.") -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
    }


def _chunk(model: str, content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


def _usage_event(model: str, completion: int) -> bytes:
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": 7,
            "completion_tokens": completion,
            "total_tokens": 7 + completion,
        },
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


class FakeEngine:
    WORDS: ClassVar[list[str]] = ["one", " two", " three", " four", " five"]

    def __init__(self) -> None:
        self.log = EngineLog()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, mode: str) -> str:
        return f"{self.base}/{mode}"

    def start(self) -> FakeEngine:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{mode}/health", self._health)
        app.router.add_route("*", "/{mode}/v1/models", self._models)
        app.router.add_route("POST", "/{mode}/v1/{endpoint:.*}", self._inference)
        # a request still held open (a slow mode) must not keep the shutdown waiting
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if request.match_info["mode"] == "down" else 200)

    async def _models(self, request: web.Request) -> web.Response:
        if request.match_info["mode"] == "down":
            return web.Response(status=503)
        return web.json_response({"object": "list", "data": []})

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        self.log.in_flight += 1
        self.log.max_in_flight = max(self.log.max_in_flight, self.log.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.log.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        raw = await request.read()
        body = orjson.loads(raw)
        self.log.requests.append(Seen(mode, request.path, dict(request.headers), body, raw))
        model = body.get("model", "?")
        if mode.startswith("status-"):
            status = int(mode.removeprefix("status-"))
            return web.json_response(
                {
                    "error": {
                        "message": f"fake engine says {status}",
                        "type": "engine_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=status,
                headers={"x-engine-detail": "kept"},
            )
        if mode.startswith("slow-") and not mode.startswith("slow-stream"):
            await asyncio.sleep(float(mode.removeprefix("slow-")))
        if request.match_info["endpoint"] == "embeddings":
            inputs = body.get("input")
            count = len(inputs) if isinstance(inputs, list) else 1
            return web.json_response(
                {
                    "object": "list",
                    "model": model,
                    "data": [
                        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                        for i in range(count)
                    ],
                    "usage": {"prompt_tokens": 3 * count, "total_tokens": 3 * count},
                }
            )
        if not body.get("stream"):
            return web.json_response(_completion(model), headers={"x-engine-detail": "kept"})
        return await self._stream(request, mode, body, model)

    async def _stream(
        self, request: web.Request, mode: str, body: Any, model: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        delay = float(mode.removeprefix("slow-stream-")) if mode.startswith("slow-stream-") else 0
        count = 200 if delay else len(self.WORDS)
        try:
            for index in range(count):
                await response.write(_chunk(model, self.WORDS[index % len(self.WORDS)]))
                if mode == "die-mid-stream" and index == 2:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if delay:
                    await asyncio.sleep(delay)
            await response.write(_chunk(model, None, "stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(_usage_event(model, count))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.log.cancelled_streams += 1
            raise
        self.log.completed_streams += 1
        return response
