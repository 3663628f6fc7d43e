"""The gateway over real HTTP, in front of the fake engine: relay, errors, failover, usage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.fakes.engine import FakeEngine
from tests.harness import RunningGateway

CHAT = [{"role": "user", "content": "Hello"}]


def _settings(engine: FakeEngine, closed_url: str) -> dict[str, Any]:
    def model(name: str, *modes: str, served: str | None = None, **extra: Any) -> dict[str, Any]:
        servers = [
            {"url": mode if mode.startswith("http") else engine.url(mode), "max_concurrency": 8}
            for mode in modes
        ]
        return {"name": name, "model": served or name, "servers": servers, **extra}

    return {
        "key_cache_ttl_s": 0.5,
        "first_byte_timeout_s": 1.0,
        "connect_timeout_s": 1.0,
        "health_interval_s": 0.5,
        "max_body_bytes": 4096,
        "ledger_flush_interval_s": 0.1,
        "models": [
            model("fake", "ok", served="fake-served", aliases=["fake-alias"]),
            model("org/fake-with-slash", "ok"),
            model("pair", "ok-a", "ok-b"),
            model("engine-400", "status-400"),
            model("engine-500", "status-500"),
            model("failover", closed_url, "ok"),
            model("failover-5xx", "status-503", "ok"),
            model("last-5xx", "status-502", "down"),
            model("dead", closed_url),
            model("slow", "slow-3"),
            model("midstream", "die-mid-stream"),
            model("slowstream", "slow-stream-0.05"),
            model("down-health", "down"),
        ],
    }


@pytest.fixture(scope="module")
def gateway(
    fake_engine: FakeEngine, closed_port_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    running = RunningGateway(
        _settings(fake_engine, closed_port_url), tmp_path_factory.mktemp("gateway")
    ).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def key(gateway: RunningGateway) -> str:
    return gateway.create_key(name="main", organisation="univ-a", priority=5)[0]


@pytest.fixture
def client(gateway: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=10)


def _post(gateway: RunningGateway, key: str | None, body: Any, **kwargs: Any) -> httpx.Response:
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(
        f"{gateway.url}/v1/chat/completions", content=content, headers=headers, timeout=10, **kwargs
    )


def _error(response: httpx.Response) -> dict[str, Any]:
    document = response.json()
    assert set(document) == {"error"}
    assert set(document["error"]) == {"message", "type", "param", "code"}
    return dict(document["error"])


# --- relay --------------------------------------------------------------------------------


def test_chat_is_relayed_with_the_served_model_name(
    client: openai.OpenAI, fake_engine: FakeEngine
) -> None:
    reply = client.chat.completions.create(model="fake-alias", messages=CHAT)
    assert reply.choices[0].message.content == "Hello from the fake engine."
    seen = fake_engine.log.last()
    assert seen.body["model"] == "fake-served"
    assert seen.body["messages"] == CHAT
    assert "authorization" not in {name.lower() for name in seen.headers}  # no token configured


def test_body_bytes_are_forwarded_untouched_when_no_rewrite_is_needed(
    gateway: RunningGateway, key: str, fake_engine: FakeEngine
) -> None:
    raw = b'{"model": "pair",   "messages": [{"role": "user", "content": "x"}], "temperature": 0.5}'
    response = _post(gateway, key, raw)
    assert response.status_code == 200
    assert fake_engine.log.last().raw == raw


def test_engine_headers_pass_through_and_ours_are_added(gateway: RunningGateway, key: str) -> None:
    response = _post(
        gateway, key, {"model": "fake", "messages": CHAT}, headers={"x-request-id": "req-123"}
    )
    assert response.headers["x-engine-detail"] == "kept"
    assert response.headers["x-request-id"] == "req-123"
    assert response.headers["x-aiguillage-backend"].startswith("127.0.0.1:")


def test_priority_is_removed_before_forwarding(
    gateway: RunningGateway, key: str, fake_engine: FakeEngine
) -> None:
    response = _post(gateway, key, {"model": "pair", "messages": CHAT, "priority": 3})
    assert response.status_code == 200
    assert "priority" not in fake_engine.log.last().body


def test_stream_is_relayed_chunk_by_chunk_without_the_injected_usage_event(
    client: openai.OpenAI, fake_engine: FakeEngine
) -> None:
    chunks = list(client.chat.completions.create(model="fake", messages=CHAT, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "".join(FakeEngine.WORDS)
    assert all(chunk.choices for chunk in chunks)  # the usage-only event we asked for is gone
    assert fake_engine.log.last().body["stream_options"] == {"include_usage": True}


def test_stream_keeps_usage_when_the_client_asked_for_it(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="fake", messages=CHAT, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(FakeEngine.WORDS)


def test_stream_arrives_progressively(gateway: RunningGateway, key: str) -> None:
    """With an engine sending a chunk every 50 ms, the first must arrive long before the last."""
    arrivals = []
    start = time.perf_counter()
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        timeout=30,
        headers={"authorization": f"Bearer {key}"},
        json={"model": "slowstream", "messages": CHAT, "stream": True},
    ) as response:
        for _line in response.iter_lines():
            arrivals.append(time.perf_counter() - start)
            if len(arrivals) >= 20:
                break
    assert arrivals[0] < arrivals[-1] - 0.3


def test_embeddings_are_relayed(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="fake", input=["a", "b"])
    assert [item.index for item in result.data] == [0, 1]
    assert result.usage.prompt_tokens == 6


def test_round_robin_alternates_between_backends(gateway: RunningGateway, key: str) -> None:
    names = [
        _post(gateway, key, {"model": "pair", "messages": CHAT}).headers["x-aiguillage-backend"]
        for _ in range(4)
    ]
    assert names[0] != names[1] and names[0::2] == [names[0]] * 2 and names[1::2] == [names[1]] * 2


# --- models -------------------------------------------------------------------------------


def test_models_list_shows_only_what_the_key_may_use(gateway: RunningGateway) -> None:
    limited = gateway.create_key(
        name="limited", organisation="univ-b", allowed_models=["fake", "org/fake-with-slash"]
    )[0]
    listing = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=limited).models.list()
    assert sorted(model.id for model in listing.data) == ["fake", "org/fake-with-slash"]


def test_model_ids_with_a_slash_are_found(client: openai.OpenAI) -> None:
    assert client.models.retrieve("org/fake-with-slash").id == "org/fake-with-slash"
    assert client.models.retrieve("fake-alias").id == "fake"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope/nothing")


# --- errors -------------------------------------------------------------------------------


def test_missing_unknown_revoked_and_expired_keys_get_401(gateway: RunningGateway) -> None:
    assert (
        _error(_post(gateway, None, {"model": "fake", "messages": CHAT}))["code"]
        == "missing_api_key"
    )
    assert _post(gateway, "sk-ag-unknown", {"model": "fake"}).status_code == 401
    expired = gateway.create_key(expires_at=datetime.now(UTC) - timedelta(days=1))[0]
    assert _error(_post(gateway, expired, {"model": "fake"}))["code"] == "expired_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key="sk-ag-wrong", max_retries=0
        ).chat.completions.create(model="fake", messages=CHAT)  # type: ignore[arg-type]


def test_a_revoked_key_stops_working_within_the_cache_ttl(gateway: RunningGateway) -> None:
    secret, record = gateway.create_key(name="soon-revoked")
    assert _post(gateway, secret, {"model": "fake", "messages": CHAT}).status_code == 200
    gateway.revoke_key(record.id)
    time.sleep(gateway.config.key_cache_ttl_s + 0.2)
    response = _post(gateway, secret, {"model": "fake", "messages": CHAT})
    assert response.status_code == 401
    assert _error(response)["code"] == "revoked_api_key"


def test_model_not_allowed_is_403_and_unknown_model_404(gateway: RunningGateway) -> None:
    limited = gateway.create_key(allowed_models=["fake"])[0]
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=limited, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="pair", messages=CHAT)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=CHAT)  # type: ignore[arg-type]
    assert "no-such-model" in str(error.value)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"", None),
        (orjson.dumps({"messages": CHAT}), "model"),
        (orjson.dumps({"model": 42}), "model"),
        (orjson.dumps({"model": "fake", "stream": "yes"}), "stream"),
        (orjson.dumps({"model": "fake", "priority": "high"}), "priority"),
        (orjson.dumps({"model": "fake", "priority": 5000}), "priority"),
    ],
)
def test_bad_bodies_get_400_with_a_clear_message(
    gateway: RunningGateway, key: str, body: bytes, param: str | None
) -> None:
    response = _post(gateway, key, body)
    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_wrong_content_type_is_415_and_large_body_413(gateway: RunningGateway, key: str) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=b"model=fake",
        headers={
            "authorization": f"Bearer {key}",
            "content-type": "application/x-www-form-urlencoded",
        },
    )
    assert response.status_code == 415
    assert "application/json" in _error(response)["message"]
    huge = {"model": "fake", "messages": [{"role": "user", "content": "x" * 10_000}]}
    assert _post(gateway, key, huge).status_code == 413
    # the gateway is still fine for the next request
    assert _post(gateway, key, {"model": "fake", "messages": CHAT}).status_code == 200


def test_unknown_route_and_wrong_method_are_openai_errors(
    gateway: RunningGateway, key: str
) -> None:
    response = httpx.get(f"{gateway.url}/v1/nothing-here")
    assert response.status_code == 404 and _error(response)["code"] == "unknown_route"
    response = httpx.get(
        f"{gateway.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}
    )
    assert response.status_code == 405


def test_engine_4xx_passes_through_unchanged(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="engine-400", messages=CHAT)  # type: ignore[arg-type]
    assert "fake engine says 400" in str(error.value)


def test_engine_5xx_passes_through_when_no_other_backend(gateway: RunningGateway, key: str) -> None:
    response = _post(gateway, key, {"model": "engine-500", "messages": CHAT})
    assert response.status_code == 500
    assert "fake engine says 500" in response.text


def test_engine_5xx_passes_through_when_the_other_backend_is_down(
    gateway: RunningGateway, key: str
) -> None:
    time.sleep(1.0)  # two probe rounds: the "down" backend is known to be down
    response = _post(gateway, key, {"model": "last-5xx", "messages": CHAT})
    assert response.status_code == 502
    assert "fake engine says 502" in response.text


def test_connect_error_fails_over_to_another_backend(gateway: RunningGateway, key: str) -> None:
    for _ in range(4):
        assert _post(gateway, key, {"model": "failover", "messages": CHAT}).status_code == 200


def test_5xx_before_first_byte_fails_over(gateway: RunningGateway, key: str) -> None:
    for _ in range(4):
        assert _post(gateway, key, {"model": "failover-5xx", "messages": CHAT}).status_code == 200


def test_unreachable_model_is_503_with_retry_after(gateway: RunningGateway, key: str) -> None:
    response = _post(gateway, key, {"model": "dead", "messages": CHAT})
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert "dead" in _error(response)["message"]


def test_slow_engine_is_504_not_a_hang(gateway: RunningGateway, key: str) -> None:
    started = time.perf_counter()
    response = _post(gateway, key, {"model": "slow", "messages": CHAT})
    assert response.status_code == 504
    assert time.perf_counter() - started < 3


def test_engine_dying_mid_stream_ends_with_an_error_event(
    gateway: RunningGateway, key: str
) -> None:
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        timeout=10,
        headers={"authorization": f"Bearer {key}"},
        json={"model": "midstream", "messages": CHAT, "stream": True},
    ) as response:
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert response.status_code == 200
    assert len(events) >= 2
    last = orjson.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "stream_interrupted"


def test_client_disconnect_cancels_the_upstream_stream(
    gateway: RunningGateway, key: str, fake_engine: FakeEngine
) -> None:
    before = fake_engine.log.cancelled_streams
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        timeout=10,
        headers={"authorization": f"Bearer {key}"},
        json={"model": "slowstream", "messages": CHAT, "stream": True},
    ) as response:
        for index, _line in enumerate(response.iter_lines()):
            if index >= 3:
                break
    deadline = time.monotonic() + 5
    while fake_engine.log.cancelled_streams == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_engine.log.cancelled_streams == before + 1
    in_flight = {b.name: b.in_flight for b in gateway.app.gateway.catalog.backends()}
    assert all(count == 0 for count in in_flight.values()), in_flight


# --- health, metrics, ledger -------------------------------------------------------------


def test_healthz_and_readyz(gateway: RunningGateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 503  # "dead" and "down-health" have no reachable backend
    models = ready.json()["models"]
    assert models["fake"] is True and models["dead"] is False and models["down-health"] is False


def test_metrics_count_requests_and_tokens(gateway: RunningGateway, key: str) -> None:
    _post(gateway, key, {"model": "fake", "messages": CHAT})
    text = httpx.get(f"{gateway.url}/metrics").text
    assert (
        'aiguillage_requests_total{endpoint="chat/completions",model="fake",status="200"}' in text
    )
    assert 'aiguillage_tokens_total{kind="completion",model="fake"}' in text
    assert "aiguillage_request_duration_seconds_bucket" in text
    assert 'aiguillage_backend_up{backend="' in text


def test_every_request_gets_a_ledger_row_with_engine_usage(gateway: RunningGateway) -> None:
    secret, record = gateway.create_key(name="ledger", organisation="ledger-org")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
    client.chat.completions.create(model="fake", messages=CHAT)  # type: ignore[arg-type]
    list(client.chat.completions.create(model="fake", messages=CHAT, stream=True))  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=CHAT)  # type: ignore[arg-type]
    rows = gateway.usage_rows(record.id, expected=3)
    assert len(rows) == 3
    by_kind = {(row.stream, row.status): row for row in rows}
    plain, streamed, missing = by_kind[(False, 200)], by_kind[(True, 200)], by_kind[(False, 404)]
    assert (plain.prompt_tokens, plain.completion_tokens, plain.usage_source) == (7, 5, "engine")
    assert streamed.completion_tokens == len(FakeEngine.WORDS) and streamed.usage_source == "engine"
    assert streamed.ttft_ms is not None and streamed.ttft_ms <= streamed.duration_ms
    assert plain.organisation == "ledger-org" and plain.backend and plain.model == "fake"
    assert missing.model == "(unknown)" and missing.prompt_tokens is None


def test_cancelled_stream_is_in_the_ledger_with_estimated_tokens(gateway: RunningGateway) -> None:
    secret, record = gateway.create_key(name="cancel", organisation="cancel-org")
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        timeout=10,
        headers={"authorization": f"Bearer {secret}"},
        json={"model": "slowstream", "messages": CHAT, "stream": True},
    ) as response:
        for index, _line in enumerate(response.iter_lines()):
            if index >= 6:
                break
    rows = gateway.usage_rows(record.id, expected=1)
    assert len(rows) == 1
    row = rows[0]
    assert row.cancelled is True and row.usage_source == "estimated"
    assert row.completion_tokens is not None and row.completion_tokens >= 3
