"""Whatever bytes arrive, parsing gives a request or a clear 400: never a crash."""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from aiguillage.api.errors import ApiError
from aiguillage.api.payload import InferenceRequest, parse_inference_request

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.dictionaries(
    st.sampled_from(["model", "stream", "priority", "stream_options", "messages", "prompt"])
    | st.text(max_size=6),
    json_values,
    max_size=6,
)


def _parse(raw: bytes) -> InferenceRequest | ApiError:
    try:
        return parse_inference_request(raw)
    except ApiError as error:
        return error


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_get_a_400(raw: bytes) -> None:
    outcome = _parse(raw)
    if isinstance(outcome, ApiError):
        assert outcome.status == 400 and outcome.message


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_any_json_object_parses_or_gets_a_400_and_rewrites_cleanly(body: dict[str, object]) -> None:
    outcome = _parse(json.dumps(body).encode())
    if isinstance(outcome, ApiError):
        assert outcome.status == 400 and outcome.message
        return
    assert isinstance(body.get("model"), str) and body["model"]
    raw, _ = outcome.upstream_body("served", engine_priority=5)
    forwarded = orjson.loads(raw)
    assert forwarded["model"] == "served" and forwarded["priority"] == 5
    outcome.prefix(64)  # never raises either
