"""One row of the usage ledger: what a request cost and how it went."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class UsageSource(StrEnum):
    """Where the token counts of a row come from."""

    ENGINE = "engine"  # the engine's own `usage` object
    ESTIMATED = "estimated"  # counted from relayed stream events (client went away first)
    NONE = "none"  # nothing is known (error before any answer)


@dataclass(slots=True)
class UsageRecord:
    started_at: datetime  # timezone-aware UTC
    request_id: str
    key_id: int | None
    organisation: str | None
    model: str
    backend: str | None
    endpoint: str
    status: int
    stream: bool
    cancelled: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    usage_source: UsageSource
    ttft_ms: float | None
    duration_ms: float
