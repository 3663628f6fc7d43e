"""Who is calling: the record behind an API key, as the hot path sees it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key's settings. The secret itself is never held: only its hash is stored."""

    id: int
    name: str
    organisation: str
    prefix: str
    priority: int
    queue_threshold: int
    allowed_models: tuple[str, ...] | None  # None means every model
    is_admin: bool
    expires_at: datetime | None  # timezone-aware UTC
    revoked: bool
    created_at: datetime
    routing_mode: str = "any"  # any | private-first | private-only (see dispatch.tickets)

    def may_use(self, model_name: str) -> bool:
        """Whether this key may call the model with this public name."""
        return self.allowed_models is None or model_name in self.allowed_models

    def is_expired(self, now: datetime | None = None) -> bool:
        if self.expires_at is None:
            return False
        return (now or datetime.now(UTC)) >= self.expires_at
