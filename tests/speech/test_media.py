"""Decoding real media to 16 kHz mono, cutting long media in pauses, refusing broken files."""

from __future__ import annotations

import itertools
import wave
from pathlib import Path

import numpy as np
import pytest

from aiguillage.speech.errors import MediaError
from aiguillage.speech.media import SAMPLE_RATE, Audio, chunks, decode
from tests.speech.conftest import SILENCE_S, read_wav, second_sentence_start


def test_wav_is_resampled_to_16_khz_mono_with_its_duration(sentence_wav: Path) -> None:
    original, rate = read_wav(sentence_wav)
    audio = decode(sentence_wav)
    assert audio.samples.dtype == np.int16
    assert audio.duration == pytest.approx(len(original) / rate, abs=0.02)
    assert np.abs(audio.samples).max() > 1000  # speech, not silence


def test_compressed_audio_in_a_video_container_decodes(
    sentence_m4a: Path, sentence_wav: Path
) -> None:
    audio = decode(sentence_m4a)
    assert audio.duration == pytest.approx(decode(sentence_wav).duration, abs=0.1)
    assert np.abs(audio.samples).max() > 1000


def test_wav_round_trip(sentence_wav: Path, tmp_path: Path) -> None:
    audio = decode(sentence_wav)
    written = tmp_path / "out.wav"
    written.write_bytes(audio.to_wav())
    with wave.open(str(written)) as reader:
        assert (reader.getframerate(), reader.getnchannels()) == (SAMPLE_RATE, 1)
    assert np.array_equal(decode(written).samples, audio.samples)


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        (b"this is not audio, only text pretending to be an mp3 file\n" * 50, "not a readable"),
        (b"", "empty"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "not a readable"),  # a WAV header cut short
    ],
)
def test_broken_media_fail_with_a_cause(tmp_path: Path, content: bytes, cause: str) -> None:
    media = tmp_path / "upload.mp3"
    media.write_bytes(content)
    with pytest.raises(MediaError, match=cause) as caught:
        decode(media)
    assert str(tmp_path) not in str(caught.value)  # no server path shown to a user


def test_missing_file_fails_with_a_cause(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="does not exist"):
        decode(tmp_path / "nothing.wav")


def test_a_file_without_audio_track_is_refused(tmp_path: Path) -> None:
    import av

    video = tmp_path / "silent-film.mp4"
    with av.open(str(video), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(MediaError, match="no audio track"):
        decode(video)


def test_short_audio_is_one_chunk(sentence_wav: Path) -> None:
    audio = decode(sentence_wav)
    (only,) = chunks(audio, 60.0)
    assert only.offset == 0.0 and np.array_equal(only.audio.samples, audio.samples)


def test_chunks_cover_the_audio_once_and_cut_in_the_pause(long_wav: Path, speech_dir: Path) -> None:
    audio = decode(long_wav)
    pieces = list(chunks(audio, 20.0))
    assert len(pieces) == 2
    assert np.array_equal(np.concatenate([p.audio.samples for p in pieces]), audio.samples)
    first_end = second_sentence_start(speech_dir) - SILENCE_S
    cut = pieces[1].offset
    assert first_end < cut < second_sentence_start(speech_dir)  # inside the silence
    assert 20.0 - 10.0 <= cut <= 20.0
    assert pieces[0].audio.duration == pytest.approx(cut)


def test_chunking_noise_respects_the_limit_exactly() -> None:
    noise = np.random.default_rng(7).integers(-3000, 3000, SAMPLE_RATE * 95, dtype=np.int16)
    pieces = list(chunks(Audio(samples=noise), 30.0))
    assert all(p.audio.duration <= 30.0 for p in pieces)
    assert [p.offset for p in pieces] == sorted(p.offset for p in pieces)
    assert sum(len(p.audio.samples) for p in pieces) == len(noise)
    assert pieces[0].offset == 0.0
    for before, after in itertools.pairwise(pieces):
        assert after.offset == pytest.approx(before.offset + before.audio.duration)


def test_chunk_length_must_be_positive(sentence_wav: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        list(chunks(decode(sentence_wav), 0))
