"""Rendering a transcript the way OpenAI's `/v1/audio/transcriptions` does.

`response_format` picks one of five shapes; subtitles (SRT, WebVTT) need exact
timestamp syntax and escaping so that players and subtitle libraries accept them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import orjson

from aiguillage.speech.transcript import Segment, Transcript

RESPONSE_FORMATS: Final = ("json", "text", "srt", "verbose_json", "vtt")

MEDIA_TYPES: Final[dict[str, str]] = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}
"""The content type each response format is served with."""

SUBTITLE_MEDIA_TYPES: Final[dict[str, str]] = {fmt: MEDIA_TYPES[fmt] for fmt in ("srt", "vtt")}
"""Only the subtitle formats, e.g. for downloads of a job's result."""

FILE_EXTENSIONS: Final[dict[str, str]] = {
    "json": "json",
    "verbose_json": "json",
    "text": "txt",
    "srt": "srt",
    "vtt": "vtt",
}


def render(transcript: Transcript, fmt: str) -> str:
    """The transcript in `fmt` (one of RESPONSE_FORMATS); ValueError for any other."""
    try:
        renderer = _RENDERERS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown response_format {fmt!r}: expected one of {', '.join(RESPONSE_FORMATS)}"
        ) from None
    return renderer(transcript)


def _json(transcript: Transcript) -> str:
    return orjson.dumps({"text": transcript.text}).decode()


def _verbose_json(transcript: Transcript) -> str:
    return orjson.dumps(
        {
            "task": "transcribe",
            "language": transcript.language,
            "duration": round(transcript.duration, 3),
            "text": transcript.text,
            "segments": [
                {
                    "id": index,
                    "start": round(segment.start, 3),
                    "end": round(segment.end, 3),
                    "text": segment.text,
                }
                for index, segment in enumerate(transcript.segments)
            ],
        }
    ).decode()


def _text(transcript: Transcript) -> str:
    return transcript.text + "\n"


def _srt(transcript: Transcript) -> str:
    cues = [
        f"{number}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{_cue_text(s)}\n"
        for number, s in enumerate(_subtitled(transcript), start=1)
    ]
    return "\n".join(cues)


def _vtt(transcript: Transcript) -> str:
    cues = [
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{_vtt_escape(_cue_text(s))}\n"
        for s in _subtitled(transcript)
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def _subtitled(transcript: Transcript) -> list[Segment]:
    """Segments worth a cue: subtitle syntax forbids empty cue text."""
    return [s for s in transcript.segments if s.text.strip()]


def _cue_text(segment: Segment) -> str:
    """Cue text without blank lines, which both formats read as the end of the cue."""
    return "\n".join(line.strip() for line in segment.text.strip().splitlines() if line.strip())


def _vtt_escape(text: str) -> str:
    """WebVTT cue text is markup: `&` and `<` must be escaped, and `-->` cannot appear."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _timestamp(seconds: float, decimal_separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_separator}{millis:03d}"


_RENDERERS: Final[dict[str, Callable[[Transcript], str]]] = {
    "json": _json,
    "verbose_json": _verbose_json,
    "text": _text,
    "srt": _srt,
    "vtt": _vtt,
}
