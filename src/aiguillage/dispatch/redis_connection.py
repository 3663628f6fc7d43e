"""Clients for the shared scheduler's Redis: one server, or the master Sentinel names.

`scheduler_url` takes redis-py's own URLs (`redis://`, `rediss://`, `unix://`) and
`redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]` for a
Redis watched by Sentinel: the clients ask the Sentinels for the service's master
when they open a connection, and `master_moved` (called at every lease renewal)
asks again, so pooled connections leave a demoted master that still accepts writes.
The password is the Redis servers' own; `?sentinel_password=` gives the Sentinels'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEME = "redis+sentinel"
PLAIN_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class SentinelTarget:
    """Where the Sentinels are, which service they watch, and how to log in."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Read a `redis+sentinel://` URL; raise ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"expected a {SENTINEL_SCHEME}:// URL")
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for host_port in hosts.split(","):
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address {host_port!r} is not HOST:PORT")
        sentinels.append((host, int(port)))
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("expected /SERVICE or /SERVICE/DB after the sentinel addresses")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    sentinel_password = parse_qs(parts.query).get("sentinel_password", [None])[0]
    return SentinelTarget(
        sentinels=tuple(sentinels),
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=sentinel_password,
    )


def check_scheduler_url(url: str) -> None:
    """Raise ValueError unless `url` is one `RedisConnector` can use."""
    scheme = urlsplit(url).scheme
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)
    elif scheme not in PLAIN_SCHEMES:
        raise ValueError(
            "expected redis://HOST:PORT/DB (or rediss://, unix://, "
            "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE/DB)"
        )


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool (connections to the current master) that waits for a free connection."""


class RedisConnector:
    """Makes the scheduler's Redis clients for one URL, plain or through Sentinel."""

    def __init__(self, url: str, *, timeout_s: float = 1.0) -> None:
        check_scheduler_url(url)
        self._url = url
        self._options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        }
        self._sentinel: Sentinel | None = None
        self._service = ""
        self._master: tuple[str, int] | None = None  # where the Sentinels said it was
        self._pools: list[SentinelConnectionPool] = []
        if urlsplit(url).scheme == SENTINEL_SCHEME:
            target = parse_sentinel_url(url)
            self._service = target.service
            self._options.update(db=target.db, username=target.username, password=target.password)
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py lacks the hint
                list(target.sentinels),
                sentinel_kwargs={
                    "password": target.sentinel_password,
                    "socket_timeout": timeout_s,
                    "socket_connect_timeout": timeout_s,
                },
            )

    def pooled(self, max_connections: int, wait_s: float) -> aioredis.Redis:
        """A client whose callers wait up to `wait_s` for one of `max_connections`."""
        if self._sentinel is not None:
            client: aioredis.Redis = self._sentinel.master_for(
                self._service,
                connection_pool_class=_BlockingSentinelPool,
                max_connections=max_connections,
                timeout=wait_s,
                **self._options,
            )
            self._pools.append(client.connection_pool)  # type: ignore[arg-type]
            return client
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url, max_connections=max_connections, timeout=wait_s, **self._options
        )
        return aioredis.Redis.from_pool(pool)

    def single(self) -> aioredis.Redis:
        """A client for one long-lived connection that waits for messages (no read timeout)."""
        options = {**self._options, "socket_timeout": None}
        if self._sentinel is not None:
            return self._sentinel.master_for(self._service, **options)  # type: ignore[no-any-return]
        return aioredis.Redis.from_url(self._url, **options)

    async def master_moved(self) -> bool:
        """Ask the Sentinels where the master is; True when it moved since the last time.

        redis-py asks only when it opens a connection, so a pooled connection would
        go on writing to a demoted master that still accepts writes. When the master
        moved, the pooled clients close their idle connections to the old one (busy
        ones close when given back). Raises RedisError when no Sentinel answers.
        """
        if self._sentinel is None:
            return False
        address = await self._sentinel.discover_master(self._service)
        moved = self._master is not None and address != self._master
        self._master = address
        if moved:
            for pool in self._pools:
                await pool.get_master_address()  # type: ignore[no-untyped-call]  # drops old links
        return moved

    async def aclose(self) -> None:
        """Close the connections to the Sentinels (the clients close their own)."""
        if self._sentinel is not None:
            await self._sentinel.aclose()
