"""The in-process scheduler: per-model priority queues, leases, QoS and owner-first placement.

A request becomes a `Ticket`. When nobody waits for its model and a backend
may take it, it gets a `Lease` at once (the fast path: no future, no timer).
Otherwise it joins its model's queue and waits until the scheduler grants it
a lease or its `queue_timeout_s` passes. The scheduler re-examines a model's
queue ("pumps" it) whenever a ticket arrives, a lease ends, or a backend's
state changes; it never polls.

Placement rules, in order (docs/dispatch.md explains each):
1. a backend never gets more of our requests than its `max_concurrency`;
2. slots reserved for a server's owner (`owner_reserved`) or for critical
   models are not given to others;
3. the model's QoS policy may keep lower priorities off a backend;
4. the key's routing mode may restrict it to its organisation's backends;
5. the model's strategy ranks what is left.
Owners go first ("coupe-file"): when a backend frees up, waiting tickets of
the organisation hosting it are placed on it before anyone else's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiguillage.backends.backend import Backend
from aiguillage.catalog.catalog import Catalog, ModelEntry
from aiguillage.dispatch.dispatcher import NoBackendAvailable, QueueFull, QueueTimeout
from aiguillage.dispatch.placement import check_servable, may_take
from aiguillage.dispatch.queue import ModelQueue
from aiguillage.dispatch.strategies import Strategy, load_of, make_strategy
from aiguillage.dispatch.tickets import Lease, RoutingMode, Ticket

log = logging.getLogger(__name__)

DECISIONS_KEPT = 50


@dataclass
class ModelState:
    model: ModelEntry
    strategy: Strategy
    queue: ModelQueue = field(default_factory=ModelQueue)
    decisions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=DECISIONS_KEPT))


class LocalScheduler:
    """The `Dispatcher` of one gateway process (the Redis one shares state between many)."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        site: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_queue_change: Callable[[ModelEntry, ModelQueue], None] | None = None,
    ) -> None:
        self.catalog = catalog
        self._site = site
        self._clock = clock
        self._on_queue_change = on_queue_change
        self._seq = itertools.count(1)
        self._states: dict[str, ModelState] = {}
        self._models_of: dict[Backend, list[ModelState]] = {}
        self.leases: set[Lease] = set()
        self.catalog_changed()

    def catalog_changed(self) -> None:
        """The catalog's models or backends changed (`self.catalog` edited or replaced).

        Models are re-indexed; a model that stays keeps its queue, decisions and,
        when its backends are the same, its strategy (a round-robin keeps its turn).
        Leases are untouched: they end on the backend they were granted on. Tickets
        waiting for a model that disappeared fail with `NoBackendAvailable`.
        """
        previous = self._states
        self._states = {}
        self._models_of = {}
        for entry in self.catalog:
            strategy = make_strategy(entry.config.routing_strategy, entry.backends, self._site)
            state = previous.pop(entry.name, None)
            if state is None:
                state = ModelState(entry, strategy)
            elif (state.model.backends, state.strategy.name) != (entry.backends, strategy.name):
                state.strategy = strategy
            state.model = entry
            self._states[entry.name] = state
            for backend in entry.backends:
                self._models_of.setdefault(backend, []).append(state)
        for gone in previous.values():
            for ticket in list(gone.queue.in_order()):
                gone.queue.remove(ticket)
                if ticket.future is not None and not ticket.future.done():
                    ticket.future.set_exception(NoBackendAvailable(gone.model.name))
        for state in self._states.values():
            self._pump(state)

    # --- the Dispatcher interface ---------------------------------------------------------

    async def acquire(self, ticket: Ticket) -> Lease:
        """A lease for this ticket, at once or after waiting its turn; raises `DispatchError`."""
        state = self._states[ticket.model.name]
        check_servable(ticket)
        if not ticket.seq:
            ticket.seq = next(self._seq)
            ticket.enqueued_at = self._clock()
        if not state.queue.size:  # nobody waits: place now or queue
            placed = self._place(ticket, state)
            if placed is not None:
                return self._grant(ticket, state, *placed)
        if state.queue.waiting_for_key(ticket.key_id) >= ticket.queue_threshold:
            raise QueueFull(ticket.model.name)
        loop = asyncio.get_running_loop()
        ticket.future = loop.create_future()
        ticket.timer = loop.call_later(
            ticket.model.config.queue_timeout_s, self._expire, ticket, state
        )
        state.queue.push(ticket)
        self._queue_changed(state)
        self._pump(state)
        try:
            return await ticket.future
        except asyncio.CancelledError:  # the client left while waiting
            if state.queue.remove(ticket):
                self._queue_changed(state)
            future = ticket.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result(), ok=None)  # granted just as it was cancelled
            raise
        finally:
            ticket.timer.cancel()
            ticket.future = None

    def release(self, lease: Lease, ok: bool | None) -> None:
        """End a lease: `ok` True/False feeds the circuit breaker, None is neutral."""
        if lease.released:
            return
        self._end_here(lease, ok)
        self.backend_changed(lease.backend)

    def _end_here(self, lease: Lease, ok: bool | None) -> None:
        """This process's part of ending a lease: its count, and the circuit breaker fed
        with how it went."""
        lease.released = True
        self.leases.discard(lease)
        backend = lease.backend
        backend.in_flight -= 1
        if ok is True:
            backend.circuit.on_success()
        elif ok is False:
            backend.circuit.on_failure()

    def in_flight(self, backend: Backend) -> int:
        return backend.in_flight

    async def start(self) -> None:
        """Nothing to connect to: the state lives in this process."""

    async def close(self) -> None:
        """Nothing to disconnect."""

    async def settled(self) -> None:
        """Everything here is synchronous: one turn of the loop lets woken tasks run."""
        await asyncio.sleep(0)

    def backend_changed(self, backend: Backend) -> None:
        """Capacity or health of a backend changed: its models' queues may move."""
        for state in self._models_of.get(backend, ()):
            if state.queue.size:
                self._pump(state)

    # --- placement ------------------------------------------------------------------------

    def _place(
        self, ticket: Ticket, state: ModelState, only: Sequence[Backend] | None = None
    ) -> tuple[Backend, str, int] | None:
        backends = only if only is not None else ticket.model.backends
        candidates = [backend for backend in backends if may_take(ticket, backend)]
        if not candidates:
            return None
        if ticket.routing_mode is RoutingMode.PRIVATE_FIRST:
            own = [b for b in candidates if b.owner == ticket.organisation]
            if own:
                backend, reason = state.strategy.choose(ticket, own)
                return backend, f"private first: {reason}", len(candidates)
        backend, reason = state.strategy.choose(ticket, candidates)
        return backend, reason, len(candidates)

    def _grant(
        self, ticket: Ticket, state: ModelState, backend: Backend, reason: str, candidates: int
    ) -> Lease:
        backend.in_flight += 1
        return self._record_grant(ticket, state, backend, reason, candidates)

    def _record_grant(
        self,
        ticket: Ticket,
        state: ModelState,
        backend: Backend,
        reason: str,
        candidates: int,
        token: str = "",
    ) -> Lease:
        """The lease, the circuit's trial accounting and the decision log of one grant."""
        now = self._clock()
        ticket.waited_s = now - ticket.enqueued_at
        backend.circuit.on_send()
        lease = Lease(backend, ticket, acquired_at=now, renewed_at=now, reason=reason, token=token)
        self.leases.add(lease)
        state.decisions.append(
            {
                "at": time.time(),
                "priority": ticket.priority,
                "organisation": ticket.organisation,
                "backend": backend.name,
                "reason": reason,
                "candidates": candidates,
                "waited_ms": round(ticket.waited_s * 1000, 3),
                "load": round(load_of(backend), 3),
            }
        )
        return lease

    def _pump(self, state: ModelState) -> None:
        """Give free capacity to waiting tickets, in order; owners first on their backends."""
        queue = state.queue
        if not queue.size:
            return
        granted = False
        tickets = list(queue.in_order())
        owners = {b.owner for b in state.model.backends if b.owner}
        for ticket in tickets:  # coupe-file: an organisation goes first on what it hosts
            if ticket.organisation in owners and self._has_room(state):
                own = [b for b in state.model.backends if b.owner == ticket.organisation]
                placed = self._place(ticket, state, only=own)
                if placed is not None:
                    granted |= self._hand_over(ticket, state, placed)
        for ticket in tickets:
            if ticket.future is None or ticket.future.done():
                continue
            if not self._has_room(state):
                break
            placed = self._place(ticket, state)
            if placed is not None:
                granted |= self._hand_over(ticket, state, placed)
        if granted:
            self._queue_changed(state)

    def _hand_over(
        self, ticket: Ticket, state: ModelState, placed: tuple[Backend, str, int]
    ) -> bool:
        future = ticket.future
        if future is None or future.done():
            return False
        state.queue.remove(ticket)
        state.queue.served(ticket)
        future.set_result(self._grant(ticket, state, *placed))
        return True

    @staticmethod
    def _has_room(state: ModelState) -> bool:
        return any(b.in_flight < b.max_concurrency and b.usable() for b in state.model.backends)

    def _expire(self, ticket: Ticket, state: ModelState) -> None:
        if state.queue.remove(ticket):
            self._queue_changed(state)
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_exception(QueueTimeout(ticket.model.name))

    def _queue_changed(self, state: ModelState) -> None:
        if self._on_queue_change is not None:
            self._on_queue_change(state.model, state.queue)

    # --- safety net and explanations ------------------------------------------------------

    def reclaim_stale_leases(self, max_age_s: float) -> int:
        """Release leases not renewed for `max_age_s` (a bug or a lost task); returns how many."""
        now = self._clock()
        stale = [lease for lease in self.leases if now - lease.renewed_at > max_age_s]
        for lease in stale:
            log.warning(
                "reclaiming a lease on %s held for %.0f s",
                lease.backend.name,
                now - lease.acquired_at,
            )
            self.release(lease, ok=None)
        return len(stale)

    async def explain(self) -> dict[str, Any]:
        """What /admin/dispatch shows: queues, backends, recent decisions."""
        backends: dict[str, dict[str, Any]] = {}
        for backend in self._models_of:
            signals = backend.load
            backends[backend.name] = {
                "in_flight": backend.in_flight,
                "max_concurrency": backend.max_concurrency,
                "load": round(load_of(backend), 3),
                "healthy": backend.healthy,
                "circuit": str(backend.circuit.state),
                "site": backend.site,
                "owner": backend.owner,
                "owner_reserved": backend.owner_reserved,
                "reserved_for_critical": backend.reserved_for_critical,
                "ttft_ewma_ms": None
                if backend.ttft_ewma_s is None
                else round(backend.ttft_ewma_s * 1000, 1),
                "engine": None
                if signals is None
                else {
                    "running": signals.running,
                    "waiting": signals.waiting,
                    "kv_cache_usage": signals.kv_cache_usage,
                    "ttft_p95_s": signals.ttft_p95_s,
                },
                "leases": sum(1 for lease in self.leases if lease.backend is backend),
            }
        models = {
            name: {
                "strategy": state.strategy.name,
                "qos": state.model.config.qos.policy,
                "waiting": state.queue.size,
                "queue": {str(priority): orgs for priority, orgs in state.queue.snapshot().items()},
                "backends": [backend.name for backend in state.model.backends],
                "recent_decisions": list(state.decisions)[-20:],
            }
            for name, state in self._states.items()
        }
        return {"models": models, "backends": backends}
