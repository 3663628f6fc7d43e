"""A transcript: timed segments of text, the one shape every engine returns.

Engines differ (local faster-whisper, a remote OpenAI-compatible server), output formats
differ (JSON, SRT, VTT, text); keeping one immutable value in between means each format
is written once and each engine is tested once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class Segment:
    """A span of speech, in seconds from the start of the media."""

    start: float
    end: float
    text: str

    def shifted(self, offset: float) -> Segment:
        """The same segment placed `offset` seconds later (chunks of long media)."""
        return Segment(start=self.start + offset, end=self.end + offset, text=self.text)


@dataclass(frozen=True)
class Transcript:
    """What was said in a medium: its language, its duration and its timed segments."""

    language: str
    duration: float
    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        """The whole transcript as one string (segments trimmed and joined by spaces)."""
        return " ".join(part for part in (s.text.strip() for s in self.segments) if part)

    def to_json(self) -> bytes:
        """A compact JSON document, for storage (jobs keep results in the database)."""
        return orjson.dumps(
            {
                "language": self.language,
                "duration": self.duration,
                "segments": [[s.start, s.end, s.text] for s in self.segments],
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Transcript:
        """The transcript `to_json` stored; raises ValueError on anything else."""
        try:
            document: Any = orjson.loads(data)
            segments = tuple(
                Segment(start=float(start), end=float(end), text=str(text))
                for start, end, text in document["segments"]
            )
            return cls(
                language=str(document["language"]),
                duration=float(document["duration"]),
                segments=segments,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a stored transcript: {error}") from error
