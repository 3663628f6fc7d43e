"""Both engines on real speech: local faster-whisper, and a real OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from aiguillage.speech.engines import (
    LocalWhisper,
    MediaError,
    OpenAICompatibleTranscriber,
    TranscriptionError,
)
from aiguillage.speech.server import LocalWhisperServer
from aiguillage.speech.transcript import Transcript
from tests.speech.conftest import (
    KEY_WORDS,
    SECOND_KEY_WORDS,
    read_wav,
    second_sentence_start,
    words,
    write_wav,
)


@pytest.fixture(scope="module")
def tiny() -> LocalWhisper:
    return LocalWhisper("tiny.en", chunk_seconds=20.0, cpu_threads=2)


def assert_chunked_offsets(transcript: Transcript, speech_dir: Path) -> None:
    """The second sentence, in the second chunk, is timed from the start of the whole file."""
    assert set(KEY_WORDS) | set(SECOND_KEY_WORDS) <= words(transcript.text)
    later = [s for s in transcript.segments if "chemistry" in s.text.lower()]
    assert later, transcript
    start = second_sentence_start(speech_dir)
    assert start - 1.5 <= later[0].start <= start + 1.5
    assert transcript.segments == tuple(sorted(transcript.segments, key=lambda s: s.start))
    assert transcript.duration == pytest.approx(start + 3, abs=2)


@pytest.mark.slow
async def test_base_transcribes_a_sentence_and_detects_english(sentence_wav: Path) -> None:
    transcript = await LocalWhisper("base", cpu_threads=2).transcribe(sentence_wav)
    assert set(KEY_WORDS) <= words(transcript.text), transcript.text
    assert transcript.language == "en"
    assert 0 <= transcript.segments[0].start < transcript.segments[-1].end <= 9.0


@pytest.mark.slow
async def test_tiny_en_transcribes_compressed_media(tiny: LocalWhisper, sentence_m4a: Path) -> None:
    transcript = await tiny.transcribe(sentence_m4a, language="en")
    assert set(KEY_WORDS) <= words(transcript.text), transcript.text


@pytest.mark.slow
async def test_long_media_chunks_keep_timestamps(
    tiny: LocalWhisper, long_wav: Path, speech_dir: Path
) -> None:
    assert_chunked_offsets(await tiny.transcribe(long_wav), speech_dir)


async def test_broken_media_is_a_media_error(tiny: LocalWhisper, broken_media: Path) -> None:
    with pytest.raises(MediaError, match="not a readable audio or video file"):
        await tiny.transcribe(broken_media)


async def test_unknown_model_is_a_transcription_error(sentence_wav: Path) -> None:
    with pytest.raises(TranscriptionError, match="unknown Whisper model"):
        await LocalWhisper("enormous").transcribe(sentence_wav)


@pytest.mark.slow
async def test_remote_backend_chunks_keep_timestamps(
    whisper_server: LocalWhisperServer, long_wav: Path, speech_dir: Path
) -> None:
    remote = OpenAICompatibleTranscriber(
        whisper_server.url, whisper_server.served_name, chunk_seconds=20.0
    )
    transcript = await remote.transcribe(long_wav)
    assert_chunked_offsets(transcript, speech_dir)
    assert transcript.language == "en"


async def test_remote_backend_refusing_the_model_is_a_transcription_error(
    whisper_server: LocalWhisperServer, sentence_wav: Path
) -> None:
    remote = OpenAICompatibleTranscriber(whisper_server.url, "whisper-large")
    with pytest.raises(TranscriptionError, match="answered 404: The model 'whisper-large'"):
        await remote.transcribe(sentence_wav)


async def test_unreachable_backend_is_a_transcription_error(
    closed_port_url: str, sentence_wav: Path
) -> None:
    remote = OpenAICompatibleTranscriber(closed_port_url, "whisper-base")
    with pytest.raises(TranscriptionError, match="unreachable"):
        await remote.transcribe(sentence_wav)


async def test_broken_media_fails_before_reaching_the_backend(
    closed_port_url: str, broken_media: Path
) -> None:
    remote = OpenAICompatibleTranscriber(closed_port_url, "whisper-base")
    with pytest.raises(MediaError, match="not a readable"):
        await remote.transcribe(broken_media)


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.slow
async def test_cancelled_transcription_frees_the_model(
    tiny: LocalWhisper, long_wav: Path, tmp_path: Path
) -> None:
    samples, rate = read_wav(long_wav)
    lecture = write_wav(tmp_path / "lecture.wav", np.tile(samples, 20), rate)  # 10 minutes
    task = asyncio.create_task(tiny.transcribe(lecture))
    assert await asyncio.to_thread(_wait_until, tiny._lock.locked, 30)  # the model is busy
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Finishing the whole lecture would take minutes; a cancelled one stops at its next
    # segment and hands the model to the next caller.
    assert await asyncio.to_thread(_wait_until, lambda: not tiny._lock.locked(), 20)
