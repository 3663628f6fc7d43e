"""Cutting SSE streams into events, reading usage, withholding the usage event we asked for."""

from __future__ import annotations

import orjson
import pytest

from aiguillage.accounting.stream_usage import SseUsageFilter, TokenCounts, counts_from_body


def event(document: object, sep: bytes = b"\n\n") -> bytes:
    return b"data: " + orjson.dumps(document) + sep


CHUNK_A = event({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hel"}}]})
CHUNK_B = event({"id": "c", "choices": [{"index": 0, "delta": {"content": "lo"}}]})
USAGE = event({"id": "c", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}})
DONE = b"data: [DONE]\n\n"


def run(chunks: list[bytes], withhold: bool) -> tuple[bytes, SseUsageFilter]:
    sse = SseUsageFilter(withhold_usage_event=withhold)
    out = b"".join(sse.feed(chunk) for chunk in chunks) + sse.flush()
    return out, sse


def test_complete_events_are_relayed_at_once_byte_for_byte() -> None:
    sse = SseUsageFilter(withhold_usage_event=True)
    assert sse.feed(CHUNK_A + CHUNK_B) == CHUNK_A + CHUNK_B


def test_incomplete_event_is_held_until_completed() -> None:
    sse = SseUsageFilter(withhold_usage_event=True)
    assert sse.feed(CHUNK_A + CHUNK_B[:10]) == CHUNK_A
    assert sse.feed(CHUNK_B[10:-1]) == b""
    assert sse.feed(CHUNK_B[-1:]) == CHUNK_B


def test_event_split_into_single_bytes_comes_out_whole_once_complete() -> None:
    sse = SseUsageFilter(withhold_usage_event=False)
    outputs = [sse.feed(CHUNK_A[i : i + 1]) for i in range(len(CHUNK_A))]
    assert outputs[:-1] == [b""] * (len(CHUNK_A) - 1)
    assert outputs[-1] == CHUNK_A


def test_usage_event_split_into_single_bytes_is_read_and_withheld() -> None:
    stream = CHUNK_A + USAGE + DONE
    out, sse = run([stream[i : i + 1] for i in range(len(stream))], withhold=True)
    assert out == CHUNK_A + DONE
    assert sse.counts == TokenCounts(prompt=11, completion=2)


def test_usage_is_read_from_the_final_usage_event() -> None:
    out, sse = run([CHUNK_A, CHUNK_B, USAGE, DONE], withhold=False)
    assert sse.counts == TokenCounts(prompt=11, completion=2)
    assert out == CHUNK_A + CHUNK_B + USAGE + DONE


def test_usage_only_event_is_withheld_when_asked() -> None:
    out, sse = run([CHUNK_A, CHUNK_B + USAGE + DONE], withhold=True)
    assert out == CHUNK_A + CHUNK_B + DONE
    assert sse.counts == TokenCounts(prompt=11, completion=2)


def test_usage_event_with_choices_is_never_withheld() -> None:
    with_choices = event(
        {
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        }
    )
    out, sse = run([with_choices, DONE], withhold=True)
    assert out == with_choices + DONE
    assert sse.counts == TokenCounts(prompt=3, completion=4)


def test_null_usage_is_relayed_and_not_counted() -> None:
    null_usage = event({"choices": [], "usage": None})
    out, sse = run([null_usage], withhold=True)
    assert out == null_usage
    assert sse.counts is None


def test_no_usage_leaves_counts_empty() -> None:
    _, sse = run([CHUNK_A, CHUNK_B, DONE], withhold=True)
    assert sse.counts is None


def test_data_events_are_counted_without_the_done_marker() -> None:
    _, sse = run([CHUNK_A, CHUNK_B + USAGE, DONE], withhold=True)
    assert sse.data_events == 3


def test_data_events_not_counted_from_content_text() -> None:
    tricky = event({"choices": [{"index": 0, "delta": {"content": "see data: URI"}}]})
    _, sse = run([tricky], withhold=False)
    assert sse.data_events == 1


def test_comment_lines_are_relayed_and_not_counted() -> None:
    comment = b": keep-alive\n\n"
    out, sse = run([comment, CHUNK_A], withhold=True)
    assert out == comment + CHUNK_A
    assert sse.data_events == 1


def test_crlf_separators_are_handled() -> None:
    a = event({"choices": [{"delta": {"content": "x"}}]}, sep=b"\r\n\r\n")
    usage = event(
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}, b"\r\n\r\n"
    )
    sse = SseUsageFilter(withhold_usage_event=True)
    assert sse.feed(a[:-2]) == b""
    assert sse.feed(a[-2:] + usage) == a
    assert sse.counts == TokenCounts(prompt=1, completion=1)
    assert sse.data_events == 2


def test_flush_returns_trailing_event_without_blank_line() -> None:
    sse = SseUsageFilter(withhold_usage_event=True)
    sse.feed(CHUNK_A + b"data: [DONE]")
    assert sse.flush() == b"data: [DONE]"
    assert sse.flush() == b""


def test_flush_withholds_trailing_usage_event_without_blank_line() -> None:
    sse = SseUsageFilter(withhold_usage_event=True)
    sse.feed(USAGE.rstrip(b"\n"))
    assert sse.flush() == b""
    assert sse.counts == TokenCounts(prompt=11, completion=2)


def test_body_counts_are_read() -> None:
    body = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}})
    assert counts_from_body(body) == TokenCounts(prompt=5, completion=9)


def test_body_counts_keep_only_integers() -> None:
    body = orjson.dumps({"usage": {"prompt_tokens": 5, "completion_tokens": "9"}})
    assert counts_from_body(body) == TokenCounts(prompt=5, completion=None)


@pytest.mark.parametrize(
    "body",
    [b'{"choices": []}', b'{"usage": ', b'["usage"]', b'{"usage": null}', b""],
)
def test_body_without_usable_usage_gives_none(body: bytes) -> None:
    assert counts_from_body(body) is None
