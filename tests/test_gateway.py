"""The gateway's own checks, without HTTP: critical models and readiness."""

from __future__ import annotations

from collections.abc import Sequence

from aiguillage.accounting.usage import UsageRecord
from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.catalog.config import parse_config
from aiguillage.gateway import Gateway


async def _no_key(key_hash: str) -> ApiKeyRecord | None:
    return None


async def _drop(rows: Sequence[UsageRecord]) -> None:
    return None


def test_a_critical_model_below_its_minimum_is_reported_degraded() -> None:
    config = parse_config(
        {
            "models": [
                {
                    "name": "vital",
                    "critical": True,
                    "min_healthy_backends": 2,
                    "servers": [{"url": "http://127.0.0.1:9"}, {"url": "http://127.0.0.1:10"}],
                },
                {"name": "chat", "servers": [{"url": "http://127.0.0.1:9"}]},
            ]
        }
    )
    gateway = Gateway(config, key_lookup=_no_key, usage_sink=_drop)
    assert gateway.critical_degraded() == {"vital": False}  # only critical models are watched
    vital = gateway.catalog.resolve("vital")
    assert vital is not None
    vital.backends[1].healthy = False
    assert gateway.critical_degraded() == {"vital": True}
    assert gateway.ready() == {"vital": True, "chat": True}  # still served, but under minimum
    vital.backends[0].healthy = False
    assert gateway.ready() == {"vital": False, "chat": False}
