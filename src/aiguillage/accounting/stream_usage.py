"""Counting tokens from what the engine sends, without slowing the relay.

Engines report tokens in an OpenAI `usage` object: in the body of a plain
answer, or in the last event of a stream when `stream_options.include_usage` is
set. The relay asks for it on every stream; when the client did not, the extra
usage-only event is held back so the client sees exactly the stream it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

_USAGE_MARK = b'"usage"'
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")


@dataclass(frozen=True, slots=True)
class TokenCounts:
    prompt: int | None
    completion: int | None


def counts_from_usage(usage: Any) -> TokenCounts | None:
    """Token counts out of an OpenAI `usage` object, if it is one."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return TokenCounts(
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


def counts_from_body(body: bytes) -> TokenCounts | None:
    """Token counts from a complete JSON answer; cheap when there is no usage in it."""
    if _USAGE_MARK not in body:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return counts_from_usage(document.get("usage")) if isinstance(document, dict) else None


class SseUsageFilter:
    """Cuts an SSE byte stream into whole events, reads usage, withholds our own usage event.

    Feed it chunks as they arrive; it returns the bytes to forward at once (every
    complete event) and keeps only an incomplete trailing event.
    """

    def __init__(self, withhold_usage_event: bool) -> None:
        self._withhold = withhold_usage_event
        self._pending = b""
        self.counts: TokenCounts | None = None
        self.data_events = 0

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        end = _last_event_end(data)
        if end < 0:
            self._pending = data
            return b""
        complete, self._pending = data[:end], data[end:]
        if _USAGE_MARK not in complete:
            self.data_events += _count_data_events(complete)
            return complete
        return self._filter_events(complete)

    def flush(self) -> bytes:
        """What is left when the stream ends (an event without its blank line)."""
        rest, self._pending = self._pending, b""
        return self._filter_events(rest) if rest else b""

    def _filter_events(self, complete: bytes) -> bytes:
        kept: list[bytes] = []
        for event in _split_events(complete):
            self.data_events += _count_data_events(event)
            if _USAGE_MARK in event and self._is_usage_only(event):
                continue
            kept.append(event)
        return b"".join(kept)

    def _is_usage_only(self, event: bytes) -> bool:
        """Record the usage in this event; true if it is the extra event we asked for."""
        payload = b"".join(
            line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")
        )
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(document, dict):
            return False
        counts = counts_from_usage(document.get("usage"))
        if counts is not None:
            self.counts = counts
        return self._withhold and counts is not None and not document.get("choices")


def _count_data_events(events: bytes) -> int:
    """Data lines (one per event in OpenAI streams), not counting the final `[DONE]`."""
    lines = events.count(b"\ndata:") + events.startswith(b"data:")
    return lines - events.count(b"data: [DONE]")


def _last_event_end(data: bytes) -> int:
    """Index just past the last event separator, or -1."""
    best = -1
    for mark in _EVENT_ENDS:
        found = data.rfind(mark)
        if found >= 0:
            best = max(best, found + len(mark))
    return best


def _split_events(data: bytes) -> list[bytes]:
    """Split complete events, keeping each one's separator so bytes go out unchanged."""
    events: list[bytes] = []
    start = 0
    while start < len(data):
        cut = -1
        for mark in _EVENT_ENDS:
            found = data.find(mark, start)
            if found >= 0 and (cut < 0 or found + len(mark) < cut):
                cut = found + len(mark)
        if cut < 0:
            events.append(data[start:])
            break
        events.append(data[start:cut])
        start = cut
    return events
