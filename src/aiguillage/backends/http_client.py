"""A small pooled HTTP/1.1 client for relaying requests to engines.

aiohttp's client spent about a third of the gateway's CPU on work a relay does
not need (header objects, payload registry, writer and timeout layers). This
client keeps only what a relay does: one ``transport.write`` of prebuilt bytes
per request, ``httptools`` to parse the answer, one future per wait, and one
timer per connection that is moved lazily instead of a ``wait_for`` per read.
Connections to a single origin are kept alive and reused most-recent first.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import cast
from urllib.parse import urlsplit

import httptools

# Pause the socket above this much unread body, so a slow client cannot make us buffer a stream.
_HIGH_WATER = 1 << 20
# Bodies larger than this are written on their own rather than copied after the head.
_SEPARATE_BODY = 1 << 16
# Framing is the pool's job: these caller headers would contradict what it writes.
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})


class UpstreamError(Exception):
    """Base of every failure of a request to an engine."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, DNS, TLS, connect timeout)."""


class UpstreamTimeout(UpstreamError):
    """No byte arrived for ``read_timeout_s`` while waiting for headers or body."""


class UpstreamProtocolError(UpstreamError):
    """The connection closed early or the engine sent a malformed response."""


class _StaleConnection(UpstreamProtocolError):
    """A reused connection closed before any response byte: the request may be sent again."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the parse state of the response it is receiving."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout_s: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout_s
        self.transport: (
            asyncio.Transport
        )  # set by connection_made, before create_connection returns
        self.idle_since = 0.0
        self.in_use = False
        self.lost = False
        self._waiter: asyncio.Future[None] | None = None
        self._activity = 0.0  # start of the current wait or time of the last byte received
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._reset(head=False)

    def _reset(self, *, head: bool) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head = head
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.done = False  # the whole message was received
        self.keep_alive = False
        self._interim = False  # parsing a 1xx response, which is skipped
        self._spoiled = False  # bytes beyond the response: never reuse
        self._got_bytes = False
        self._exc: UpstreamError | None = None
        self._body: list[bytes] = []
        self._buffered = 0

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if not self.in_use or self.done:
            self._spoiled = True  # unsolicited bytes: the stream is out of step
            if not self.in_use:
                self.transport.close()
            return
        self._got_bytes = True
        self._activity = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("engine switched protocols"))
        except httptools.HttpParserError as exc:
            if self.done:
                self._spoiled = True
            else:
                self._fail(UpstreamProtocolError(f"malformed response: {exc}"))
        if self._buffered > _HIGH_WATER and not self._paused and self._exc is None:
            self._paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.in_use or self.done or self._exc is not None:
            return
        if self.headers_done and not self._has_framing():
            self.done = True  # a close-delimited body ends with the connection
            self._wake()
        elif not self._got_bytes:
            self._fail(_StaleConnection("connection closed before any response byte"))
        else:
            self._fail(UpstreamProtocolError("connection closed before the response was complete"))

    def _has_framing(self) -> bool:
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length" or (
                lname == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return True
        return False

    # httptools callbacks: they must never raise, or the parser reports a callback error

    def on_message_begin(self) -> None:
        if self.done:
            self._spoiled = True  # a second response to one request

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True
            self.headers = []
            return
        self.status = status
        self.headers_done = True
        if self._head:  # llhttp cannot know the body of a HEAD answer is absent
            self.keep_alive = self._parser.should_keep_alive()
            self.done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.done:
            self._spoiled = True
            return
        self._body.append(body)
        self._buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self.done:
            self.keep_alive = self._parser.should_keep_alive()
            self.done = True
            self._wake()

    # waiting, with one lazily moved read timer per connection

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: UpstreamError) -> None:
        self._exc = exc
        self._wake()
        self.transport.close()

    async def _wait(self) -> None:
        if self._exc is not None:
            raise self._exc.with_traceback(None)
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._activity = now = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(now + self._read_timeout, self._on_timer)
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        """Fire the read timeout, or move it: rescheduling here is cheaper than per chunk."""
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # nobody waits; the next wait arms the timer again
        deadline = self._activity + self._read_timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
        else:
            self._fail(UpstreamTimeout(f"no response byte for {self._read_timeout:g} s"))

    # used by the pool and the response

    def send(self, data: bytes, body: bytes, *, head: bool) -> None:
        self._reset(head=head)
        self.in_use = True
        self.transport.write(data)
        if body:
            self.transport.write(body)

    async def wait_headers(self) -> None:
        while not self.headers_done:
            if self._exc is not None:
                raise self._exc.with_traceback(None)
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        """Return all body bytes buffered so far, waiting only when there are none."""
        while True:
            if self._body:
                chunks = self._body
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._resume()
                return data
            if self.done:
                return None
            if self._exc is not None:
                raise self._exc.with_traceback(None)
            await self._wait()

    def _resume(self) -> None:
        self._paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def reusable(self) -> bool:
        return (
            self.done
            and self.keep_alive
            and not self._spoiled
            and not self.lost
            and not self.transport.is_closing()
        )

    def make_idle(self) -> None:
        self.in_use = False
        self._body = []
        self.headers = []
        if self._paused:
            self._resume()

    def close(self) -> None:
        self.in_use = False
        self.transport.close()


class UpstreamResponse:
    """An engine's answer whose status and headers have arrived; the body is read on demand."""

    __slots__ = ("_conn", "_eof", "_pool", "headers", "status")

    def __init__(self, pool: HttpPool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._eof = False
        self.status = conn.status
        self.headers = conn.headers

    def header(self, name: str) -> str | None:
        """First value of a header, matched case-insensitively (values decoded as latin-1)."""
        key = name.lower().encode("latin-1")
        for hname, value in self.headers:
            if hname.lower() == key:
                return value.decode("latin-1")
        return None

    @property
    def content_type(self) -> str:
        value = self.header("content-type")
        return value.split(";", 1)[0].strip().lower() if value else ""

    async def _next_chunk(self) -> bytes | None:
        conn = self._conn
        if conn is None:
            if self._eof:
                return None
            raise UpstreamError("response released before its body was read")
        try:
            chunk = await conn.next_chunk()
        except BaseException:
            # A timeout, a broken stream or a cancelled reader: the connection is done for.
            self._conn = None
            conn.close()
            raise
        if chunk is None:
            self._eof = True
            self.release()
        return chunk

    async def read(self) -> bytes:
        """The whole body; the connection is released once it is read."""
        first = await self._next_chunk()
        if first is None:
            return b""
        parts = [first]
        while (chunk := await self._next_chunk()) is not None:
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, de-chunked; the connection is released at the end."""
        return _Chunks(self)

    def release(self) -> None:
        """Give the connection back: to the pool if the response was fully received, else close it.

        Closing on an unfinished body is how an abandoned stream stops the work upstream.
        """
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._pool._release(conn)


class _Chunks:
    """Async iterator over a response body; a class rather than a generator to stay cheap."""

    __slots__ = ("_response",)

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._response._next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class HttpPool:
    """Keep-alive connections to one origin (scheme, host, port)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_idle: int = 64,
        idle_ttl_s: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        secure = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if secure else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = self._port == (443 if secure else 80)
        self._host_line = f"Host: {host if default_port else f'{host}:{self._port}'}\r\n"
        self._ssl = (ssl_context or ssl.create_default_context()) if secure else None
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._max_idle = max_idle
        self._idle_ttl = idle_ttl_s
        self._idle: deque[_Connection] = deque()
        self._closed = False

    async def request(
        self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes = b""
    ) -> UpstreamResponse:
        """Send a request; return once the status line and headers are parsed.

        ``path`` is everything after the origin. The pool writes ``Host`` and
        ``Content-Length`` itself and skips callers' headers of those names (and
        ``Transfer-Encoding``); a CR or LF anywhere raises ``ValueError`` rather than
        letting a header value inject another header. The caller must ``release()``.
        """
        if self._closed:
            raise UpstreamError("pool is closed")
        lines = [
            f"{method} {path} HTTP/1.1\r\n",
            self._host_line,
            f"Content-Length: {len(body)}\r\n",
        ]
        lines.extend(f"{n}: {v}\r\n" for n, v in headers if n.lower() not in _OWN_HEADERS)
        lines.append("\r\n")
        text = "".join(lines)
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise ValueError("CR or LF in the request line or a header")
        data = text.encode("utf-8")
        if len(body) <= _SEPARATE_BODY:
            data, body = data + body, b""
        head = method == "HEAD"
        loop = asyncio.get_running_loop()
        conn = self._acquire(loop)
        if conn is not None:
            try:
                return await self._exchange(conn, data, body, head)
            except _StaleConnection:
                pass  # closed by the engine while idle, before reading this request: send it again
        conn = await self._connect(loop)
        return await self._exchange(conn, data, body, head)

    async def _exchange(
        self, conn: _Connection, data: bytes, body: bytes, head: bool
    ) -> UpstreamResponse:
        try:
            conn.send(data, body, head=head)
            await conn.wait_headers()
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(self, conn)

    def _acquire(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if (
                conn.lost
                or conn.transport.is_closing()
                or loop.time() - conn.idle_since > self._idle_ttl
            ):
                conn.close()
                continue
            return conn
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        factory = functools.partial(_Connection, loop, self._read_timeout)
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    factory,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                ),
                self._connect_timeout,
            )
        except OSError as exc:  # includes refused, DNS (gaierror), TLS (SSLError) and timeouts
            raise UpstreamConnectError(f"{self._host}:{self._port}: {exc!r}") from exc
        return conn

    def _release(self, conn: _Connection) -> None:
        if self._closed or not conn.reusable() or len(self._idle) >= self._max_idle:
            conn.close()
            return
        conn.make_idle()
        now = conn.idle_since = conn._loop.time()
        idle = self._idle
        while idle and (idle[0].lost or now - idle[0].idle_since > self._idle_ttl):
            idle.popleft().close()
        idle.append(conn)

    async def close(self) -> None:
        """Close idle connections; connections in use are closed when released."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
