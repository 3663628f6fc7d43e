"""Speech-to-text: transcripts, subtitle formats, media decoding and transcription engines.

The engines turn an audio or video file into a `Transcript`; `formats.render` turns a
transcript into what OpenAI's `/v1/audio/transcriptions` answers (json, verbose_json,
text, srt, vtt). The synchronous route and the asynchronous jobs both build on these.
"""
