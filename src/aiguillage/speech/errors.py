"""The two ways a transcription fails, kept apart because they call for different answers.

A `MediaError` is the user's file (broken, not audio, empty): retrying will not help and
the cause must be shown to them. A `TranscriptionError` is the engine's (model missing,
backend down or answering nonsense): another attempt or another backend may succeed.
"""

from __future__ import annotations


class MediaError(ValueError):
    """The medium cannot be decoded; the message says why, in words meant for the user."""


class TranscriptionError(RuntimeError):
    """The engine failed on a valid medium; the message says what went wrong."""


class UnsupportedLanguage(TranscriptionError):
    """The caller asked for a language the model does not know: the request is at fault."""
