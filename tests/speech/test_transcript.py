from __future__ import annotations

import pytest

from aiguillage.speech.transcript import Segment, Transcript


def test_text_joins_trimmed_segments_and_skips_empty_ones() -> None:
    transcript = Transcript(
        language="en",
        duration=5.0,
        segments=(Segment(0, 1, " Hello there. "), Segment(1, 2, "  "), Segment(2, 3, "Bye.")),
    )
    assert transcript.text == "Hello there. Bye."


def test_json_round_trip_keeps_everything() -> None:
    transcript = Transcript(
        language="fr",
        duration=3725.25,
        segments=(Segment(0.0, 1.5, "Bonjour « à tous »"), Segment(3600.125, 3601.0, "fin")),
    )
    assert Transcript.from_json(transcript.to_json()) == transcript
    assert Transcript.from_json(transcript.to_json().decode()) == transcript


@pytest.mark.parametrize(
    "stored",
    [
        b"",
        b"not json",
        b"[]",
        b'{"language": "en"}',
        b'{"language": "en", "duration": 1, "segments": [[1]]}',
    ],
)
def test_from_json_refuses_what_to_json_did_not_write(stored: bytes) -> None:
    with pytest.raises(ValueError, match="not a stored transcript"):
        Transcript.from_json(stored)


def test_shifted_moves_both_ends() -> None:
    assert Segment(1.0, 2.5, "x").shifted(600.0) == Segment(601.0, 602.5, "x")
