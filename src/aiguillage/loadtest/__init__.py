"""`aiguillage loadtest`: put the federation's traffic shape on a gateway and measure it.

The point is to see what priority scheduling buys under contention: interactive
users with a high-priority key and batch users with a low-priority key share one
gateway, and the report compares their TTFT and latency. `scenario` says who
sends what and when, `runner` sends it and records every request, `report` turns
the records into a table, a CSV, a summary and a plot.

Only loopback targets are accepted unless the caller opts out explicitly: the
project's tests and benchmarks never aim traffic at someone else's machine.
"""

from aiguillage.loadtest.runner import LoadRunner, RequestRecord, RunResult, Sample
from aiguillage.loadtest.scenario import (
    RemoteTargetError,
    Scenario,
    ScenarioError,
    UserClass,
    check_target,
    load_scenario,
    seeds_scenario,
)

__all__ = [
    "LoadRunner",
    "RemoteTargetError",
    "RequestRecord",
    "RunResult",
    "Sample",
    "Scenario",
    "ScenarioError",
    "UserClass",
    "check_target",
    "load_scenario",
    "seeds_scenario",
]
