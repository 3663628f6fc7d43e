"""The work of each step, given a claimed job: transcribe, translate, enrich.

Steps return the results to store with the step's completion; they do not
change the job's state themselves (the worker does, under its lease). Partial
results of a long step (one language, one enrichment item) are saved as they
come, so a job retaken after a crash does not pay for them twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from aiguillage.catalog.config import JobsConfig
from aiguillage.jobs.enrichment import enrich, translate
from aiguillage.jobs.llm import GatewayLlm, LlmError
from aiguillage.jobs.media import MediaStorage
from aiguillage.jobs.states import Step
from aiguillage.jobs.urls import FetchFailed, UrlRefused, fetch_to_file
from aiguillage.speech.engines import Transcriber
from aiguillage.speech.errors import MediaError, TranscriptionError, UnsupportedLanguage
from aiguillage.speech.transcript import Segment, Transcript
from aiguillage.store.jobs import JobRecord, JobRepository


class StepFailed(Exception):
    """A step could not be done; `permanent` when retrying cannot help (broken media)."""

    def __init__(self, cause: str, *, permanent: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.permanent = permanent


@dataclass
class Pipeline:
    config: JobsConfig
    repository: JobRepository
    storage: MediaStorage
    transcriber: Transcriber
    llm: GatewayLlm

    async def run(self, job: JobRecord, step: Step, owner: str) -> dict[str, Any]:
        """Do `step` for `job`; the results to store, or `StepFailed`."""
        if step is Step.TRANSCRIBE:
            return await self._transcribe(job)
        if step is Step.TRANSLATE:
            return await self._translate(job, owner)
        return await self._enrich(job, owner)

    async def _transcribe(self, job: JobRecord) -> dict[str, Any]:
        media = self.storage.path(job.id)
        fetched: dict[str, Any] = {}
        if job.source_url is not None and not media.is_file():
            fetched["media_bytes"] = await self._fetch(job, media)
        if not media.is_file():
            raise StepFailed("the job's media is missing from storage", permanent=True)
        try:
            transcript = await self.transcriber.transcribe(media, language=job.options.language)
        except MediaError as error:
            raise StepFailed(f"the media cannot be transcribed: {error}", permanent=True) from None
        except UnsupportedLanguage as error:  # the job's options are at fault: no retry
            raise StepFailed(
                f"the language cannot be transcribed: {error}", permanent=True
            ) from None
        except TranscriptionError as error:
            raise StepFailed(f"the transcription engine failed: {error}") from None
        return {"transcript": stored(transcript), **fetched}

    async def _fetch(self, job: JobRecord, media: Path) -> int:
        """Download the job's URL to its media path; the number of bytes."""
        assert job.source_url is not None
        partial = media.with_name("media.part")  # renamed once whole: a crash leaves no half file
        try:
            size = await fetch_to_file(
                job.source_url,
                partial,
                allow_private=self.config.allow_private_urls,
                max_bytes=self.config.max_upload_bytes,
                timeout_s=self.config.fetch_timeout_s,
            )
        except UrlRefused as error:
            raise StepFailed(f"the media URL is refused: {error}", permanent=True) from None
        except FetchFailed as error:
            raise StepFailed(str(error), permanent=error.permanent) from None
        partial.replace(media)
        return size

    async def _translate(self, job: JobRecord, owner: str) -> dict[str, Any]:
        source = loaded(job)
        translations = dict(job.translations)
        for target in job.options.translate_to:
            if target in translations:
                continue  # done before this job was retaken
            if target == source.language:
                translations[target] = stored(source)
            else:
                texts = [segment.text.strip() for segment in source.segments]
                try:
                    lines = await translate(
                        self.llm, texts, source.language, target, priority=job.priority
                    )
                except LlmError as error:
                    raise StepFailed(f"translation to {target} failed: {error}") from None
                segments = tuple(
                    Segment(start=s.start, end=s.end, text=line)
                    for s, line in zip(source.segments, lines, strict=True)
                )
                translations[target] = stored(
                    Transcript(language=target, duration=source.duration, segments=segments)
                )
            await self.repository.save_progress(job.id, owner, translations=translations)
        return {"translations": translations}

    async def _enrich(self, job: JobRecord, owner: str) -> dict[str, Any]:
        transcript = loaded(job)
        results = dict(job.enrichment)
        for item in job.options.enrichment:
            if item in results:
                continue
            try:
                results[item] = await enrich(
                    self.llm, item, transcript.text, transcript.language, priority=job.priority
                )
            except LlmError as error:
                raise StepFailed(f"enrichment item '{item}' failed: {error}") from None
            await self.repository.save_progress(job.id, owner, enrichment=results)
        return {"enrichment": results}


def stored(transcript: Transcript) -> dict[str, Any]:
    """A transcript as the JSON document kept in the job's row."""
    document: dict[str, Any] = orjson.loads(transcript.to_json())
    return document


def loaded(job: JobRecord, language: str | None = None) -> Transcript:
    """The job's transcript, or its translation into `language`."""
    document = job.transcript if language is None else job.translations.get(language)
    if document is None:
        raise StepFailed("the job has no transcript to work on", permanent=True)
    return Transcript.from_json(orjson.dumps(document))
