"""The shared scheduler: one view of queues and leases for every gateway replica, in Redis.

Each replica keeps doing what needs its own knowledge (the key's routing mode, the
model's strategy ranking the backends, the slots a ticket may use on each under the
owner, critical and QoS rules: `slot_limit`), and hands Redis what must hold across
replicas: the in-flight count of every backend, the per-model queue in priority and
fair order, and the leases. Every change is one Lua script (redis_scheduler.lua holds
their common part), so two replicas never both take a backend's last slot.

- A ticket carries its ordered preferences `[[backend, limit], ...]`. Acquiring places it
  on the first preferred backend under its limit when nobody waits (one round trip),
  otherwise queues it with score `(MAX_PRIORITY - priority) * 2^32 + rank`, where the
  rank is start-time fair queueing between organisations within a priority level.
- Ending a lease pumps the queues of the backend's models: tickets are granted in
  order, and each grant is published on its replica's channel, which resolves the
  waiting request. No replica polls.
- A lease has a deadline the owning replica pushes forward every `lease_ttl_s / 3`; any
  replica reaps expired ones, so a killed replica's slots come back within the TTL. A
  renewal also re-registers a lease Redis no longer knows (a restart that lost its data),
  so the caps keep counting requests still running.
- When Redis does not answer, acquiring fails at once with `SchedulerUnavailable` (503
  and Retry-After for the client): a replica cannot keep a global cap on its own.

Not shared (yet): circuit-breaker states (each replica probes and counts failures itself),
the owner-first pass of the local scheduler when capacity frees (owners still get their
reserved slots and their routing modes), and the `performance` policy is evaluated when
a ticket is queued, not again while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError

from aiguillage.api.payload import MAX_PRIORITY
from aiguillage.backends.backend import Backend
from aiguillage.catalog.catalog import Catalog, ModelEntry
from aiguillage.dispatch.dispatcher import QueueFull, QueueTimeout, SchedulerUnavailable
from aiguillage.dispatch.scheduler import check_servable, eligible, slot_limit
from aiguillage.dispatch.strategies import Strategy, make_strategy
from aiguillage.dispatch.tickets import Lease, RoutingMode, Ticket

log = logging.getLogger(__name__)

QUEUE_SCAN = 200  # waiting tickets a pump looks at; beyond, they wait for the next pump
REDIS_CONNECTIONS = 32  # per replica; scripts are short, so few connections serve many requests
_COMMON = resources.files("aiguillage.dispatch").joinpath("redis_scheduler.lua").read_text()

_ACQUIRE = """
local model, seq = ARGV[2], tonumber(ARGV[3])
local ticket = cjson.decode(ARGV[4])
local priority, org = tonumber(ARGV[5]), ARGV[6]
local threshold, ttl_ms, scan = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local retry = ARGV[10] == '1'
if seq == 0 then
  seq = redis.call('INCR', p .. ':seq')
end
local member = string.format('%015d', seq)
local queue = p .. ':q:' .. model
if redis.call('ZCARD', queue) == 0 then
  local backend = place(ticket.prefs)
  if backend then
    grant(member, backend, ttl_ms)
    return {'granted', seq, backend, counts(11)}
  end
end
if tonumber(redis.call('HGET', p .. ':w:' .. model, ticket.key) or '0') >= threshold then
  return {'full', seq, '', counts(11)}
end
local level = tostring(priority)
local rank = tonumber(redis.call('HGET', p .. ':vt:' .. model, level) or '0')
if not retry then  -- a retried ticket goes back to the head of its level
  local fair = p .. ':of:' .. model .. ':' .. level
  rank = math.max(rank, tonumber(redis.call('HGET', fair, org) or '0'))
  redis.call('HSET', fair, org, rank + 1)
end
ticket.level = level
ticket.rank = rank
redis.call('HSET', p .. ':tk', member, cjson.encode(ticket))
redis.call('HINCRBY', p .. ':w:' .. model, ticket.key, 1)
redis.call('ZADD', queue, (MAX_PRIORITY - priority) * RANK_SPAN + rank, member)
local backend = pump(model, ttl_ms, scan)[member]
if backend then
  return {'granted', seq, backend, counts(11)}
end
return {'queued', seq, '', counts(11)}
""".replace("MAX_PRIORITY", str(MAX_PRIORITY))

_WITHDRAW = """
if dequeue(ARGV[2], ARGV[3]) then
  return 1
end
if finish(ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])) then
  return 2  -- granted while it was given up: the lease is ended here
end
return 0
"""

_RELEASE = """
return finish(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])) or ''
"""

_REAP = """
local expired = redis.call('ZRANGEBYSCORE', p .. ':leases', '-inf', now_ms())
for _, seq in ipairs(expired) do
  finish(seq, tonumber(ARGV[2]), tonumber(ARGV[3]))
end
return #expired
"""

_RENEW = """
local deadline = now_ms() + tonumber(ARGV[2])
local restored = 0
for i = 3, #ARGV, 2 do
  local seq, backend = ARGV[i], ARGV[i + 1]
  if redis.call('ZADD', p .. ':leases', deadline, seq) == 1 then  -- Redis had lost it
    redis.call('HSET', p .. ':lease', seq, backend)
    redis.call('HINCRBY', p .. ':inflight', backend, 1)
    restored = restored + 1
  end
end
return restored
"""

_REGISTER = """
for i = 2, #ARGV, 2 do
  redis.call('SADD', p .. ':bm:' .. ARGV[i], ARGV[i + 1])
end
return 0
"""

_COUNTS = """
return counts(2)
"""


class RedisScheduler:
    """The `Dispatcher` shared by several gateway replicas through one Redis."""

    def __init__(
        self,
        catalog: Catalog,
        url: str,
        *,
        site: str | None = None,
        prefix: str = "aiguillage",
        lease_ttl_s: float = 8.0,
        replica: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_availability: Callable[[bool], None] | None = None,
    ) -> None:
        self._catalog = catalog
        self._site = site
        self._prefix = "{" + prefix + "}"
        self._ttl_ms = int(lease_ttl_s * 1000)
        self.lease_ttl_s = lease_ttl_s
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self._clock = clock
        self._on_availability = on_availability
        # a bounded pool whose callers wait for a connection: under a burst, requests
        # queue for a few hundred microseconds instead of failing with "too many connections"
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=2.0,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            health_check_interval=10,
        )
        self._redis: redis.Redis = redis.Redis(connection_pool=pool)
        self._scripts = {
            name: self._redis.register_script(_COMMON + body)
            for name, body in (
                ("acquire", _ACQUIRE),
                ("withdraw", _WITHDRAW),
                ("release", _RELEASE),
                ("reap", _REAP),
                ("renew", _RENEW),
                ("register", _REGISTER),
                ("counts", _COUNTS),
            )
        }
        self.leases: set[Lease] = set()
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._early: dict[str, tuple[str, float]] = {}  # grants that beat their waiter
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._upkeep: asyncio.Task[None] | None = None
        self.available = True
        self._strategies: dict[str, Strategy] = {}
        self._backends: dict[str, Backend] = {}
        self.catalog_changed()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to this replica's grants and start renewing and reaping leases."""
        subscribed = asyncio.Event()
        self._listener = asyncio.create_task(self._listen(subscribed))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(subscribed.wait(), timeout=5)
        with contextlib.suppress(SchedulerUnavailable):
            await self._register()
        self._upkeep = asyncio.create_task(self._keep_up())

    async def close(self) -> None:
        for task in (self._listener, self._upkeep):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    def catalog_changed(self) -> None:
        """Models or backends changed: rebuild the strategies; queues and leases stay."""
        self._strategies = {
            entry.name: make_strategy(entry.config.routing_strategy, entry.backends, self._site)
            for entry in self._catalog
        }
        self._backends = {b.name: b for b in self._catalog.backends()}
        if self._listener is not None:
            self._spawn(self._register())

    # --- the Dispatcher interface ---------------------------------------------------------

    async def acquire(self, ticket: Ticket) -> Lease:
        """A lease granted by the shared queue, at once or after waiting; raises DispatchError."""
        model = ticket.model
        check_servable(ticket)
        retry = ticket.seq != 0
        if not retry:
            ticket.enqueued_at = self._clock()
        preferences, reasons = self._preferences(ticket)
        document = {"replica": self.replica, "key": str(ticket.key_id), "prefs": preferences}
        status, seq, backend, counts = await self._call(
            "acquire",
            model.name,
            ticket.seq,
            orjson.dumps(document),
            ticket.priority,
            ticket.organisation,
            ticket.queue_threshold,
            self._ttl_ms,
            QUEUE_SCAN,
            int(retry),
            *[b.name for b in model.backends],
        )
        self._mirror(model.backends, counts)
        status, backend = _text(status), _text(backend)
        ticket.seq = int(seq)
        member = f"{ticket.seq:015d}"
        if status == "full":
            raise QueueFull(model.name)
        if status == "queued":
            backend = await self._wait(ticket, member)
        return self._lease(ticket, member, backend, reasons.get(backend, "shared queue"))

    def release(self, lease: Lease, ok: bool | None) -> None:
        """End a lease now for this replica, and in Redis as soon as it answers."""
        if lease.released:
            return
        lease.released = True
        self.leases.discard(lease)
        backend = lease.backend
        backend.in_flight = max(0, backend.in_flight - 1)
        if ok is True:
            backend.circuit.on_success()
        elif ok is False:
            backend.circuit.on_failure()
        # if Redis does not hear it, the lease is no longer renewed and expires
        self._spawn(self._call("release", lease.lease_id, self._ttl_ms, QUEUE_SCAN))

    def backend_changed(self, backend: Backend) -> None:
        """Health changes are local to each replica (circuits are not shared yet)."""

    def reclaim_stale_leases(self, max_age_s: float) -> int:
        """Release this replica's leases not renewed for `max_age_s` (a lost task)."""
        now = self._clock()
        stale = [lease for lease in self.leases if now - lease.renewed_at > max_age_s]
        for lease in stale:
            log.warning("reclaiming a lease on %s", lease.backend.name)
            self.release(lease, ok=None)
        return len(stale)

    def explain(self) -> dict[str, Any]:
        """This replica's view: global in-flight counts as last seen, its own leases."""
        return {
            "engine": "redis",
            "replica": self.replica,
            "available": self.available,
            "backends": {
                name: {
                    "in_flight": backend.in_flight,
                    "max_concurrency": backend.max_concurrency,
                    "circuit": str(backend.circuit.state),
                    "leases_here": sum(1 for lease in self.leases if lease.backend is backend),
                }
                for name, backend in self._backends.items()
            },
            "models": {
                entry.name: {"strategy": self._strategies[entry.name].name}
                for entry in self._catalog
            },
        }

    async def releases_done(self) -> None:
        """Wait until Redis has heard every release so far (they run off the answer's path)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def in_flight(self, backend: Backend) -> int:
        """The backend's in-flight count across every replica (for tests and operators)."""
        (count,) = await self._call("counts", backend.name)
        return int(count or 0)

    # --- placement ------------------------------------------------------------------------

    def _preferences(self, ticket: Ticket) -> tuple[list[list[Any]], dict[str, str]]:
        """Backends the ticket may use, best first by the model's strategy, with its limit
        on each; and why each was ranked where it is."""
        strategy = self._strategies[ticket.model.name]
        left = [b for b in ticket.model.backends if eligible(ticket, b)]
        if ticket.routing_mode is RoutingMode.PRIVATE_FIRST:
            own = [b for b in left if b.owner == ticket.organisation]
            groups = [own, [b for b in left if b not in own]]
        else:
            groups = [left]
        preferences: list[list[Any]] = []
        reasons: dict[str, str] = {}
        for group in groups:
            while group:
                backend, reason = strategy.choose(ticket, group)
                group = [b for b in group if b is not backend]
                preferences.append([backend.name, slot_limit(ticket, backend)])
                reasons[backend.name] = reason
        return preferences, reasons

    async def _wait(self, ticket: Ticket, member: str) -> str:
        """Wait for the grant published for this ticket, or give its place up."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        early = self._early.pop(member, None)
        if early is not None:
            return early[0]
        self._waiting[member] = future
        timeout = ticket.model.config.queue_timeout_s - (self._clock() - ticket.enqueued_at)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(timeout, 0.001))
        except (TimeoutError, asyncio.CancelledError) as error:
            if future.done() and not future.cancelled():  # granted just in time
                if isinstance(error, TimeoutError):
                    return future.result()
                self._spawn(self._call("release", member, self._ttl_ms, QUEUE_SCAN))
                raise
            await self._give_up(ticket.model, member)
            if isinstance(error, TimeoutError):
                raise QueueTimeout(ticket.model.name) from None
            raise
        finally:
            self._waiting.pop(member, None)

    async def _give_up(self, model: ModelEntry, member: str) -> None:
        """Leave the queue; a grant that raced with leaving is ended in the same script."""
        with contextlib.suppress(SchedulerUnavailable):  # the lease would expire anyway
            await self._call("withdraw", model.name, member, self._ttl_ms, QUEUE_SCAN)
        self._early.pop(member, None)

    def _lease(self, ticket: Ticket, member: str, backend_name: str, reason: str) -> Lease:
        now = self._clock()
        ticket.waited_s = now - ticket.enqueued_at
        backend = self._backends[backend_name]
        backend.circuit.on_send()
        lease = Lease(
            backend, ticket, acquired_at=now, renewed_at=now, reason=reason, lease_id=member
        )
        self.leases.add(lease)
        return lease

    # --- Redis ----------------------------------------------------------------------------

    async def _call(self, script: str, *args: Any) -> Any:
        """Run one script; Redis errors become `SchedulerUnavailable`."""
        try:
            reply = await self._scripts[script](args=[self._prefix, *args])
        except (RedisError, OSError) as error:
            self._set_available(False)
            raise SchedulerUnavailable(f"the shared scheduler is unreachable: {error}") from None
        self._set_available(True)
        return reply

    @staticmethod
    def _mirror(backends: Sequence[Backend], counts: list[Any]) -> None:
        """Keep the strategies' in-flight counts as the shared ones just read."""
        for backend, count in zip(backends, counts, strict=True):
            backend.in_flight = int(count or 0)

    def _set_available(self, available: bool) -> None:
        if available != self.available:
            self.available = available
            if available:
                log.warning("the shared scheduler (Redis) answers again")
            else:
                log.error("the shared scheduler (Redis) is unreachable: requests get 503")
            if self._on_availability is not None:
                self._on_availability(available)

    async def _register(self) -> None:
        pairs = [
            item
            for entry in self._catalog
            for backend in entry.backends
            for item in (backend.name, entry.name)
        ]
        await self._call("register", *pairs)

    async def _listen(self, subscribed: asyncio.Event) -> None:
        """Resolve waiting tickets from this replica's grant channel; reconnect forever."""
        channel = f"{self._prefix}:grant:{self.replica}"
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                subscribed.set()
                self._set_available(True)
                await self._renew()  # Redis may have restarted without our leases
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        member, backend = _text(message["data"]).split(" ", 1)
                        self._granted(member, backend)
            except (RedisError, OSError) as error:
                self._set_available(False)
                log.warning("grant channel lost (%s); reconnecting", type(error).__name__)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _granted(self, member: str, backend: str) -> None:
        future = self._waiting.get(member)
        if future is not None and not future.done():
            future.set_result(backend)
        else:  # the acquire call has not registered yet: keep it for a moment
            self._early[member] = (backend, self._clock())

    async def _keep_up(self) -> None:
        """Renew this replica's leases and reap everybody's expired ones, forever."""
        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            with contextlib.suppress(SchedulerUnavailable):
                await self._renew()
                await self._call("reap", self._ttl_ms, QUEUE_SCAN)
            cutoff = self._clock() - 60
            for member, (_, at) in list(self._early.items()):
                if at < cutoff:
                    del self._early[member]

    async def _renew(self) -> None:
        pairs = [item for lease in self.leases for item in (lease.lease_id, lease.backend.name)]
        restored = await self._call("renew", self._ttl_ms, *pairs)
        if restored:
            log.warning("re-registered %d leases the shared scheduler had lost", restored)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(_quietly(coroutine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _quietly(coroutine: Any) -> None:
    with contextlib.suppress(SchedulerUnavailable):
        await coroutine


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
