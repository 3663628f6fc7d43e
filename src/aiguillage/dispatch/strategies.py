"""Strategies: which of the backends that may take a ticket now gets it.

The scheduler first narrows the model's backends to those allowed to take the
ticket now (capacity, QoS policy, owner reservations, routing mode, circuit);
a strategy only ranks what is left. Every strategy prefers the gateway's own
site when the choice is otherwise equal.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from aiguillage.backends.backend import Backend
from aiguillage.dispatch.tickets import Ticket

VIRTUAL_NODES = 64  # points per backend on the prefix-affinity hash ring
BOUNDED_LOAD = 1.25  # prefix affinity keeps a backend only while under 1.25 times the mean load


class Strategy(Protocol):
    name: str

    def choose(self, ticket: Ticket, candidates: Sequence[Backend]) -> tuple[Backend, str]:
        """The backend for this ticket among non-empty `candidates`, and why."""
        ...


def load_of(backend: Backend) -> float:
    """How busy a backend is, relative to its capacity: requests on it, and its KV-cache use.

    Our in-flight count is what we know for sure; the engine's own running plus
    waiting count is larger when other clients use it too (it includes ours, so
    the two are not added). KV-cache use comes from its scraped metrics, when it
    publishes any.
    """
    signals = None if backend.load_stale else backend.load
    requests = float(backend.in_flight)
    kv = 0.0
    if signals is not None:  # the engine's own count includes ours and other clients'
        requests = max(requests, (signals.running or 0.0) + (signals.waiting or 0.0))
        kv = signals.kv_cache_usage or 0.0
    return requests / backend.max_concurrency + kv


class _SitePreference:
    def __init__(self, site: str | None, rng: random.Random) -> None:
        self.site = site
        self.rng = rng

    def best(self, scored: list[tuple[float, Backend]]) -> Backend:
        """Lowest score; ties go to the local site, then at random."""
        low = min(score for score, _ in scored)
        tied = [backend for score, backend in scored if score <= low + 1e-9]
        local = [backend for backend in tied if self.site and backend.site == self.site]
        return self.rng.choice(local or tied)


class RoundRobin:
    name = "round-robin"

    def __init__(self, site: str | None = None) -> None:
        self._turn = itertools.count()
        self._site = site

    def choose(self, ticket: Ticket, candidates: Sequence[Backend]) -> tuple[Backend, str]:
        local = [b for b in candidates if self._site and b.site == self._site]
        pool = local or candidates
        return pool[next(self._turn) % len(pool)], "next in turn"


class Weighted:
    """Smooth weighted round-robin (as nginx does): shares follow the weights, evenly spread."""

    name = "weighted"

    def __init__(self) -> None:
        self._current: dict[Backend, float] = {}

    def choose(self, ticket: Ticket, candidates: Sequence[Backend]) -> tuple[Backend, str]:
        total = 0.0
        for backend in candidates:
            self._current[backend] = self._current.get(backend, 0.0) + backend.weight
            total += backend.weight
        chosen = max(candidates, key=lambda b: self._current[b])
        self._current[chosen] -= total
        return chosen, f"weight {chosen.weight:g} of {total:g}"


def recent_ttft(backend: Backend) -> float | None:
    """Our own running average of the backend's TTFT, else the engine's recent p95."""
    if backend.ttft_ewma_s is not None:
        return backend.ttft_ewma_s
    if backend.load is not None and not backend.load_stale:
        return backend.load.ttft_p95_s
    return None


class LeastBusy:
    """Lowest load relative to capacity (see `load_of`); ties at random, local site first.

    It balances the number of requests per slot. Between backends of different
    speeds that still leaves the slower one as many requests as the others: the
    `latency` strategy weighs by speed (docs/dispatch.md has the measurements).
    """

    name = "least-busy"

    def __init__(self, site: str | None = None, rng: random.Random | None = None) -> None:
        self._prefer = _SitePreference(site, rng or random.Random())

    def choose(self, ticket: Ticket, candidates: Sequence[Backend]) -> tuple[Backend, str]:
        scored = [(load_of(backend), backend) for backend in candidates]
        chosen = self._prefer.best(scored)
        return chosen, f"least busy (load {load_of(chosen):.2f})"


class Latency:
    """Lowest expected wait: recent TTFT times the requests already there, plus one.

    Plain "lowest TTFT" sends everything to the backend that was fastest a moment
    ago until it is not (the herding that makes some gateways send nearly all
    traffic to one backend); weighting by the requests in flight, as the peak-EWMA
    balancers do, spreads load in proportion to speed. A backend with no
    measurement yet counts as fast, so it gets tried.
    """

    name = "latency"

    def __init__(self, site: str | None = None, rng: random.Random | None = None) -> None:
        self._prefer = _SitePreference(site, rng or random.Random())

    @staticmethod
    def cost(backend: Backend) -> float:
        return (recent_ttft(backend) or 0.0) * (backend.in_flight + 1)

    def choose(self, ticket: Ticket, candidates: Sequence[Backend]) -> tuple[Backend, str]:
        chosen = self._prefer.best([(self.cost(backend), backend) for backend in candidates])
        ttft = recent_ttft(chosen) or 0.0
        return chosen, f"lowest expected wait (TTFT {ttft * 1000:.0f} ms, {chosen.in_flight} busy)"


class PrefixAffinity:
    """Consistent hashing of the prompt's prefix, with bounded load.

    Requests sharing a prefix land on the same backend, whose engine can reuse
    its KV cache for it. A backend keeps its prefixes only while its load stays
    under `BOUNDED_LOAD` times the mean: past that, the next backend on the ring
    takes over, and when none qualifies the least busy one does.
    """

    name = "prefix-affinity"

    def __init__(self, backends: Sequence[Backend], fallback: LeastBusy) -> None:
        points = []
        for backend in backends:
            for replica in range(VIRTUAL_NODES):
                points.append((_hash(f"{backend.name}#{replica}"), backend))
        points.sort(key=lambda point: point[0])
        self._keys = [point[0] for point in points]
        self._ring = [point[1] for point in points]
        self._fallback = fallback

    def choose(self, ticket: Ticket, candidates: Sequence[Backend]) -> tuple[Backend, str]:
        if not ticket.prefix or not self._ring:
            return self._fallback.choose(ticket, candidates)
        allowed = set(candidates)
        mean = sum(load_of(b) for b in candidates) / len(candidates)
        bound = max(mean * BOUNDED_LOAD, 1.0 / min(b.max_concurrency for b in candidates))
        start = bisect.bisect(self._keys, _hash(ticket.prefix))
        seen: set[Backend] = set()
        for offset in range(len(self._ring)):
            backend = self._ring[(start + offset) % len(self._ring)]
            if backend in seen:
                continue
            seen.add(backend)
            if backend in allowed and load_of(backend) <= bound:
                first = len(seen) == 1
                return backend, "prefix affinity" if first else "prefix affinity, next on ring"
        backend, _ = self._fallback.choose(ticket, candidates)
        return backend, "prefix affinity over bound: least busy"


class OwnerFirst:
    """Backends hosted by the requester's organisation first, then the least busy."""

    name = "owner-first"

    def __init__(self, fallback: LeastBusy) -> None:
        self._fallback = fallback

    def choose(self, ticket: Ticket, candidates: Sequence[Backend]) -> tuple[Backend, str]:
        own = [b for b in candidates if b.owner and b.owner == ticket.organisation]
        if own:
            backend, _ = self._fallback.choose(ticket, own)
            return backend, "owner's own backend"
        return self._fallback.choose(ticket, candidates)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def make_strategy(name: str, backends: Sequence[Backend], site: str | None) -> Strategy:
    """The strategy a model's configuration names."""
    least_busy = LeastBusy(site)
    strategies: dict[str, Callable[[], Strategy]] = {
        "round-robin": lambda: RoundRobin(site),
        "weighted": Weighted,
        "least-busy": lambda: least_busy,
        "latency": lambda: Latency(site),
        "prefix-affinity": lambda: PrefixAffinity(backends, least_busy),
        "owner-first": lambda: OwnerFirst(least_busy),
    }
    return strategies[name]()
