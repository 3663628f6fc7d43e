"""The dispatcher interface: the one place where a request gets a backend.

Every request turns into a `Ticket` and asks a `Dispatcher` for a `Lease` on
one backend of its model; it gives the lease back when its answer ends. The
in-process `LocalScheduler` implements it; a shared (Redis) implementation for
several gateway replicas implements the same interface and passes the same
tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from aiguillage.dispatch.tickets import Lease, Ticket

if TYPE_CHECKING:
    from aiguillage.backends.backend import Backend


class DispatchError(Exception):
    """A ticket that cannot be served; the relay turns it into an HTTP error."""


class NoBackendAvailable(DispatchError):
    """Every backend of the model is down, open-circuited, or already tried."""


class NoPrivateBackend(DispatchError):
    """A private-only key asked for a model its organisation does not host."""


class QueueFull(DispatchError):
    """The key already has more waiting requests than its queue threshold."""


class QueueTimeout(DispatchError):
    """The ticket waited the model's `queue_timeout_s` without a backend becoming free."""


class SchedulerUnavailable(DispatchError):
    """The shared scheduler (Redis) cannot be reached: answer 503 fast, retry shortly."""


class Dispatcher(Protocol):
    async def acquire(self, ticket: Ticket) -> Lease:
        """A lease on a backend of the ticket's model, never one in `ticket.exclude`;
        waits in the model's queue if needed; raises a `DispatchError`."""
        ...

    def release(self, lease: Lease, ok: bool | None) -> None:
        """End a lease (idempotent); `ok` tells the circuit breaker how it went."""
        ...

    def backend_changed(self, backend: Backend) -> None:
        """Capacity or health of a backend changed: waiting tickets may move."""
        ...

    def catalog_changed(self) -> None:
        """The catalog's models/backends changed: re-index them, keep queues and leases."""
        ...

    def in_flight(self, backend: Backend) -> int:
        """Requests on this backend through the gateway (all replicas for a shared engine)."""
        ...

    def reclaim_stale_leases(self, max_age_s: float) -> int:
        """Release leases not renewed for `max_age_s` (a lost release); returns how many."""
        ...

    async def explain(self) -> dict[str, Any]:
        """What /admin/dispatch shows: queues, backends, recent decisions."""
        ...

    async def start(self) -> None:
        """Connect and start background work (lease renewal, wake-ups); before any acquire."""
        ...

    async def close(self) -> None:
        """Stop background work and disconnect."""
        ...

    async def settled(self) -> None:
        """Return once every operation already started (releases, pumps) has taken effect."""
        ...
