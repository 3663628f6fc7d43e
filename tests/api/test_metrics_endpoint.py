"""GET /metrics: open by default (Prometheus's habit), behind a bearer token when one is set."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.fakes.engine import FakeEngine
from tests.harness import RunningGateway

TOKEN = "scrape-token-0123456789"


def test_metrics_ask_for_the_token_when_one_is_set(fake_engine: FakeEngine, tmp_path: Path) -> None:
    settings = {
        "metrics_token": TOKEN,
        "models": [{"name": "chat", "servers": [{"url": fake_engine.url("ok")}]}],
    }
    gateway = RunningGateway(settings, tmp_path).start()
    try:
        for headers in ({}, {"authorization": "Bearer not-the-token"}):
            refused = httpx.get(f"{gateway.url}/metrics", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_metrics_token"
            assert TOKEN not in refused.text
        allowed = httpx.get(f"{gateway.url}/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 200
        assert "aiguillage_backend_in_flight" in allowed.text
    finally:
        gateway.stop()
