"""Parsing inference bodies: the 400s we own, and the minimal rewrite sent upstream."""

from __future__ import annotations

import orjson
import pytest

from aiguillage.api.errors import ApiError
from aiguillage.api.payload import (
    InferenceRequest,
    parse_inference_request,
    parse_priority_header,
)


def bad(raw: bytes, *, streamable: bool = True) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_inference_request(raw, streamable=streamable)
    assert caught.value.status == 400
    assert caught.value.type == "invalid_request_error"
    return caught.value


def parsed(body: dict[str, object]) -> InferenceRequest:
    return parse_inference_request(orjson.dumps(body))


def test_empty_body_is_400() -> None:
    assert "empty" in bad(b"").message


def test_invalid_json_is_400() -> None:
    assert "not valid JSON" in bad(b'{"model": ').message


def test_invalid_utf8_is_400() -> None:
    assert "not valid JSON" in bad(b'{"model": "\xff"}').message


@pytest.mark.parametrize(("raw", "kind"), [(b"[]", "array"), (b'"x"', "string"), (b"3", "number")])
def test_non_object_body_is_400_naming_its_type(raw: bytes, kind: str) -> None:
    assert kind in bad(raw).message


def test_missing_model_is_400_on_model() -> None:
    assert bad(b'{"messages": []}').param == "model"


@pytest.mark.parametrize("model", [3, "", ["m"], None])
def test_non_string_or_empty_model_is_400_on_model(model: object) -> None:
    assert bad(orjson.dumps({"model": model})).param == "model"


@pytest.mark.parametrize("stream", ["true", 1, {}])
def test_non_boolean_stream_is_400_on_stream(stream: object) -> None:
    assert bad(orjson.dumps({"model": "m", "stream": stream})).param == "stream"


@pytest.mark.parametrize("priority", ["5", 1.5, True, False, [1]])
def test_non_integer_priority_is_400_on_priority(priority: object) -> None:
    assert bad(orjson.dumps({"model": "m", "priority": priority})).param == "priority"


@pytest.mark.parametrize("priority", [-1, 1001])
def test_out_of_range_priority_is_400_on_priority(priority: int) -> None:
    error = bad(orjson.dumps({"model": "m", "priority": priority}))
    assert error.param == "priority"
    assert str(priority) in error.message


@pytest.mark.parametrize("priority", [0, 1000])
def test_priority_bounds_are_accepted(priority: int) -> None:
    assert parsed({"model": "m", "priority": priority}).priority == priority


@pytest.mark.parametrize("options", [True, "usage", [1]])
def test_non_object_stream_options_is_400(options: object) -> None:
    raw = orjson.dumps({"model": "m", "stream": True, "stream_options": options})
    assert bad(raw).param == "stream_options"


def test_stream_on_non_streamable_endpoint_is_400() -> None:
    assert bad(b'{"model": "m", "stream": true}', streamable=False).param == "stream"


def test_non_stream_on_non_streamable_endpoint_is_accepted() -> None:
    request = parse_inference_request(b'{"model": "m", "stream": false}', streamable=False)
    assert request.stream is False


def test_fields_are_read() -> None:
    request = parsed(
        {"model": "m", "stream": True, "priority": 7, "stream_options": {"include_usage": True}}
    )
    assert (request.model, request.stream, request.priority) == ("m", True, 7)
    assert request.client_wants_usage is True


def test_null_stream_means_not_streaming() -> None:
    assert parsed({"model": "m", "stream": None}).stream is False


def test_upstream_body_is_the_original_bytes_when_nothing_changes() -> None:
    raw = b'{ "model":"m",  "messages":[{"role":"user","content":"hi"}] }'
    request = parse_inference_request(raw)
    body, injected = request.upstream_body("m")
    assert body is raw
    assert injected is False


def test_upstream_body_untouched_for_stream_that_asks_for_usage() -> None:
    raw = b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'
    body, injected = parse_inference_request(raw).upstream_body("m")
    assert body is raw
    assert injected is False


def test_upstream_body_rewrites_model_to_served_name() -> None:
    raw = b'{"model":"public","messages":[],"temperature":0.5}'
    body, injected = parse_inference_request(raw).upstream_body("org/served")
    assert orjson.loads(body) == {"model": "org/served", "messages": [], "temperature": 0.5}
    assert injected is False


def test_upstream_body_strips_priority() -> None:
    raw = b'{"model":"m","priority":5,"max_tokens":3}'
    body, _ = parse_inference_request(raw).upstream_body("m")
    assert orjson.loads(body) == {"model": "m", "max_tokens": 3}


def test_upstream_body_strips_null_priority() -> None:
    raw = b'{"model":"m","priority":null}'
    body, _ = parse_inference_request(raw).upstream_body("m")
    assert "priority" not in orjson.loads(body)


def test_upstream_body_injects_usage_on_stream_without_it() -> None:
    raw = b'{"model":"m","stream":true}'
    body, injected = parse_inference_request(raw).upstream_body("m")
    assert injected is True
    assert orjson.loads(body) == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_upstream_body_keeps_other_stream_options_when_injecting() -> None:
    raw = b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true}}'
    body, injected = parse_inference_request(raw).upstream_body("m")
    assert injected is True
    assert orjson.loads(body)["stream_options"] == {
        "continuous_usage_stats": True,
        "include_usage": True,
    }


def test_upstream_body_overrides_explicit_false_include_usage_and_reports_it() -> None:
    raw = b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}'
    request = parse_inference_request(raw)
    assert request.client_wants_usage is False
    body, injected = request.upstream_body("m")
    assert injected is True
    assert orjson.loads(body)["stream_options"] == {"include_usage": True}


def test_upstream_body_keeps_client_stream_options_when_renaming() -> None:
    raw = b'{"model":"pub","stream":true,"stream_options":{"include_usage":true,"x":1}}'
    body, injected = parse_inference_request(raw).upstream_body("served")
    assert injected is False
    assert orjson.loads(body) == {
        "model": "served",
        "stream": True,
        "stream_options": {"include_usage": True, "x": 1},
    }


def test_upstream_body_does_not_mutate_the_parsed_body() -> None:
    request = parsed({"model": "m", "stream": True, "priority": 1, "stream_options": {"a": 1}})
    request.upstream_body("served")
    assert request.body == {
        "model": "m",
        "stream": True,
        "priority": 1,
        "stream_options": {"a": 1},
    }


def test_priority_header_absent_is_none() -> None:
    assert parse_priority_header(None) is None


@pytest.mark.parametrize(("value", "expected"), [("0", 0), (" 42 ", 42), ("1000", 1000)])
def test_priority_header_is_parsed(value: str, expected: int) -> None:
    assert parse_priority_header(value) == expected


@pytest.mark.parametrize("value", ["", "high", "1.5", "-1", "1001"])
def test_bad_priority_header_is_400_on_priority(value: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_priority_header(value)
    assert caught.value.status == 400
    assert caught.value.param == "priority"
