"""Reading an inference request body: parse once, check what routing needs, rewrite minimally.

The gateway never rebuilds OpenAI's schema: the engine validates the rest and its
400 reaches the client as it is. We only check the fields we act on (`model`,
`stream`, `priority`, `stream_options`) so that a wrong type there gets a clear
400 instead of a confused engine or a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from aiguillage.api.errors import invalid_request

MIN_PRIORITY = 0
MAX_PRIORITY = 1000


class RelayedRequest(Protocol):
    """What the relay needs of a request body, whatever its encoding (JSON, multipart)."""

    model: str
    stream: bool
    priority: int | None

    @property
    def content_type(self) -> str:
        """The Content-Type of the bytes `upstream_body` returns."""
        ...

    def upstream_body(
        self, served_name: str, engine_priority: int | None = None
    ) -> tuple[bytes, bool]:
        """The bytes to send to the engine, and whether we added usage reporting ourselves."""
        ...

    def prefix(self, chars: int) -> str | None:
        """The prompt's leading text for prefix affinity, or None."""
        ...


@dataclass(slots=True)
class InferenceRequest:
    """A parsed request body, with the original bytes kept for forwarding."""

    raw: bytes
    body: dict[str, Any]
    model: str
    stream: bool
    priority: int | None
    client_wants_usage: bool

    @property
    def content_type(self) -> str:
        return "application/json"

    def upstream_body(
        self, served_name: str, engine_priority: int | None = None
    ) -> tuple[bytes, bool]:
        """The bytes to send to the engine, and whether we added usage reporting ourselves.

        The original bytes go out untouched unless something must change: the
        engine's own model name, the gateway-only `priority` field, or a stream
        that does not ask for usage (we ask, so tokens are counted, and drop the
        extra usage event before the client sees it).
        """
        inject_usage = self.stream and not self.client_wants_usage
        unchanged = self.model == served_name and "priority" not in self.body
        if unchanged and engine_priority is None and not inject_usage:
            return self.raw, False
        body = dict(self.body)
        body["model"] = served_name
        body.pop("priority", None)
        if engine_priority is not None:
            body["priority"] = engine_priority
        if inject_usage:
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        return orjson.dumps(body), inject_usage

    def prefix(self, chars: int) -> str | None:
        """The prompt's leading text, for prefix affinity (chat messages or a completion prompt)."""
        body = self.body
        messages = body.get("messages")
        if isinstance(messages, list):
            parts: list[str] = []
            size = 0
            for message in messages:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, str):
                    parts.append(content)
                    size += len(content)
                    if size >= chars:
                        break
            return "\x1e".join(parts)[:chars] or None
        prompt = body.get("prompt", body.get("input"))
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        return prompt[:chars] if isinstance(prompt, str) and prompt else None


def parse_inference_request(raw: bytes, *, streamable: bool = True) -> InferenceRequest:
    """Parse and check a JSON body; raise a 400 `ApiError` that says what is wrong."""
    if not raw:
        raise invalid_request("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise invalid_request(f"The request body is not valid JSON: {error}.") from None
    if not isinstance(body, dict):
        raise invalid_request(
            f"The request body must be a JSON object, not a JSON {_json_type(body)}."
        )
    model = body.get("model")
    if model is None:
        raise invalid_request("The 'model' field is required.", param="model")
    if not isinstance(model, str) or not model:
        raise invalid_request("The 'model' field must be a non-empty string.", param="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid_request(
            f"The 'stream' field must be a boolean, not a JSON {_json_type(stream)}.",
            param="stream",
        )
    if stream and not streamable:
        raise invalid_request("This endpoint does not support streaming.", param="stream")
    priority = _priority(body.get("priority"))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_request(
            "The 'stream_options' field must be an object.", param="stream_options"
        )
    wants_usage = bool(options and options.get("include_usage") is True)
    return InferenceRequest(raw, body, model, stream, priority, wants_usage)


def parse_priority_header(value: str | None) -> int | None:
    """The `X-Priority` header, checked like the body field."""
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise invalid_request(
            f"The X-Priority header must be an integer between {MIN_PRIORITY} and {MAX_PRIORITY}.",
            param="priority",
        ) from None
    return _priority(number)


def _priority(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_request(
            f"The 'priority' field must be an integer, not a JSON {_json_type(value)}.",
            param="priority",
        )
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise invalid_request(
            f"The 'priority' field must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {value}.",
            param="priority",
        )
    return value


def _json_type(value: Any) -> str:
    match value:
        case bool():
            return "boolean"
        case int() | float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
        case dict():
            return "object"
        case None:
            return "null"
    return type(value).__name__
