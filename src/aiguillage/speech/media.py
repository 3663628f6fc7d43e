"""Decoding any audio or video file to what Whisper hears: 16 kHz mono PCM.

PyAV (FFmpeg's libraries) reads every container and codec FFmpeg knows, so lecture
videos and meeting recordings need no conversion beforehand. Long media are cut into
chunks at the quietest moment near each boundary, so that no word is cut in half,
and each chunk keeps its offset so that timestamps stay true to the original.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import av
import numpy as np
import numpy.typing as npt

from aiguillage.speech.errors import MediaError

SAMPLE_RATE: Final = 16_000
# A chunk boundary moves back by at most this much to fall into a pause.
_BOUNDARY_SEARCH_S: Final = 10.0
# Loudness is compared over frames this long when looking for a pause.
_FRAME_S: Final = 0.1


@dataclass(frozen=True, eq=False)
class Audio:
    """Mono 16-bit PCM at SAMPLE_RATE; int16 halves the memory of float32 for long media."""

    samples: npt.NDArray[np.int16]

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def as_float32(self) -> npt.NDArray[np.float32]:
        """Samples in [-1, 1), the input faster-whisper expects."""
        return self.samples.astype(np.float32) / 32768.0

    def to_wav(self) -> bytes:
        """A WAV file of these samples, the one format every transcription server reads."""
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(SAMPLE_RATE)
            writer.writeframes(self.samples.astype("<i2").tobytes())
        return buffer.getvalue()


@dataclass(frozen=True, eq=False)
class Chunk:
    """A piece of a longer medium, `offset` seconds after its start."""

    offset: float
    audio: Audio


def decode(media: Path) -> Audio:
    """The first audio track of `media`, resampled to 16 kHz mono.

    Raises MediaError with a cause a user can act on: missing file, not a medium,
    no audio track, undecodable stream, no sound at all.
    """
    if not media.is_file():
        raise MediaError(f"the file {media.name!r} does not exist")
    if media.stat().st_size == 0:
        raise MediaError("the file is empty")
    try:
        with av.open(str(media), mode="r") as container:
            if not container.streams.audio:
                raise MediaError("the file has no audio track")
            pieces = list(_resampled(container))
    except MediaError:
        raise
    except av.FFmpegError as error:
        # strerror, not str(error): the latter names the server-side path of the upload.
        cause = error.strerror or type(error).__name__
        raise MediaError(f"the file is not a readable audio or video file: {cause}") from error
    except (UnicodeDecodeError, ValueError, EOFError, OSError) as error:
        raise MediaError(f"the file could not be decoded: {type(error).__name__}") from error
    samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
    if len(samples) == 0:
        raise MediaError("the audio track holds no sound samples")
    return Audio(samples=samples)


def _resampled(container: av.container.InputContainer) -> Iterator[npt.NDArray[np.int16]]:
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    stream = container.streams.audio[0]
    for frame in container.decode(stream):
        for converted in resampler.resample(frame):
            yield converted.to_ndarray().reshape(-1).astype(np.int16, copy=False)
    for converted in resampler.resample(None):  # what the resampler still holds
        yield converted.to_ndarray().reshape(-1).astype(np.int16, copy=False)


def chunks(audio: Audio, max_seconds: float) -> Iterator[Chunk]:
    """`audio` cut into pieces of at most `max_seconds`, each cut placed in a pause.

    The pieces cover the audio exactly once, in order; media shorter than `max_seconds`
    give one chunk at offset 0.
    """
    if max_seconds <= 0:
        raise ValueError("max_seconds must be positive")
    limit = int(max_seconds * SAMPLE_RATE)
    total = len(audio.samples)
    start = 0
    while start < total:
        fits = total - start <= limit
        end = total if fits else _quietest_cut(audio.samples, start, start + limit)
        yield Chunk(offset=start / SAMPLE_RATE, audio=Audio(samples=audio.samples[start:end]))
        start = end


def _quietest_cut(samples: npt.NDArray[np.int16], start: int, hard_end: int) -> int:
    """The sample index, in the last seconds before `hard_end`, at the quietest frame."""
    frame = int(_FRAME_S * SAMPLE_RATE)
    search_from = max(start + frame, hard_end - int(_BOUNDARY_SEARCH_S * SAMPLE_RATE))
    frames = (hard_end - search_from) // frame
    if frames < 1:
        return hard_end
    window = samples[hard_end - frames * frame : hard_end].astype(np.float32).reshape(frames, frame)
    energy = np.sqrt(np.mean(window**2, axis=1))
    # Latest of the quietest frames: the chunk stays as long as allowed.
    quietest = frames - 1 - int(np.argmin(energy[::-1]))
    return hard_end - (frames - quietest) * frame + frame // 2
