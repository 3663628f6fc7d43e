"""The circuit breaker, and a circuit opened elsewhere (another gateway replica)."""

from __future__ import annotations

from aiguillage.backends.circuit import CircuitBreaker, CircuitState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opened_elsewhere_stays_open_for_the_time_left_then_allows_a_trial() -> None:
    clock = Clock()
    circuit = CircuitBreaker(failure_threshold=3, open_s=10, clock=clock)
    circuit.open_for(4)
    assert circuit.state is CircuitState.OPEN and not circuit.allows()
    clock.now += 3.9
    assert not circuit.allows()
    clock.now += 0.2
    assert circuit.state is CircuitState.HALF_OPEN and circuit.allows()


def test_opened_elsewhere_keeps_an_open_circuit_s_end_and_reopens_a_half_open_one() -> None:
    clock = Clock()
    circuit = CircuitBreaker(failure_threshold=1, open_s=10, clock=clock)
    circuit.on_failure()
    circuit.open_for(2)  # already open here: its own end stands
    clock.now += 5
    assert circuit.state is CircuitState.OPEN
    clock.now += 5  # half-open here, but another replica's trial failed: open again
    circuit.open_for(5)
    assert circuit.state is CircuitState.OPEN
    clock.now += 5
    assert circuit.state is CircuitState.HALF_OPEN
