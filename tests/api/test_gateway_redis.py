"""A gateway on the Redis engine (`scheduler_url`), and what clients see when Redis goes away."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from aiguillage.dispatch.redis_scheduler import RedisScheduler
from tests.dispatch.engines import free_port, own_redis
from tests.fakes.engine import FakeEngine
from tests.harness import RunningGateway

CHAT = [{"role": "user", "content": "Hello"}]


def until_served(client: httpx.Client, body: dict[str, object]) -> None:
    """Post until answered 200; in between, only fast 503s from the scheduler."""
    deadline = time.monotonic() + 10
    while (response := client.post("/v1/chat/completions", json=body)).status_code != 200:
        assert response.json()["error"]["code"] == "scheduler_unavailable"
        assert time.monotonic() < deadline, "the gateway did not recover"
        time.sleep(0.2)


def test_redis_outage_is_a_fast_503_then_the_gateway_recovers(
    fake_engine: FakeEngine, tmp_path: Path
) -> None:
    port = free_port()
    settings = {
        "scheduler_url": f"redis://127.0.0.1:{port}/0",
        "models": [{"name": "m", "servers": [{"url": fake_engine.url("ok-redis")}]}],
    }
    with own_redis(port) as server:
        gateway = RunningGateway(settings, tmp_path).start()
        try:
            assert isinstance(gateway.app.gateway.scheduler, RedisScheduler)
            key = gateway.create_key(name="k", organisation="o")[0]
            headers = {"authorization": f"Bearer {key}"}
            body = {"model": "m", "messages": CHAT}
            with httpx.Client(base_url=gateway.url, headers=headers, timeout=10) as client:
                until_served(client, body)  # a Redis just started: a short recovery window
                server.kill()
                server.wait()
                started = time.monotonic()
                refused = client.post("/v1/chat/completions", json=body)
                assert time.monotonic() - started < 3
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "scheduler_unavailable"
                assert refused.headers["retry-after"] == "1"
                assert "aiguillage_scheduler_unavailable 1.0" in client.get("/metrics").text
                with own_redis(port):  # back, empty
                    until_served(client, body)
                    assert "aiguillage_scheduler_unavailable 0.0" in client.get("/metrics").text
        finally:
            gateway.stop()
