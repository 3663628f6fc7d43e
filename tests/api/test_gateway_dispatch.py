"""The dispatcher through the gateway: priorities, thresholds, queue timeouts, admin view."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.engine import FakeEngine
from tests.harness import RunningGateway

CHAT = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def gateway(
    fake_engine: FakeEngine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    settings = {
        "models": [
            {
                "name": "one-slot",
                "queue_timeout_s": 10,
                "servers": [{"url": fake_engine.url("slow-0.3"), "max_concurrency": 1}],
            },
            {
                "name": "tight",
                "queue_timeout_s": 0.3,
                "servers": [{"url": fake_engine.url("slow-1.0"), "max_concurrency": 1}],
            },
            {
                "name": "vllm-priority",
                "servers": [
                    {
                        "url": fake_engine.url("ok-prio"),
                        "engine": "vllm",
                        "priority_scheduling": True,
                    }
                ],
            },
            {"name": "plain", "servers": [{"url": fake_engine.url("ok-plain")}]},
        ]
    }
    running = RunningGateway(settings, tmp_path_factory.mktemp("dispatch")).start()
    yield running
    running.stop()


async def _chat(
    client: httpx.AsyncClient, key: str, model: str, **headers: str
) -> tuple[httpx.Response, float]:
    response = await client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": CHAT},
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=30,
    )
    return response, time.perf_counter()


async def test_high_priority_overtakes_waiting_low_priority(gateway: RunningGateway) -> None:
    high_key = gateway.create_key(name="interactive", organisation="a", priority=10)[0]
    low_key = gateway.create_key(name="batch", organisation="b", priority=1)[0]
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        busy = asyncio.ensure_future(_chat(client, low_key, "one-slot"))
        await asyncio.sleep(0.1)  # the only slot is taken
        lows = [asyncio.ensure_future(_chat(client, low_key, "one-slot")) for _ in range(3)]
        await asyncio.sleep(0.1)  # they queue
        high = asyncio.ensure_future(_chat(client, high_key, "one-slot"))
        results = await asyncio.gather(busy, *lows, high)
    assert all(response.status_code == 200 for response, _ in results)
    finished_high = results[-1][1]
    assert all(finished_high < finished for _, finished in results[1:-1])
    assert float(results[-1][0].headers["x-aiguillage-queue-ms"]) > 50  # it did wait


async def test_a_request_may_lower_its_priority_but_not_raise_it(
    gateway: RunningGateway, fake_engine: FakeEngine
) -> None:
    key = gateway.create_key(name="mid", organisation="c", priority=3)[0]
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        response, _ = await _chat(client, key, "vllm-priority", **{"x-priority": "9"})
        assert response.status_code == 200
        assert fake_engine.log.last().body["priority"] == 1000 - 3  # vLLM: lower is earlier
        response, _ = await _chat(client, key, "vllm-priority", **{"x-priority": "1"})
        assert fake_engine.log.last().body["priority"] == 1000 - 1
        response, _ = await _chat(client, key, "plain", **{"x-priority": "1"})
        assert "priority" not in fake_engine.log.last().body  # other engines never see it


async def test_a_key_over_its_queue_threshold_gets_429_at_once(gateway: RunningGateway) -> None:
    key = gateway.create_key(name="greedy", organisation="d", queue_threshold=1)[0]
    other = gateway.create_key(name="other", organisation="e")[0]
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        busy = asyncio.ensure_future(_chat(client, other, "one-slot"))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(_chat(client, key, "one-slot"))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        refused, _ = await _chat(client, key, "one-slot")
        assert time.perf_counter() - started < 0.2
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "queue_threshold_exceeded"
        assert (await waiting)[0].status_code == 200
        await busy


async def test_queue_timeout_is_503_with_retry_after(gateway: RunningGateway) -> None:
    key = gateway.create_key(name="late", organisation="f")[0]
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        busy = asyncio.ensure_future(_chat(client, key, "tight"))
        await asyncio.sleep(0.1)
        response, _ = await _chat(client, key, "tight")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "queue_timeout"
        assert int(response.headers["retry-after"]) >= 1
        assert (await busy)[0].status_code == 200


async def test_admin_dispatch_needs_an_admin_key_and_explains(gateway: RunningGateway) -> None:
    user = gateway.create_key(name="user", organisation="g")[0]
    admin = gateway.create_key(name="ops", organisation="ops", is_admin=True)[0]
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        assert (await client.get("/admin/dispatch")).status_code == 401
        denied = await client.get("/admin/dispatch", headers={"authorization": f"Bearer {user}"})
        assert denied.status_code == 403
        busy = asyncio.ensure_future(_chat(client, user, "one-slot"))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(_chat(client, user, "one-slot"))
        as_admin = {"authorization": f"Bearer {admin}"}
        for _ in range(50):  # until the second request is in the queue (a busy machine is slow)
            report: dict[str, Any] = (await client.get("/admin/dispatch", headers=as_admin)).json()
            if report["models"]["one-slot"]["waiting"]:
                break
            await asyncio.sleep(0.05)
        metrics = (await client.get("/metrics")).text
        await asyncio.gather(busy, queued)
    assert 'aiguillage_queue_depth{model="one-slot",priority="0"} 1.0' in metrics
    model = report["models"]["one-slot"]
    assert model["waiting"] == 1 and model["queue"] == {"0": {"g": 1}}
    assert model["recent_decisions"][-1]["reason"]
    backend = report["backends"][next(iter(report["backends"]))]
    assert {"in_flight", "circuit", "load", "leases"} <= set(backend)


async def test_private_only_key_without_a_server_of_its_own_gets_403(
    gateway: RunningGateway,
) -> None:
    key, record = gateway.create_key(name="own", organisation="lab", routing_mode="private-only")
    assert record.routing_mode == "private-only"
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        response, _ = await _chat(client, key, "plain")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "no_private_backend"
