"""OpenAI-compatible HTTP in front of emulated engines, many engines in one process.

Each engine listens on its own port, like a fleet of vLLM servers, but all share
one event loop: an idle engine costs nothing and a busy one a timer per token, so
dozens fit on a laptop next to the gateway under test.

What a client sees follows vLLM: SSE chunks in OpenAI's format, a last chunk with
`finish_reason`, a usage chunk when `stream_options.include_usage` is true, then
`data: [DONE]`; a client that disconnects aborts its sequence and frees its slot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aiguillage.emulator.engine import (
    AsyncEngine,
    EmulatedEngine,
    EngineProfile,
    Sequence,
    token_text,
)

DEFAULT_MODEL = "emulated"


@dataclass(frozen=True)
class EngineSpec:
    """One engine to serve: its behaviour, its port (0: any free one), its model name."""

    profile: EngineProfile = field(default_factory=EngineProfile)
    port: int = 0
    model: str = DEFAULT_MODEL


@dataclass
class RunningEngine:
    """A served engine: `url` to point the gateway at, `engine` to inspect in tests."""

    spec: EngineSpec
    engine: AsyncEngine
    url: str
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.runner.cleanup()
        self.engine.close()


class _BadRequest(Exception):
    pass


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    document = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.Response(status=status, body=orjson.dumps(document), content_type="application/json")


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a multi-part content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def prompt_of(body: dict[str, Any], chat: bool) -> str:
    """The text the engine "prefills": roles and contents in order, or the raw prompt.

    Roles are kept so that a shared system prompt is a shared prefix, as it is
    after a real chat template.
    """
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("`messages` must be a non-empty list")
        return "".join(
            f"<|{message.get('role', '')}|>{_text_of(message.get('content'))}\n"
            for message in messages
            if isinstance(message, dict)
        )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(item, str) for item in prompt):
        return "".join(prompt)
    raise _BadRequest("`prompt` must be a string or a list of strings")


def max_tokens_of(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _BadRequest("`max_tokens` must be a positive integer")
    return value


def _usage(seq: Sequence) -> dict[str, Any]:
    return {
        "prompt_tokens": seq.prompt_tokens,
        "completion_tokens": seq.generated,
        "total_tokens": seq.prompt_tokens + seq.generated,
        "prompt_tokens_details": {"cached_tokens": seq.cached_tokens},
    }


class _Api:
    """The HTTP routes of one engine."""

    def __init__(self, engine: AsyncEngine, model: str) -> None:
        self.engine = engine
        self.model = model
        self.created = int(time.time())

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
        }
        return web.json_response({"object": "list", "data": [card]}, dumps=_dumps)

    async def metrics(self, request: web.Request) -> web.Response:
        self.engine.sync()
        body = generate_latest(self.engine.engine.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise _BadRequest("the body must be a JSON object")
            prompt = prompt_of(body, chat)
            max_tokens = max_tokens_of(body)
        except orjson.JSONDecodeError:
            return _error(400, "the body is not valid JSON")
        except _BadRequest as error:
            return _error(400, str(error))
        model = body.get("model")
        if model is not None and model != self.model:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")

        seq = self.engine.submit(prompt, max_tokens, ignore_eos=body.get("ignore_eos") is True)
        try:
            if body.get("stream") is True:
                options = body.get("stream_options")
                usage = isinstance(options, dict) and options.get("include_usage") is True
                return await self._stream(request, seq, chat, usage)
            await self.engine.wait_done(seq)
            answer = orjson.dumps(self._answer(seq, chat))
            return web.Response(body=answer, content_type="application/json")
        finally:
            # Client gone (handler cancelled, or a write failed): free the slot, as vLLM does.
            self.engine.abort(seq)

    def _answer(self, seq: Sequence, chat: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": seq.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": seq.text()}
        else:
            choice["text"] = seq.text()
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": _usage(seq),
        }

    async def _stream(
        self, request: web.Request, seq: Sequence, chat: bool, include_usage: bool
    ) -> web.StreamResponse:
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
        }

        def event(choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> bytes:
            document: dict[str, Any] = {**head, "choices": [] if choice is None else [choice]}
            if usage is not None:
                document["usage"] = usage
            return b"data: " + orjson.dumps(document) + b"\n\n"

        def token(index: int, finish: str | None = None) -> bytes:
            text = "" if finish else token_text(index)
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text} if not finish else {}
            else:
                choice["text"] = text
            return event(choice)

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            sent = 0
            while not seq.done:
                count = await self.engine.next_tokens(seq, sent)
                if count > sent:
                    chunks = [token(index) for index in range(sent, count)]
                    if chat and sent == 0:
                        role = {"role": "assistant", "content": ""}
                        first = {"index": 0, "delta": role, "logprobs": None, "finish_reason": None}
                        chunks.insert(0, event(first))
                    await response.write(b"".join(chunks))
                    sent = count
            tail = [token(sent, seq.finish_reason or "abort")]
            if include_usage:
                tail.append(event(None, _usage(seq)))
            tail.append(b"data: [DONE]\n\n")
            await response.write(b"".join(tail))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left; the caller's `finally` aborts the sequence
        return response


def _dumps(document: Any) -> str:
    return orjson.dumps(document).decode()


def build_app(engine: AsyncEngine, model: str = DEFAULT_MODEL) -> web.Application:
    api = _Api(engine, model)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", api.health)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/completions", api.completions)
    return app


async def serve_engines(specs: list[EngineSpec], host: str = "127.0.0.1") -> list[RunningEngine]:
    """Start one HTTP server per spec on the running loop; stop them with `stop_engines`."""
    started: list[RunningEngine] = []
    try:
        for spec in specs:
            engine = AsyncEngine(EmulatedEngine(spec.profile, spec.model))
            # handler_cancellation: a disconnect cancels the handler even while the
            # request is still queued or non-streaming, so its slot is freed at once.
            runner = web.AppRunner(
                build_app(engine, spec.model), access_log=None, handler_cancellation=True
            )
            await runner.setup()
            await web.TCPSite(runner, host, spec.port).start()
            port = int(runner.addresses[0][1])
            started.append(RunningEngine(spec, engine, f"http://{host}:{port}", runner))
    except BaseException:
        await stop_engines(started)
        raise
    return started


async def stop_engines(engines: list[RunningEngine]) -> None:
    for running in engines:
        await running.stop()


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text}") from None


def parse_args(argv: list[str] | None = None) -> tuple[list[EngineSpec], str]:
    """The command line, as engine specs and the host to listen on."""
    parser = argparse.ArgumentParser(
        prog="python -m aiguillage.emulator",
        description="Emulated vLLM engines (OpenAI-compatible HTTP) for scale tests without GPUs.",
    )
    add = parser.add_argument
    add("--engines", type=int, default=4, help="number of engines (default 4)")
    add("--base-port", type=int, default=9001, help="first port, then +1 each (0: any free)")
    add("--host", default="127.0.0.1", help="address to listen on")
    add("--model", default=DEFAULT_MODEL, help="served model name")
    add("--max-num-seqs", type=int, default=4, help="sequences running at once per engine")
    add("--ttft", type=float, default=0.1, help="fixed prefill time, seconds")
    add("--prefill-per-1k", type=float, default=0.1, help="prefill seconds per 1000 prompt tokens")
    add("--ttft-growth", type=float, default=0.25, help="TTFT growth per other running sequence")
    add("--itl", type=float, default=0.02, help="inter-token latency at batch 1, seconds")
    add("--itl-growth", type=float, default=0.1, help="ITL growth per extra running sequence")
    add("--max-tokens", type=int, default=64, help="answer length when the request sets none")
    add("--slowdown", type=_floats, default=[1.0], help="one factor, or one per engine: 1,2,1,1")
    add("--no-prefix-cache", action="store_true", help="disable the emulated prefix cache")
    args = parser.parse_args(argv)
    if args.engines < 1:
        parser.error("--engines must be at least 1")
    slowdowns: list[float] = args.slowdown
    if len(slowdowns) == 1:
        slowdowns = slowdowns * args.engines
    if len(slowdowns) != args.engines:
        parser.error(f"--slowdown needs 1 or {args.engines} values, got {len(slowdowns)}")
    specs = []
    for index, slowdown in enumerate(slowdowns):
        try:
            profile = EngineProfile(
                max_num_seqs=args.max_num_seqs,
                base_ttft_s=args.ttft,
                prefill_s_per_1k_tokens=args.prefill_per_1k,
                ttft_growth=args.ttft_growth,
                base_itl_s=args.itl,
                itl_growth=args.itl_growth,
                default_max_tokens=args.max_tokens,
                prefix_cache=not args.no_prefix_cache,
                slowdown=slowdown,
            )
        except ValueError as error:
            parser.error(str(error))
        port = args.base_port + index if args.base_port else 0
        specs.append(EngineSpec(profile=profile, port=port, model=args.model))
    return specs, args.host


async def _serve_until_stopped(specs: list[EngineSpec], host: str) -> None:
    engines = await serve_engines(specs, host)
    for running in engines:
        profile = running.spec.profile
        print(
            f"{running.url}  model={running.spec.model} max_num_seqs={profile.max_num_seqs} "
            f"slowdown={profile.slowdown:g} prefix_cache={'on' if profile.prefix_cache else 'off'}",
            flush=True,
        )
    print("Ctrl-C to stop.", flush=True)
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await stop_engines(engines)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> None:
    """`python -m aiguillage.emulator …`: serve until Ctrl-C (or SIGTERM)."""
    specs, host = parse_args(argv)
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=_loop_factory()) as runner,
    ):
        runner.run(_serve_until_stopped(specs, host))
