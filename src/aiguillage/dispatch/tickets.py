"""Tickets (requests waiting for a backend) and leases (the right to use one)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiguillage.backends.backend import Backend
    from aiguillage.catalog.catalog import ModelEntry


class RoutingMode(StrEnum):
    """Where a key's requests may go, with respect to backends its organisation hosts."""

    ANY = "any"
    PRIVATE_FIRST = "private-first"  # its organisation's backends first, then any
    PRIVATE_ONLY = "private-only"  # its organisation's backends only


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's place in its model's queue; the same ticket is kept across retries."""

    model: ModelEntry
    organisation: str
    priority: int
    key_id: int | None = None
    queue_threshold: int = 1_000_000
    routing_mode: RoutingMode = RoutingMode.ANY
    prefix: str | None = None  # the prompt's leading part, for prefix affinity
    seq: int = 0  # arrival order, set when first queued; kept on retry
    enqueued_at: float = 0.0
    exclude: frozenset[Backend] = frozenset()
    future: asyncio.Future[Lease] | None = None
    timer: asyncio.TimerHandle | None = None
    waited_s: float = 0.0


@dataclass(eq=False, slots=True)
class Lease:
    """The right to send one request to one backend; released exactly once."""

    backend: Backend
    ticket: Ticket
    acquired_at: float = field(default_factory=time.monotonic)
    renewed_at: float = field(default_factory=time.monotonic)
    released: bool = False
    reason: str = ""  # why this backend, for /admin/dispatch
    token: str = ""  # the shared engine's name for this lease (Redis: its member in the lease set)

    def renew(self, now: float) -> None:
        """Called as a stream progresses, so long answers keep their lease."""
        self.renewed_at = now
