"""Placement rules shared by every dispatcher engine: which backend may take a ticket.

The in-process and the Redis engines apply the same rules; only where the
in-flight counts live differs (a `Backend` attribute here, a Redis hash there,
mirrored into the attribute after each Redis call). docs/dispatch.md explains each rule.
"""

from __future__ import annotations

import math

from aiguillage.backends.backend import Backend
from aiguillage.dispatch.dispatcher import NoBackendAvailable, NoPrivateBackend
from aiguillage.dispatch.tickets import RoutingMode, Ticket


def check_servable(ticket: Ticket) -> None:
    """Raise at once when no backend could ever take this ticket now."""
    backends = [b for b in ticket.model.backends if b not in ticket.exclude]
    if ticket.routing_mode is RoutingMode.PRIVATE_ONLY:
        backends = [b for b in backends if b.owner == ticket.organisation]
        if not any(b.owner == ticket.organisation for b in ticket.model.backends):
            raise NoPrivateBackend(ticket.model.name)
    if not any(backend.usable() for backend in backends):
        raise NoBackendAvailable(ticket.model.name)


def slot_limit(ticket: Ticket, backend: Backend) -> int:
    """How many of our requests this backend may hold when this ticket is added.

    Owner reservations, the critical models' reservation and the
    parallel-threshold QoS share all lower it below `max_concurrency`.
    """
    owner = backend.owner is not None and backend.owner == ticket.organisation
    limit = backend.max_concurrency
    if not owner:
        limit -= backend.owner_reserved
    config = ticket.model.config
    if not config.critical:
        limit -= backend.reserved_for_critical
    if config.qos.policy == "parallel-threshold" and not owner:
        share = config.qos.share_for(ticket.priority)
        limit = min(limit, max(1, math.floor(share * backend.max_concurrency)))
    return limit


def allowed(ticket: Ticket, backend: Backend) -> bool:
    """Whether the backend may take the ticket at all, whatever its load."""
    if backend in ticket.exclude or not backend.usable():
        return False
    return not (
        ticket.routing_mode is RoutingMode.PRIVATE_ONLY and backend.owner != ticket.organisation
    )


def held_by_performance_policy(ticket: Ticket, backend: Backend) -> bool:
    """The `performance` QoS policy keeps low priorities off a busy backend that is slow.

    An idle backend is always fast enough, so this only applies while it holds
    at least one request: the Redis engine encodes it as a limit of one.
    """
    qos = ticket.model.config.qos
    if (
        qos.policy != "performance"
        or ticket.priority >= qos.protected_priority
        or backend.owner == ticket.organisation
    ):
        return False
    ttft = backend.ttft_ewma_s
    signals = backend.load
    if ttft is None and signals is not None:
        ttft = signals.ttft_p95_s
    if ttft is not None and ttft > qos.ttft_target_s:
        return True
    waiting = signals.waiting if signals is not None else None
    return waiting is not None and waiting > qos.engine_queue_target


def effective_limit(ticket: Ticket, backend: Backend) -> int:
    """`slot_limit`, lowered to one while the performance policy holds the ticket off."""
    limit = slot_limit(ticket, backend)
    return min(limit, 1) if held_by_performance_policy(ticket, backend) else limit


def may_take(ticket: Ticket, backend: Backend) -> bool:
    """Allowed, and under its limit for this ticket by the backend's known in-flight count."""
    return allowed(ticket, backend) and backend.in_flight < effective_limit(ticket, backend)
