"""A passive circuit breaker per backend: stop sending to a backend that keeps failing.

Closed: traffic flows. After `failure_threshold` consecutive failures (connect
errors, 5xx before the first byte) it opens: no traffic for `open_s`. Then it is
half-open: one trial request (or a successful health probe) closes it again; a
failed trial opens it for another `open_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        open_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() >= self._opened_at + self.open_s:
            self._state = CircuitState.HALF_OPEN
            self._trial_in_flight = False
        return self._state

    def allows(self) -> bool:
        """Whether a request may be sent now (a half-open circuit lets one trial through)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        return state is CircuitState.HALF_OPEN and not self._trial_in_flight

    def on_send(self) -> None:
        """A request goes out; in half-open state it is the trial."""
        if self.state is CircuitState.HALF_OPEN:
            self._trial_in_flight = True

    def on_success(self) -> None:
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._trial_in_flight = False

    def on_failure(self) -> None:
        self._failures += 1
        if self.state is CircuitState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = CircuitState.OPEN
            self._opened_at = self._clock()
            self._trial_in_flight = False

    def on_probe(self, up: bool) -> None:
        """An active health probe: success closes a circuit once its open time is over."""
        if up and self.state is CircuitState.HALF_OPEN:
            self.on_success()
        elif not up and self.state is not CircuitState.CLOSED:
            self._opened_at = self._clock()
            self._state = CircuitState.OPEN

    def open_for(self, seconds: float) -> None:
        """The circuit shared by the gateway replicas is open: stay open here as long."""
        if self.state is not CircuitState.OPEN:
            self._state = CircuitState.OPEN
            self._opened_at = self._clock() - self.open_s + seconds
            self._trial_in_flight = False
