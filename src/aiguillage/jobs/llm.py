"""Structured answers from an LLM, through the gateway's own API at the job owner's priority.

Workers are clients of the gateway like any other: their calls queue in the same
dispatcher, at the priority of the job's owner (the `X-Priority` header; the
worker key's own priority is a ceiling), so a batch of enrichments never pushes
interactive users aside. The answer is constrained by a JSON schema
(`response_format: json_schema`, which llama.cpp and vLLM enforce with a grammar)
and then validated; an answer that does not validate is asked again, up to the
configured number of attempts.
"""

from __future__ import annotations

from typing import Any, TypeVar

import aiohttp
import orjson
from pydantic import BaseModel, ValidationError

from aiguillage.catalog.config import JobsLlmConfig

Answer = TypeVar("Answer", bound=BaseModel)


class LlmError(Exception):
    """The LLM could not give a valid answer; the message is the cause shown to the client."""


class GatewayLlm:
    """One HTTP session to the gateway, shared by a worker's steps."""

    def __init__(self, config: JobsLlmConfig) -> None:
        self._config = config
        self._url = str(config.gateway_url).rstrip("/") + "/v1/chat/completions"
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def ask(
        self,
        answer_type: type[Answer],
        messages: list[dict[str, str]],
        *,
        priority: int,
        budget: int = 1,
    ) -> Answer:
        """The answer, validated as `answer_type`; `LlmError` once the attempts are spent.

        `budget`: how many times the configured `max_tokens` the answer may take.
        """
        body = {
            "model": self._config.model,
            "messages": messages,
            "max_tokens": budget * self._config.max_tokens,
            "temperature": 0.2,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": answer_type.__name__,
                    "schema": answer_type.model_json_schema(),
                    "strict": True,
                },
            },
        }
        problem = "no attempt made"
        for _ in range(self._config.attempts):
            content = await self._complete(body, priority)
            try:
                return answer_type.model_validate_json(content)
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(part) for part in first["loc"]) or "answer"
                problem = f"the model's answer is not valid ({where}: {first['msg']})"
        raise LlmError(f"{problem}, after {self._config.attempts} attempts")

    async def _complete(self, body: dict[str, Any], priority: int) -> str:
        headers = {"content-type": "application/json", "x-priority": str(priority)}
        if self._config.api_key is not None:
            headers["authorization"] = f"Bearer {self._config.api_key.get_secret_value()}"
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._config.timeout_s)
            )
        try:
            async with self._session.post(
                self._url, data=orjson.dumps(body), headers=headers
            ) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise LlmError(f"the gateway is unreachable: {error or type(error).__name__}") from None
        if response.status != 200:
            raise LlmError(f"the gateway answered HTTP {response.status}: {_message(raw)}")
        try:
            content = orjson.loads(raw)["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise LlmError("the gateway's answer is not a chat completion") from None
        if not isinstance(content, str):
            raise LlmError("the model returned no text")
        return content


def _message(raw: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, or the start of the body."""
    try:
        return str(orjson.loads(raw)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")
