"""HttpPool against real servers on 127.0.0.1: aiohttp.web for the usual, raw asyncio otherwise."""

from __future__ import annotations

import asyncio
import inspect
import logging
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
import uvloop
from aiohttp import web

from aiguillage.backends.http_client import (
    HttpPool,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from aiguillage.backends.local_engine import free_port


def _pool(url: str, *, read_timeout_s: float = 5.0, idle_ttl_s: float = 60.0) -> HttpPool:
    return HttpPool(
        url, connect_timeout_s=2.0, read_timeout_s=read_timeout_s, idle_ttl_s=idle_ttl_s
    )


@pytest.fixture(autouse=True)
def no_errors_from_loop_callbacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing may escape from a protocol callback or a forgotten future into the loop's log."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# aiohttp.web server


class WebServer:
    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []  # one entry per request: the client's address
        self.second_chunk_sent_at = 0.0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_get("/json", self.json)
        app.router.add_post("/echo", self.echo)
        app.router.add_get("/item/{n}", self.item)
        app.router.add_get("/empty", self.empty)
        app.router.add_get("/stream", self.stream)
        app.router.add_get("/big", self.big)
        return app

    def _seen(self, request: web.Request) -> None:
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))

    async def json(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.json_response(
            {"path": request.path_qs, "auth": request.headers.get("Authorization")},
            headers={"X-Engine-Id": "e1"},
        )

    async def echo(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=await request.read(), content_type="application/octet-stream")

    async def item(self, request: web.Request) -> web.Response:
        self._seen(request)
        n = int(request.match_info["n"])
        await asyncio.sleep((n % 5) / 200)
        return web.Response(text=f"item-{n}" * (n + 1))

    async def empty(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(status=204)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await asyncio.sleep(0.2)
        self.second_chunk_sent_at = asyncio.get_running_loop().time()
        await response.write(b"data: two\n\n")
        await response.write_eof()
        return response

    async def big(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=b"z" * (8 * 1024 * 1024))


@asynccontextmanager
async def started_web_server() -> AsyncIterator[tuple[WebServer, str]]:
    server = WebServer()
    runner = web.AppRunner(server.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def web_server() -> AsyncIterator[tuple[WebServer, str]]:
    async with started_web_server() as started:
        yield started


# raw asyncio servers for malformed, slow or dying engines

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.disconnected = asyncio.Event()
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.disconnected.set()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request head and body, or None when the client closed the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[RawServer, str]]:
    raw = RawServer(handler)
    server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield raw, f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def wait_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# usual answers


async def test_plain_json_and_headers(web_server: tuple[WebServer, str]) -> None:
    _, url = web_server
    pool = _pool(url + "/v1")  # a path prefix in base_url is ignored: the caller sends full paths
    resp = await pool.request("GET", "/json?x=1", [("Authorization", "Bearer k")])
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert resp.header("x-engine-id") == resp.header("X-ENGINE-ID") == "e1"
    assert resp.header("missing") is None
    assert any(name == b"X-Engine-Id" for name, _ in resp.headers)  # raw case kept
    assert orjson.loads(await resp.read()) == {"path": "/json?x=1", "auth": "Bearer k"}
    resp.release()
    resp.release()  # idempotent
    await pool.close()


async def test_keep_alive_reuses_one_connection(web_server: tuple[WebServer, str]) -> None:
    server, url = web_server
    pool = _pool(url)
    for _ in range(5):
        resp = await pool.request("GET", "/json", [])
        assert resp.status == 200
        await resp.read()
        resp.release()
    assert len(server.peers) == 5
    assert len(set(server.peers)) == 1
    await pool.close()


async def test_chunked_stream_arrives_progressively(web_server: tuple[WebServer, str]) -> None:
    server, url = web_server
    pool = _pool(url)
    resp = await pool.request("GET", "/stream", [])
    assert (resp.header("transfer-encoding") or "").lower() == "chunked"
    received: list[tuple[bytes, float]] = []
    async for chunk in resp.iter_chunks():
        received.append((chunk, asyncio.get_running_loop().time()))
    assert b"".join(c for c, _ in received) == b"data: one\n\ndata: two\n\n"
    assert received[0][0] == b"data: one\n\n"
    assert received[0][1] < server.second_chunk_sent_at
    resp.release()
    await pool.close()


async def test_204_and_head_have_no_body_and_keep_the_connection(
    web_server: tuple[WebServer, str],
) -> None:
    server, url = web_server
    pool = _pool(url)
    resp = await pool.request("GET", "/empty", [])
    assert resp.status == 204
    assert await resp.read() == b""
    resp = await pool.request("HEAD", "/big", [])  # Content-Length: 8 MiB, but no body follows
    assert resp.status == 200
    assert resp.header("content-length") == str(8 * 1024 * 1024)
    assert await resp.read() == b""
    resp = await pool.request("GET", "/json", [])
    assert resp.status == 200
    assert orjson.loads(await resp.read())["path"] == "/json"
    assert len(set(server.peers)) == 1
    await pool.close()


async def test_concurrent_requests(web_server: tuple[WebServer, str]) -> None:
    server, url = web_server
    pool = _pool(url)

    async def one(n: int) -> bytes:
        resp = await pool.request("GET", f"/item/{n}", [])
        try:
            return await resp.read()
        finally:
            resp.release()

    bodies = await asyncio.gather(*(one(n) for n in range(50)))
    assert bodies == [f"item-{n}".encode() * (n + 1) for n in range(50)]
    # The second wave reuses the pooled connections instead of opening new ones.
    opened = len(set(server.peers))
    await asyncio.gather(*(one(n) for n in range(50)))
    assert len(set(server.peers)) == opened
    await pool.close()


async def test_large_body_round_trip(web_server: tuple[WebServer, str]) -> None:
    _, url = web_server
    pool = _pool(url)
    body = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    resp = await pool.request("POST", "/echo", [("Content-Type", "application/octet-stream")], body)
    assert resp.status == 200
    assert await resp.read() == body
    await pool.close()


async def test_slow_reader_pauses_the_socket(web_server: tuple[WebServer, str]) -> None:
    _, url = web_server
    pool = _pool(url)
    resp = await pool.request("GET", "/big", [])
    chunks = resp.iter_chunks()
    total = len(await anext(chunks))
    await asyncio.sleep(0.3)  # the server could send all 8 MiB meanwhile
    conn = resp._conn
    assert conn is not None
    assert conn._buffered <= 2 * 1024 * 1024
    async for chunk in chunks:
        total += len(chunk)
    assert total == 8 * 1024 * 1024
    await pool.close()


# framing edge cases


async def test_close_delimited_body_is_read_to_eof_and_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        request = await raw.read_request(reader)
        assert request is not None
        version = b"1.0" if b"/old" in request else b"1.1"
        writer.write(b"HTTP/" + version + b" 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        writer.write(b"until the end")
        await writer.drain()

    async with raw_server(handler) as (raw, url):
        pool = _pool(url)
        for path in ("/old", "/new"):
            resp = await pool.request("GET", path, [])
            assert await resp.read() == b"until the end"
        assert raw.connections == 2
        await pool.close()


async def test_interim_1xx_response_is_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while await raw.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)

    async with raw_server(handler) as (raw, url):
        pool = _pool(url)
        for _ in range(2):
            resp = await pool.request("POST", "/", [], b"{}")
            assert resp.status == 200
            assert resp.headers == [(b"Content-Length", b"2")]
            assert await resp.read() == b"ok"
        assert raw.connections == 1
        await pool.close()


async def test_request_bytes() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while await raw.read_request(reader) is not None:
            writer.write(OK)

    async with raw_server(handler) as (raw, url):
        port = url.rsplit(":", 1)[1]
        pool = _pool(url + "/prefix")
        headers = [("Authorization", "Bearer t"), ("content-length", "99"), ("Host", "evil")]
        resp = await pool.request("POST", "/prefix/v1/x?a=b", headers, b'{"a":1}')
        await resp.read()
        resp = await pool.request("GET", "/v1/models", [])
        await resp.read()
        assert raw.requests == [
            b"POST /prefix/v1/x?a=b HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode()
            + b"\r\nContent-Length: 7\r\nAuthorization: Bearer t\r\n\r\n{\"a\":1}",
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode()
            + b"\r\nContent-Length: 0\r\n\r\n",
        ]  # fmt: skip
        with pytest.raises(ValueError):
            await pool.request("GET", "/", [("X-A", "1\r\nX-Injected: 1")])
        await pool.close()


async def test_malformed_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
        await wait_eof(reader)

    async with raw_server(handler) as (raw, url):
        pool = _pool(url)
        with pytest.raises(UpstreamProtocolError):
            await pool.request("GET", "/", [])
        await pool.close()


# failures


async def test_idle_connection_closed_by_server_is_retried_once() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        # Answer one request per connection, then close on the next one unanswered: the
        # engine's idle timeout racing with our send.
        await raw.read_request(reader)
        writer.write(OK)
        await raw.read_request(reader)

    async with raw_server(handler) as (raw, url):
        pool = _pool(url)
        for n in range(1, 4):
            resp = await pool.request("POST", "/", [], b"x")
            assert await resp.read() == b"ok"
            assert raw.connections == n
        assert len(raw.requests) == 5  # 3 answered, 2 sent on stale connections
        await pool.close()


async def test_idle_connection_seen_closed_is_discarded() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await raw.read_request(reader)
        writer.write(OK)  # and close right after

    async with raw_server(handler) as (raw, url):
        pool = _pool(url)
        for _ in range(2):
            resp = await pool.request("GET", "/", [])
            assert await resp.read() == b"ok"
            await asyncio.sleep(0.05)  # the EOF reaches the pooled connection
        assert len(raw.requests) == 2  # nothing was sent on the dead connection
        await pool.close()


async def test_fresh_connection_closed_without_answer_is_not_retried() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await raw.read_request(reader)

    async with raw_server(handler) as (raw, url):
        pool = _pool(url)
        with pytest.raises(UpstreamProtocolError):
            await pool.request("POST", "/", [], b"x")
        assert raw.connections == 1
        await pool.close()


async def test_connection_refused() -> None:
    pool = _pool(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamConnectError):
        await pool.request("GET", "/", [])
    await pool.close()


async def test_connect_timeout() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connect hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(address)
            with socket.socket() as probe:
                probe.settimeout(0.2)
                if probe.connect_ex(address) == 0:
                    pytest.skip("this kernel does not drop connections beyond the backlog")
            pool = HttpPool(
                f"http://127.0.0.1:{address[1]}", connect_timeout_s=0.3, read_timeout_s=5
            )
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(UpstreamConnectError):
                await pool.request("GET", "/", [])
            assert loop.time() - start < 1.5
        finally:
            for filler in fillers:
                filler.close()


async def test_server_that_never_answers_times_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await wait_eof(reader)

    async with raw_server(handler) as (raw, url):
        pool = _pool(url, read_timeout_s=0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamTimeout):
            await pool.request("GET", "/", [])
        assert 0.25 <= loop.time() - start < 1.5
        await asyncio.wait_for(raw.disconnected.wait(), 2)  # the connection was closed
        await pool.close()


async def test_body_stall_times_out_but_steady_trickle_does_not() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while (request := await raw.read_request(reader)) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            for _ in range(8):  # 8 bytes over 0.8 s: longer than the timeout, never idle that long
                await asyncio.sleep(0.1)
                writer.write(b"x")
            if b"stall" in request:
                await wait_eof(reader)
            writer.write(b"x" * 92)

    async with raw_server(handler) as (raw, url):
        pool = _pool(url, read_timeout_s=0.4)
        resp = await pool.request("GET", "/", [])
        assert await resp.read() == b"x" * 100
        resp = await pool.request("GET", "/stall", [])
        with pytest.raises(UpstreamTimeout):
            await resp.read()
        await pool.close()


async def test_server_dying_mid_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        request = await raw.read_request(reader)
        assert request is not None
        if b"chunked" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(0.05)

    async with raw_server(handler) as (raw, url):
        pool = _pool(url)
        resp = await pool.request("GET", "/length", [])
        with pytest.raises(UpstreamProtocolError):
            await resp.read()
        resp = await pool.request("GET", "/chunked", [])
        chunks = []
        with pytest.raises(UpstreamProtocolError):
            async for chunk in resp.iter_chunks():
                chunks.append(chunk)
        assert chunks == [b"first"]
        with pytest.raises(UpstreamError):
            await resp.read()  # the failed response is released
        assert raw.connections == 2
        await pool.close()


async def test_cancelled_stream_closes_the_connection() -> None:
    first_chunk = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await raw.read_request(reader)
        if n > 1:
            writer.write(OK)
            await wait_eof(reader)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"6\r\ntoken \r\n")
        await wait_eof(reader)  # returns once the client disconnects

    async def consume(pool: HttpPool) -> None:
        resp = await pool.request("GET", "/", [])
        async for _ in resp.iter_chunks():
            first_chunk.set()

    async with raw_server(handler) as (raw, url):
        pool = _pool(url)
        task = asyncio.create_task(consume(pool))
        await asyncio.wait_for(first_chunk.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(raw.disconnected.wait(), 2)
        resp = await pool.request("GET", "/", [])
        assert await resp.read() == b"ok"
        assert raw.connections == 2
        await pool.close()


async def test_cancel_while_waiting_for_headers_closes_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await wait_eof(reader)

    async with raw_server(handler) as (raw, url):
        pool = _pool(url)
        task = asyncio.create_task(pool.request("GET", "/", []))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(raw.disconnected.wait(), 2)
        assert not pool._idle
        await pool.close()


async def test_release_of_unread_body_closes_but_received_body_is_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while (request := await raw.read_request(reader)) is not None:
            if b"/partial" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            else:
                writer.write(OK)

    async with raw_server(handler) as (raw, url):
        pool = _pool(url)
        resp = await pool.request("GET", "/", [])
        await asyncio.sleep(0.05)
        resp.release()  # the whole body had arrived: the connection is still usable
        resp = await pool.request("GET", "/partial", [])
        resp.release()
        await asyncio.wait_for(raw.disconnected.wait(), 2)
        resp = await pool.request("GET", "/", [])
        assert await resp.read() == b"ok"
        assert raw.connections == 2
        await pool.close()


async def test_idle_ttl_and_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while await raw.read_request(reader) is not None:
            writer.write(OK)

    async with raw_server(handler) as (raw, url):
        pool = _pool(url, idle_ttl_s=0.05)
        for _ in range(2):
            resp = await pool.request("GET", "/", [])
            assert await resp.read() == b"ok"
            await asyncio.sleep(0.1)
        assert raw.connections == 2
        await pool.close()
        await asyncio.wait_for(raw.disconnected.wait(), 2)
        with pytest.raises(UpstreamError):
            await pool.request("GET", "/", [])


# TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    yield cert, key


async def test_https(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = WebServer()
    runner = web.AppRunner(server.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context).start()
    try:
        untrusted = _pool(f"https://127.0.0.1:{port}")
        with pytest.raises(UpstreamConnectError):
            await untrusted.request("GET", "/json", [])
        pool = HttpPool(
            f"https://127.0.0.1:{port}/v1",
            connect_timeout_s=2,
            read_timeout_s=5,
            ssl_context=ssl.create_default_context(cafile=str(cert)),
        )
        for _ in range(3):
            resp = await pool.request("GET", "/json", [])
            assert orjson.loads(await resp.read())["path"] == "/json"
        resp = await pool.request("GET", "/stream", [])
        assert [c async for c in resp.iter_chunks()] == [b"data: one\n\n", b"data: two\n\n"]
        assert len(set(server.peers)) == 1
        await pool.close()
    finally:
        await runner.cleanup()


# The same cases on uvloop, which the gateway runs on: its transports differ from asyncio's.

_CASES = [f for name, f in list(globals().items()) if name.startswith("test_")]


@pytest.mark.parametrize("case", _CASES, ids=[f.__name__ for f in _CASES])
def test_on_uvloop(case: Callable[..., Awaitable[None]], request: pytest.FixtureRequest) -> None:
    params = inspect.signature(case).parameters
    cert = request.getfixturevalue("certificate") if "certificate" in params else None

    async def main() -> None:
        if "web_server" in params:
            async with started_web_server() as started:
                await case(started)
        else:
            await case(*([cert] if cert else []))

    uvloop.run(main())
