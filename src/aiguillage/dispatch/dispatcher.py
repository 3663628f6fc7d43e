"""Choosing a backend for a request: the interface the whole gateway goes through.

Every request asks a `Dispatcher` for a `Lease` on one backend of its model and
gives it back when its answer ends. This first implementation picks at once, in
round-robin; the priority-queue dispatcher replaces it behind the same interface.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import Protocol

from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.backends.backend import Backend
from aiguillage.catalog.catalog import ModelEntry


class NoBackendAvailable(Exception):
    """Every backend of the model was tried or is unusable."""


class Lease:
    """The right to send one request to one backend; released exactly once."""

    __slots__ = ("backend", "released")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.released = False
        backend.in_flight += 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.backend.in_flight -= 1


class Dispatcher(Protocol):
    async def acquire(
        self,
        model: ModelEntry,
        identity: ApiKeyRecord,
        priority: int,
        exclude: Collection[Backend] = (),
    ) -> Lease:
        """A lease on a backend of `model`, never one in `exclude`."""
        ...


class RoundRobinDispatcher:
    """Takes each model's backends in turn, skipping those down or at capacity.

    A backend marked down is still tried when nothing else is left: the health
    probe may be behind, and trying is better than refusing.
    """

    def __init__(self) -> None:
        self._turns: dict[str, itertools.count[int]] = {}

    async def acquire(
        self,
        model: ModelEntry,
        identity: ApiKeyRecord,
        priority: int,
        exclude: Collection[Backend] = (),
    ) -> Lease:
        return Lease(self.choose(model, exclude))

    def choose(self, model: ModelEntry, exclude: Collection[Backend] = ()) -> Backend:
        turn = next(self._turns.setdefault(model.name, itertools.count()))
        candidates = [backend for backend in model.backends if backend not in exclude]
        if not candidates:
            raise NoBackendAvailable(model.name)
        usable = [b for b in candidates if b.healthy and b.in_flight < b.max_concurrency]
        if usable:  # the turn goes round the usable ones only, so load stays even
            return usable[turn % len(usable)]
        healthy = [backend for backend in candidates if backend.healthy]
        return min(healthy or candidates, key=lambda backend: backend.in_flight)
