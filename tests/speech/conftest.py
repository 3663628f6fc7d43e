"""Real speech for the speech tests: espeak-ng says known sentences into WAV files."""

from __future__ import annotations

import shutil
import subprocess
import wave
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from aiguillage.backends.local_engine import EngineUnavailable
from aiguillage.speech.server import LocalWhisperServer

# Long enough for Whisper base to be sure of the language of espeak-ng's synthetic voice.
SENTENCE = (
    "Good morning everyone. Today the students are learning mathematics in Paris, "
    "and tomorrow they will study history."
)
KEY_WORDS = ("learning", "mathematics", "paris")
SECOND_SENTENCE = "Please open your books at the chapter about chemistry."
SECOND_KEY_WORDS = ("open", "chapter", "chemistry")
SILENCE_S = 20.0


def speak(text: str, destination: Path) -> Path:
    """`text` spoken by espeak-ng into a WAV file (22.05 kHz mono); skips without espeak-ng.

    The American voice is the one Whisper's small models understand best.
    """
    binary = shutil.which("espeak-ng")
    if binary is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    subprocess.run([binary, "-v", "en-us", "-w", str(destination), text], check=True, timeout=30)
    return destination


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as reader:
        frames = reader.readframes(reader.getnframes())
        return np.frombuffer(frames, dtype="<i2"), reader.getframerate()


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples.astype("<i2").tobytes())
    return path


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def sentence_wav(speech_dir: Path) -> Path:
    return speak(SENTENCE, speech_dir / "sentence.wav")


@pytest.fixture(scope="session")
def long_wav(speech_dir: Path) -> Path:
    """SENTENCE, SILENCE_S of silence, then SECOND_SENTENCE: where each starts is known."""
    first, rate = read_wav(speak(SENTENCE, speech_dir / "first.wav"))
    second, _ = read_wav(speak(SECOND_SENTENCE, speech_dir / "second.wav"))
    silence = np.zeros(int(SILENCE_S * rate), dtype=np.int16)
    return write_wav(speech_dir / "long.wav", np.concatenate([first, silence, second]), rate)


def second_sentence_start(speech_dir: Path) -> float:
    """Seconds from the start of `long_wav` to the start of the second sentence."""
    first, rate = read_wav(speech_dir / "first.wav")
    return len(first) / rate + SILENCE_S


@pytest.fixture(scope="session")
def sentence_m4a(sentence_wav: Path, speech_dir: Path) -> Path:
    """The sentence as AAC in an MP4 container, as a phone or a video would record it."""
    samples, rate = read_wav(sentence_wav)
    destination = speech_dir / "sentence.m4a"
    with av.open(str(destination), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return destination


@pytest.fixture(scope="session")
def broken_media(speech_dir: Path) -> Path:
    """Bytes that claim to be an MP3 but are text."""
    destination = speech_dir / "broken.mp3"
    destination.write_bytes(b"this is not audio, only text pretending to be an mp3 file\n" * 50)
    return destination


def words(text: str) -> set[str]:
    return {word.strip(".,!?;:'\"").lower() for word in text.split()}


@pytest.fixture(scope="session")
def whisper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWhisperServer]:
    """A real `aiguillage whisper-server` process with tiny.en (the quickest model)."""
    log = tmp_path_factory.mktemp("whisper") / "server.log"
    try:
        server = LocalWhisperServer("tiny.en", cpu_threads=2, log_file=log).start(timeout_s=90)
    except EngineUnavailable as error:
        pytest.skip(f"whisper-server unavailable: {error}")
    yield server
    server.stop()
