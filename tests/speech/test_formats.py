"""Every response format, read back by the libraries players and editors use."""

from __future__ import annotations

import html
from datetime import timedelta

import orjson
import pytest
import srt
import webvtt

from aiguillage.speech.formats import (
    MEDIA_TYPES,
    RESPONSE_FORMATS,
    SUBTITLE_MEDIA_TYPES,
    render,
)
from aiguillage.speech.transcript import Segment, Transcript

TRANSCRIPT = Transcript(
    language="en",
    duration=3725.5,
    segments=(
        Segment(0.0, 2.5, "Welcome to the lecture."),
        Segment(2.5, 4.0, "   "),  # nothing said: no cue
        Segment(4.0, 7.25, "Is a < b && b > c?\n\nThen a --> c."),
        Segment(3723.456, 3725.5, "See you next week."),
    ),
)


def test_json_is_openai_shape() -> None:
    assert orjson.loads(render(TRANSCRIPT, "json")) == {"text": TRANSCRIPT.text}


def test_verbose_json_is_openai_shape() -> None:
    document = orjson.loads(render(TRANSCRIPT, "verbose_json"))
    assert document["task"] == "transcribe"
    assert document["language"] == "en"
    assert document["duration"] == 3725.5
    assert document["text"] == TRANSCRIPT.text
    assert [s["id"] for s in document["segments"]] == [0, 1, 2, 3]
    assert document["segments"][3] == {
        "id": 3,
        "start": 3723.456,
        "end": 3725.5,
        "text": "See you next week.",
    }


def test_text_is_the_plain_transcript() -> None:
    assert render(TRANSCRIPT, "text") == (
        "Welcome to the lecture. Is a < b && b > c?\n\nThen a --> c. See you next week.\n"
    )


def test_srt_parses_with_timestamps_and_multi_line_text() -> None:
    cues = list(srt.parse(render(TRANSCRIPT, "srt")))
    assert [cue.index for cue in cues] == [1, 2, 3]
    assert cues[0].start == timedelta(0) and cues[0].end == timedelta(seconds=2.5)
    assert cues[1].content == "Is a < b && b > c?\nThen a --> c."
    assert cues[2].start == timedelta(hours=1, minutes=2, seconds=3, milliseconds=456)
    assert cues[2].end == timedelta(hours=1, minutes=2, seconds=5, milliseconds=500)


def test_vtt_parses_with_escaped_markup_and_timestamps() -> None:
    text = render(TRANSCRIPT, "vtt")
    assert text.startswith("WEBVTT\n\n")
    assert text.count("-->") == 3  # one per cue: the arrow in the cue text is escaped
    captions = list(webvtt.from_string(text))
    assert [c.start for c in captions] == ["00:00:00.000", "00:00:04.000", "01:02:03.456"]
    assert captions[2].end == "01:02:05.500"
    assert html.unescape(captions[1].text) == "Is a < b && b > c?\nThen a --> c."
    assert "<" not in captions[1].text and "&&" not in captions[1].text


def test_no_segment_gives_valid_empty_subtitles() -> None:
    empty = Transcript(language="en", duration=1.0, segments=())
    assert list(srt.parse(render(empty, "srt"))) == []
    assert list(webvtt.from_string(render(empty, "vtt"))) == []
    assert orjson.loads(render(empty, "json")) == {"text": ""}


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown response_format 'docx'"):
        render(TRANSCRIPT, "docx")


def test_every_format_has_a_media_type() -> None:
    assert set(MEDIA_TYPES) == set(RESPONSE_FORMATS)
    assert set(SUBTITLE_MEDIA_TYPES) == {"srt", "vtt"}
    assert SUBTITLE_MEDIA_TYPES["vtt"] == "text/vtt; charset=utf-8"
