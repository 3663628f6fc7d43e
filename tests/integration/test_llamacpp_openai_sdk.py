"""End to end with a real engine: llama.cpp with SmolLM2, called through the official SDK."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from aiguillage.backends.local_engine import (
    SMOLLM2_SERVED_NAME,
    EngineUnavailable,
    LlamaCppServer,
)
from tests.harness import RunningGateway

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    log = tmp_path_factory.mktemp("llama") / "engine.log"
    try:
        server = LlamaCppServer(parallel=2, log_file=log).start()
    except EngineUnavailable as error:
        pytest.skip(f"llama.cpp engine unavailable: {error}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(
    engine: LlamaCppServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    settings = {
        "models": [
            {
                "name": "smollm2",
                "model": SMOLLM2_SERVED_NAME,
                "aliases": ["small"],
                "servers": [{"url": engine.url, "engine": "llamacpp", "max_concurrency": 2}],
            }
        ]
    }
    running = RunningGateway(settings, tmp_path_factory.mktemp("gw")).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def key(gateway: RunningGateway) -> str:
    return gateway.create_key(name="sdk", organisation="univ-rennes")[0]


@pytest.fixture
def client(gateway: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_models_list(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list().data] == ["smollm2"]


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.model == SMOLLM2_SERVED_NAME  # the engine answered; we relay its body


def test_chat_stream_via_alias(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="small",
            messages=CHAT,
            max_tokens=8,
            stream=True,  # type: ignore[arg-type]
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert len(chunks) >= 3


def test_legacy_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=5)
    assert reply.choices[0].text is not None
    assert reply.usage is not None and reply.usage.prompt_tokens > 0


async def test_async_client_stream_and_not(gateway: RunningGateway, key: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=key, max_retries=0
    ) as client:
        reply = await client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=5)  # type: ignore[arg-type]
        assert reply.choices[0].message.content
        stream = await client.chat.completions.create(
            model="smollm2",
            messages=CHAT,
            max_tokens=5,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_errors_surface_as_sdk_exceptions(gateway: RunningGateway, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=CHAT)  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key="sk-ag-nope", max_retries=0
        ).models.list()
    with pytest.raises(openai.BadRequestError):  # the engine's own 400, relayed
        client.chat.completions.create(model="smollm2", messages="not a list")  # type: ignore[arg-type]


def test_usage_of_engine_is_in_the_ledger(gateway: RunningGateway) -> None:
    secret, record = gateway.create_key(name="ledger", organisation="univ-rennes")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
    list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, stream=True))  # type: ignore[arg-type]
    rows = gateway.usage_rows(record.id, expected=1)
    assert len(rows) == 1
    assert rows[0].usage_source == "engine"
    assert rows[0].prompt_tokens and rows[0].prompt_tokens > 5
    assert 0 < (rows[0].completion_tokens or 0) <= 6


def test_readyz_with_the_real_engine(gateway: RunningGateway) -> None:
    assert httpx.get(f"{gateway.url}/readyz").json() == {
        "status": "ready",
        "models": {"smollm2": True},
    }
