"""Change notices between gateway replicas, through PostgreSQL LISTEN/NOTIFY.

A revoked key or a server added on one replica must take effect on every
replica within a second. The notice is sent by `pg_notify` inside the very
transaction that makes the change, so it is delivered if and only if the
change is committed, whichever process made it (a replica's admin API or the
`aiguillage keys revoke` CLI). Each replica keeps one listening connection;
after losing it, the replica reconnects and resyncs from the tables, so a
notice missed meanwhile costs nothing. SQLite has no notices: one process
applies its own changes directly and the key cache's TTL bounds the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg  # type: ignore[import-untyped]
import orjson
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection

CHANNEL = "aiguillage_changes"
APPLICATION_NAME = "aiguillage-change-listener"  # how operators spot it in pg_stat_activity
RECONNECT_DELAY_S = 1.0
PING_INTERVAL_S = 5.0

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Change:
    """What changed: `key_revoked` (with the key's hash) or `catalog`."""

    kind: str
    key_hash: str | None = None


async def announce(connection: AsyncConnection, change: Change) -> None:
    """Send the notice at commit of `connection`'s transaction (PostgreSQL only)."""
    if connection.dialect.name != "postgresql":
        return
    payload = orjson.dumps({"kind": change.kind, "key_hash": change.key_hash}).decode()
    await connection.execute(
        text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload}
    )


def parse_change(payload: str) -> Change | None:
    """The change a notice describes; None (logged) for a payload we do not understand."""
    try:
        document = orjson.loads(payload)
        return Change(str(document["kind"]), document.get("key_hash"))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.warning("ignoring a malformed change notice")
        return None


class ChangeListener:
    """Listens on the channel for as long as it runs; resyncs after every (re)connection."""

    def __init__(
        self,
        url: URL,
        on_change: Callable[[Change], None],
        resync: Callable[[], Awaitable[None]],
    ) -> None:
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._on_change = on_change
        self._resync = resync
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="change-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self._listen_once()
            except Exception as error:  # a failed resync too: retry on a fresh connection
                log.warning("change listener failed: %s", type(error).__name__)
            await asyncio.sleep(RECONNECT_DELAY_S)

    async def _listen_once(self) -> None:
        """Connect, listen, resync, then wait until the connection is lost."""
        connection = await asyncpg.connect(
            self._dsn, timeout=5, server_settings={"application_name": APPLICATION_NAME}
        )
        lost = asyncio.Event()
        try:
            connection.add_termination_listener(lambda _connection: lost.set())
            await connection.add_listener(CHANNEL, self._received)
            await self._resync()  # whatever changed while we were not listening
            self.connected.set()
            while not lost.is_set():  # a silent network cut shows as a failed ping
                try:
                    async with asyncio.timeout(PING_INTERVAL_S):
                        await lost.wait()
                except TimeoutError:
                    await connection.execute("SELECT 1", timeout=PING_INTERVAL_S)
            log.warning("change listener lost its connection; reconnecting")
        finally:
            self.connected.clear()
            connection.terminate()

    def _received(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        change = parse_change(payload)
        if change is not None:
            self._on_change(change)
