"""The shared scheduler: several gateway replicas, one view of queues, leases and limits.

Queues, in-flight counts and leases live in Redis; every change is one Lua
script (`lua/scheduler.lua`), so caps and priorities hold across replicas.
A replica computes what only it knows (backend health and circuits as it sees
them, the model's strategy, the per-ticket limits of `placement.py`) and hands
Redis the ticket's ordered list of acceptable backends with their limits;
Redis places the ticket on the first with room, or queues it globally.

A queued ticket waits on a future. Whoever frees a slot (any replica) runs the
pump in the same script; a grant for a ticket of another replica is published
on that replica's channel, whose listener resolves the future: no polling.

Leases carry a deadline that their replica renews every `renew_interval_s`;
every replica reaps expired leases every `reap_interval_s`, so the capacity of
a replica that died comes back within `lease_ttl_s` plus one reap.

Circuits are shared: failures are counted in Redis whichever replica saw
them (a success anywhere resets the count); at the threshold the circuit opens
with its end recorded, and Redis places nothing there until then, whatever the
other replicas saw. Past its end the circuit is half-open for all: one trial lease
across the replicas; its success closes the circuit everywhere, its failure
opens it again. Every reply carries the circuits not closed, so each replica's
breaker (for `explain`, metrics and failing fast) follows the shared one.

When Redis cannot be reached, `acquire` raises `SchedulerUnavailable` at once
(the relay answers 503 with Retry-After) and the client reconnects by itself;
after a restart that lost the data, Redis places nothing for a short recovery
window (503 meanwhile) while every replica's renewal puts its live leases back,
so caps still count requests in progress; tickets Redis forgot fail with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from importlib.resources import files
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from aiguillage.backends.backend import Backend
from aiguillage.backends.circuit import CircuitBreaker, CircuitState
from aiguillage.backends.periodic import Periodic
from aiguillage.catalog.catalog import Catalog, ModelEntry
from aiguillage.dispatch.dispatcher import (
    NoBackendAvailable,
    QueueFull,
    QueueTimeout,
    SchedulerUnavailable,
)
from aiguillage.dispatch.placement import allowed, check_servable, effective_limit, may_take
from aiguillage.dispatch.queue import ModelQueue
from aiguillage.dispatch.redis_connection import RedisConnector
from aiguillage.dispatch.scheduler import LocalScheduler, ModelState
from aiguillage.dispatch.strategies import load_of
from aiguillage.dispatch.tickets import Lease, RoutingMode, Ticket

log = logging.getLogger(__name__)

SEP = "\t"
MAX_CONNECTIONS = 32  # per replica; Redis runs one script at a time anyway
FORGET_AFTER_S = 30.0  # how long a grant for an unknown or abandoned ticket is remembered
_SCRIPT = files("aiguillage.dispatch").joinpath("lua/scheduler.lua").read_text()
_Reply = tuple[str, str, str]


class RedisScheduler(LocalScheduler):
    """A `Dispatcher` whose queues, counts and leases are shared through Redis.

    It keeps the local scheduler's bookkeeping (model states, decisions,
    `explain`, the stale-lease safety net); its local queues hold only this
    replica's waiting tickets (for metrics and /admin/dispatch), and the
    `Backend.in_flight` attributes mirror the global counts after each call.
    """

    def __init__(
        self,
        catalog: Catalog,
        url: str,
        *,
        site: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_queue_change: Callable[[ModelEntry, ModelQueue], None] | None = None,
        on_availability: Callable[[bool], None] | None = None,
        prefix: str = "aiguillage:",
        replica: str | None = None,
        lease_ttl_s: float = 8.0,
        renew_interval_s: float = 2.0,
        reap_interval_s: float = 1.0,
    ) -> None:
        self.replica = replica or uuid.uuid4().hex[:12]
        self.prefix = prefix
        self._ttl_ms = str(round(lease_ttl_s * 1000))
        self._recovery_ms = round((renew_interval_s * 1.5 + 0.5) * 1000)
        self._on_availability = on_availability
        self._available = True
        self._version = 0  # of the latest reply whose counts were mirrored
        self._connector = RedisConnector(url, timeout_s=1.0)
        # a bounded pool: a burst waits up to a second for a connection rather than failing
        self._redis = self._connector.pooled(MAX_CONNECTIONS, wait_s=1.0)
        # one immediate retry (a pooled connection that died with a restart), no backoff:
        # an outage must answer fast, not after redis-py's default exponential retries
        self._redis.set_retry(Retry(NoBackoff(), 1))
        self._script = self._redis.register_script(_SCRIPT)
        self._by_name: dict[str, Backend] = {}
        self._waiting: dict[str, Ticket] = {}  # ticket id in Redis -> this replica's ticket
        self._early: dict[str, str] = {}  # grants that arrived before their acquire returned
        self._abandoned: set[str] = set()  # tickets whose client left: their grants go back
        self._why: dict[Ticket, tuple[Backend | None, str, int]] = {}
        self._pending: set[asyncio.Task[Any]] = set()
        self._starting: asyncio.Future[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._renewal = Periodic("redis-lease-renewal", self._renew, renew_interval_s)
        self._reaper = Periodic("redis-lease-reaper", self._reap, reap_interval_s)
        super().__init__(catalog, site=site, clock=clock, on_queue_change=on_queue_change)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Register the catalog, listen for grants, renew and reap leases (once; idempotent)."""
        if self._starting is None:
            self._starting = self._spawn(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="redis-grants")
        # No recovery window at start: this replica holds no lease yet, and opening one
        # whenever Redis is young made every new deployment answer 503 for seconds. The
        # replicas that do hold leases open it when they find Redis emptied (renewal).
        with contextlib.suppress(SchedulerUnavailable):  # it will come: renewal re-registers
            await self._register()
        self._renewal.start()
        self._reaper.start()

    async def close(self) -> None:
        await self._renewal.stop()
        await self._reaper.stop()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self.settled()
        await self._redis.aclose()
        await self._connector.aclose()

    def catalog_changed(self) -> None:
        super().catalog_changed()
        self._by_name = {b.name: b for entry in self.catalog for b in entry.backends}
        if self._listener is not None:
            self._spawn(self._register())

    # --- the Dispatcher interface ---------------------------------------------------------

    async def acquire(self, ticket: Ticket) -> Lease:
        state = self._states[ticket.model.name]
        check_servable(ticket)
        await self.start()  # connects on first use
        if not ticket.enqueued_at:
            ticket.enqueued_at = self._clock()
        call = self._spawn(
            self._call(
                "acquire",
                ticket.model.name,
                str(ticket.priority),
                ticket.organisation,
                _key(ticket.key_id),
                str(ticket.queue_threshold),
                str(ticket.seq),
                self._preferences(ticket, state),
            )
        )
        try:
            status, seq, handle = await asyncio.shield(call)
        except asyncio.CancelledError:  # the client left: undo whatever the script did
            call.add_done_callback(self._undo_acquire)
            self._why.pop(ticket, None)
            raise
        except SchedulerUnavailable:
            self._why.pop(ticket, None)
            raise
        if seq:
            ticket.seq = int(seq)
        if status == "granted":
            return self._lease(ticket, state, handle)
        if status in ("full", "unregistered", "recovering"):
            self._why.pop(ticket, None)
            if status == "full":
                raise QueueFull(ticket.model.name)
            if status == "unregistered":  # Redis came back empty: start its recovery
                self._spawn(self._quietly(self._register(recovering=True)))
            raise SchedulerUnavailable("the shared scheduler is recovering its leases")
        return await self._wait(ticket, state, handle)

    def release(self, lease: Lease, ok: bool | None) -> None:
        if lease.released:
            return
        # the in-flight mirror drops at once; the script's reply brings the truth
        self._end_here(lease, ok)
        outcome = "-" if ok is None else "ok" if ok else "failed"
        self._spawn(self._end(lease.token, outcome, lease.backend.circuit))

    def backend_changed(self, backend: Backend) -> None:
        """Recompute this replica's waiting tickets' preferences (health, QoS) and pump."""
        args = []
        for ticket_id, ticket in self._waiting.items():
            if backend in ticket.model.backends:
                args += [ticket_id, self._preferences(ticket, self._states[ticket.model.name])]
        if args:
            self._spawn(self._quietly(self._call("refresh", *args)))

    async def settled(self) -> None:
        """Let started tasks reach Redis, wait for every call, until nothing new starts."""
        quiet_turns = 0
        while quiet_turns < 5:
            await asyncio.sleep(0)
            if self._pending:
                await asyncio.wait(list(self._pending))
                quiet_turns = 0
            else:
                quiet_turns += 1

    async def explain(self) -> dict[str, Any]:
        """This replica's view, plus each model's waiting tickets at every replica."""
        report = await super().explain()
        names = list(report["models"])
        try:
            _, counts, _ = await self._call("waiting", *names)
        except SchedulerUnavailable:
            report["shared_scheduler"] = "unreachable"
            return report
        for name, count in zip(names, counts.split(SEP), strict=True):
            report["models"][name]["waiting_all_replicas"] = int(count)
        return report

    def _pump(self, state: ModelState) -> None:
        """Redis pumps the global queues, in the scripts that free or add capacity."""

    # --- placement ------------------------------------------------------------------------

    def _preferences(self, ticket: Ticket, state: ModelState) -> str:
        """The backends this ticket may use, best first, each with its limit for this ticket.

        The strategy picks the first among those with room by this replica's
        latest view of the counts; the others follow, own first under
        private-first, then by load, so Redis can fall back when counts moved.
        """
        usable = [b for b in ticket.model.backends if allowed(ticket, b)]
        candidates = [b for b in usable if may_take(ticket, b)]
        own = [b for b in candidates if b.owner == ticket.organisation]
        chosen: Backend | None = None
        reason = "first with room when its turn came"
        if ticket.routing_mode is RoutingMode.PRIVATE_FIRST and own:
            chosen, why = state.strategy.choose(ticket, own)
            reason = f"private first: {why}"
        elif candidates:
            chosen, reason = state.strategy.choose(ticket, candidates)
        self._why[ticket] = (chosen, reason, len(candidates))
        private_first = ticket.routing_mode is RoutingMode.PRIVATE_FIRST
        rest = sorted(
            (b for b in usable if b is not chosen),
            key=lambda b: (not (private_first and b.owner == ticket.organisation), load_of(b)),
        )
        ordered = [chosen, *rest] if chosen is not None else rest
        return "\n".join(
            f"{b.name}{SEP}{effective_limit(ticket, b)}{SEP}{int(b.owner == ticket.organisation)}"
            for b in ordered
        )

    def _lease(self, ticket: Ticket, state: ModelState, token: str) -> Lease:
        backend = self._by_name[token.split(SEP)[1]]
        trial = token.endswith(f"{SEP}trial")
        if not trial and backend.circuit.state is not CircuitState.CLOSED:
            backend.circuit.on_success()  # Redis placed it as on a closed circuit: it is
        chosen, reason, candidates = self._why.pop(ticket, (None, "", 0))
        if backend is not chosen:
            reason = "first with room when its turn came"
        lease = self._record_grant(ticket, state, backend, reason, candidates, token=token)
        return lease

    # --- waiting --------------------------------------------------------------------------

    async def _wait(self, ticket: Ticket, state: ModelState, ticket_id: str) -> Lease:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Lease] = loop.create_future()
        ticket.future = future
        self._waiting[ticket_id] = ticket
        state.queue.push(ticket)
        self._queue_changed(state)
        timer = loop.call_later(ticket.model.config.queue_timeout_s, self._time_out, ticket_id)
        early = self._early.pop(ticket_id, None)
        if early is not None:
            self._deliver(ticket_id, early)
        try:
            return await future
        except asyncio.CancelledError:
            if self._waiting.pop(ticket_id, None) is not None:
                self._abandon(ticket_id)
            elif future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result(), ok=None)  # granted just as it was cancelled
            raise
        except NoBackendAvailable:  # its model left the catalog: leave the shared queue too
            self._abandon(ticket_id)
            raise
        finally:
            timer.cancel()
            ticket.future = None
            self._waiting.pop(ticket_id, None)
            self._why.pop(ticket, None)
            if state.queue.remove(ticket):
                self._queue_changed(state)

    def _deliver(self, ticket_id: str, token: str) -> None:
        """A grant for one of this replica's tickets, from a script reply or the channel."""
        ticket = self._waiting.pop(ticket_id, None)
        if ticket is None or ticket.future is None or ticket.future.done():
            if ticket is not None or ticket_id in self._abandoned:
                self._spawn(self._end(token))
            else:  # the acquire that queued it has not returned yet
                self._early[ticket_id] = token
                asyncio.get_running_loop().call_later(
                    FORGET_AFTER_S, self._early.pop, ticket_id, None
                )
            return
        state = self._states[ticket.model.name]
        if state.queue.remove(ticket):
            state.queue.served(ticket)
            self._queue_changed(state)
        ticket.future.set_result(self._lease(ticket, state, token))

    def _time_out(self, ticket_id: str) -> None:
        self._spawn(self._settle_ticket(ticket_id, timed_out=True))

    def _abandon(self, ticket_id: str) -> None:
        self._abandoned.add(ticket_id)
        asyncio.get_running_loop().call_later(FORGET_AFTER_S, self._abandoned.discard, ticket_id)
        self._spawn(self._quietly(self._settle_ticket(ticket_id, timed_out=True)))

    async def _settle_ticket(self, ticket_id: str, *, timed_out: bool) -> None:
        """Ask Redis where a waiting ticket stands; take it out of line if `timed_out`.

        A grant that raced with the timeout is delivered (or given back when
        the client left), never lost.
        """
        try:
            status, _, token = await self._call("cancel", ticket_id, "1" if timed_out else "0")
        except SchedulerUnavailable as error:
            self._fail(ticket_id, error)
            return
        if status == "granted":
            self._deliver(ticket_id, token)
        elif status == "removed":
            ticket = self._waiting.get(ticket_id)
            self._fail(ticket_id, QueueTimeout(ticket.model.name if ticket else ""))
        elif status == "missing":  # Redis lost it (restarted): answer 503 rather than hang
            self._fail(ticket_id, SchedulerUnavailable("the shared queue lost this request"))

    def _fail(self, ticket_id: str, error: Exception) -> None:
        ticket = self._waiting.pop(ticket_id, None)
        if ticket is not None and ticket.future is not None and not ticket.future.done():
            ticket.future.set_exception(error)

    def _undo_acquire(self, call: asyncio.Task[_Reply]) -> None:
        """The client left while its acquire was in Redis: give back what it got."""
        if call.cancelled() or call.exception() is not None:
            return
        status, _, handle = call.result()
        if status == "granted":
            self._spawn(self._end(handle))
        elif status == "queued":
            token = self._early.pop(handle, None)
            if token is not None:
                self._spawn(self._end(token))
            self._abandon(handle)

    # --- background work ------------------------------------------------------------------

    async def _listen(self, lost: bool = False) -> None:
        """Grants for this replica's tickets, published by whichever replica freed a slot.

        `lost`: grants may have been published where this replica was not listening
        (a Sentinel failover moved the master): ask Redis about every waiting ticket.
        """
        channel = f"{self.prefix}g:{self.replica}"
        while True:
            listener = self._connector.single()
            pubsub = listener.pubsub()
            try:
                await pubsub.subscribe(channel)
                if lost:  # grants may have been published while we were away
                    for ticket_id in list(self._waiting):
                        await self._settle_ticket(ticket_id, timed_out=False)
                    lost = False
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        ticket_id, token = message["data"].split(SEP, 1)
                        self._deliver(ticket_id, token)
            except (RedisError, OSError):
                lost = True
                self._set_available(False)
                for ticket_id in list(self._waiting):  # 503 now rather than at their timeout
                    self._fail(ticket_id, SchedulerUnavailable("lost the shared scheduler"))
                    self._abandon(ticket_id)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py lacks the hint
                    await listener.aclose()

    async def _renew(self) -> None:
        """Push back the deadlines of this replica's leases; put back any Redis lost.

        Behind Sentinel, first follow a failover: the renewal then puts this
        replica's live leases on the new master, whatever the old one had.
        """
        try:
            if await self._connector.master_moved():
                log.warning("the shared scheduler's Redis master moved: following it")
                self._follow_master()
        except (RedisError, OSError) as error:
            log.warning("no Sentinel answered: %s", type(error).__name__)
        tokens = [lease.token for lease in self.leases]
        try:
            _, registered, _ = await self._call("renew", *tokens)
            if registered != "1":  # Redis lost its data (restarted)
                await self._register(recovering=True)
        except SchedulerUnavailable:
            pass  # logged and counted by _call; the next round retries
        # A lease released while the renewal was on its way: if its release reached Redis
        # first, the renewal put it back as "lost". Release it again (a no-op otherwise).
        live = {lease.token for lease in self.leases}
        for token in tokens:
            if token not in live:
                self._spawn(self._end(token))

    def _follow_master(self) -> None:
        """Listen for grants on the new master (the old listener hears nothing any more)."""
        if self._listener is not None:
            self._listener.cancel()
        self._listener = asyncio.create_task(self._listen(lost=True), name="redis-grants")

    async def _reap(self) -> None:
        with contextlib.suppress(SchedulerUnavailable):
            await self._call("reap")

    async def _register(self, recovering: bool = False) -> None:
        """Tell Redis which backends each model has, with their caps (for the pump).

        `recovering`: Redis lost its data; it places nothing for the recovery window,
        while every replica's renewal puts its live leases back.
        """
        args = [str(self._recovery_ms if recovering else 0)]
        for entry in self.catalog:
            owned = any(backend.owner for backend in entry.backends)
            args += [entry.name, str(int(owned)), str(len(entry.backends))]
            for backend in entry.backends:
                args += [backend.name, str(backend.max_concurrency)]
        await self._call("register", *args)

    async def _end(
        self, token: str, outcome: str = "-", circuit: CircuitBreaker | None = None
    ) -> None:
        """Release a lease in Redis: `outcome` 'ok', 'failed' or '-' (unknown) feeds the
        shared circuit, which opens after `circuit`'s threshold of failures in a row."""
        threshold, open_ms = (
            (circuit.failure_threshold, round(circuit.open_s * 1000)) if circuit else (0, 0)
        )
        with contextlib.suppress(SchedulerUnavailable):  # unrenewed, the reaper frees it
            await self._call("release", token, outcome, str(threshold), str(open_ms))

    # --- Redis calls ----------------------------------------------------------------------

    async def _call(self, op: str, *args: str) -> _Reply:
        """Run one operation of the script; mirror the counts, deliver this replica's grants."""
        try:
            reply = await self._script(
                keys=[], args=[op, self.prefix, self.replica, self._ttl_ms, *args]
            )
        except (RedisError, OSError) as error:
            self._set_available(False)
            log.warning("shared scheduler unreachable during %s: %s", op, type(error).__name__)
            raise SchedulerUnavailable(str(error)) from None
        self._set_available(True)
        status, a, b, counts, grants, version, circuits = reply
        if version > self._version:  # a reply overtaken by a later one has older state
            self._version = version
            for i in range(0, len(counts), 2):
                backend = self._by_name.get(counts[i])
                if backend is not None:
                    backend.in_flight = int(counts[i + 1])
            self._mirror_circuits(dict(zip(circuits[::2], circuits[1::2], strict=True)))
        for i in range(0, len(grants), 2):
            self._deliver(str(grants[i]), grants[i + 1])
        return str(status), str(a), str(b)

    def _mirror_circuits(self, not_closed: dict[str, int]) -> None:
        """Make this replica's breakers follow the shared circuits (ms left open; 0: half-open)."""
        for name, backend in self._by_name.items():
            left_ms = not_closed.get(name)
            if left_ms is None:
                if backend.circuit.state is not CircuitState.CLOSED:
                    backend.circuit.on_success()  # another replica's trial succeeded
            elif left_ms > 0:
                backend.circuit.open_for(left_ms / 1000)

    def _set_available(self, available: bool) -> None:
        if available != self._available:
            self._available = available
            self._version = 0  # a restarted Redis counts versions from zero again
            if available:
                log.warning("shared scheduler reachable again")
            if self._on_availability is not None:
                self._on_availability(available)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    @staticmethod
    async def _quietly(work: Awaitable[Any]) -> None:
        with contextlib.suppress(SchedulerUnavailable):
            await work


def _key(key_id: int | None) -> str:
    return "-" if key_id is None else str(key_id)
