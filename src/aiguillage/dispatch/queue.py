"""One model's waiting line: strict priority between levels, fairness between organisations.

Within a priority level each organisation has its own FIFO, and organisations
are served in turn (round-robin), so one organisation flooding a level cannot
starve another at the same level. A retried ticket keeps its arrival number
and goes back to its place, not to the end of the line.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterator

from aiguillage.dispatch.tickets import Ticket


class _Level:
    """The tickets of one priority: a FIFO per organisation, organisations in a ring."""

    __slots__ = ("cursor", "fifos", "ring")

    def __init__(self) -> None:
        self.fifos: dict[str, list[Ticket]] = {}
        self.ring: list[str] = []
        self.cursor = 0

    def push(self, ticket: Ticket) -> None:
        fifo = self.fifos.get(ticket.organisation)
        if fifo is None:
            fifo = self.fifos[ticket.organisation] = []
            self.ring.append(ticket.organisation)
        if not fifo or fifo[-1].seq < ticket.seq:
            fifo.append(ticket)
        else:  # a retried ticket goes back to its place
            bisect.insort(fifo, ticket, key=lambda t: t.seq)

    def remove(self, ticket: Ticket) -> bool:
        fifo = self.fifos.get(ticket.organisation)
        if fifo is None or ticket not in fifo:
            return False
        fifo.remove(ticket)
        if not fifo:
            index = self.ring.index(ticket.organisation)
            del self.ring[index]
            del self.fifos[ticket.organisation]
            if index < self.cursor:
                self.cursor -= 1
            if self.cursor >= len(self.ring):
                self.cursor = 0
        return True

    def served(self, organisation: str) -> None:
        """The turn passes to the organisation after the one just served."""
        if organisation in self.fifos:
            self.cursor = (self.ring.index(organisation) + 1) % len(self.ring)

    def in_order(self) -> Iterator[Ticket]:
        """Tickets interleaved between organisations, starting with the one whose turn it is."""
        ring = self.ring[self.cursor :] + self.ring[: self.cursor]
        depth = 0
        while True:
            found = False
            for organisation in ring:
                fifo = self.fifos.get(organisation)
                if fifo is not None and depth < len(fifo):
                    found = True
                    yield fifo[depth]
            if not found:
                return
            depth += 1

    def __len__(self) -> int:
        return sum(len(fifo) for fifo in self.fifos.values())


class ModelQueue:
    def __init__(self) -> None:
        self._levels: dict[int, _Level] = {}
        self._priorities: list[int] = []  # descending
        self._by_key: defaultdict[int | None, int] = defaultdict(int)
        self.size = 0

    def push(self, ticket: Ticket) -> None:
        level = self._levels.get(ticket.priority)
        if level is None:
            level = self._levels[ticket.priority] = _Level()
            bisect.insort(self._priorities, -ticket.priority)
        level.push(ticket)
        self._by_key[ticket.key_id] += 1
        self.size += 1

    def remove(self, ticket: Ticket) -> bool:
        level = self._levels.get(ticket.priority)
        if level is None or not level.remove(ticket):
            return False
        if not level.fifos:
            del self._levels[ticket.priority]
            self._priorities.remove(-ticket.priority)
        self._by_key[ticket.key_id] -= 1
        if not self._by_key[ticket.key_id]:
            del self._by_key[ticket.key_id]
        self.size -= 1
        return True

    def served(self, ticket: Ticket) -> None:
        """Record that this ticket's organisation was just served at its level."""
        level = self._levels.get(ticket.priority)
        if level is not None:
            level.served(ticket.organisation)

    def waiting_for_key(self, key_id: int | None) -> int:
        return self._by_key.get(key_id, 0)

    def in_order(self) -> Iterator[Ticket]:
        """Every ticket, in the order they should be served."""
        for negative in list(self._priorities):
            level = self._levels.get(-negative)
            if level is not None:
                yield from level.in_order()

    def snapshot(self) -> dict[int, dict[str, int]]:
        """Waiting tickets by priority and organisation (for /admin/dispatch and metrics)."""
        return {
            -negative: {org: len(fifo) for org, fifo in self._levels[-negative].fifos.items()}
            for negative in self._priorities
        }

    def __len__(self) -> int:
        return self.size
