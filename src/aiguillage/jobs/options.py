"""What a client may ask of a job, checked once at creation (the `options` JSON field)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from aiguillage.jobs.states import Step

LanguageCode = Annotated[str, Field(pattern=r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")]
EnrichmentItem = Literal["title", "description", "keywords", "summary", "quiz"]
MAX_TRANSLATIONS = 10


class JobOptions(BaseModel):
    """A job's options; unknown fields are refused so that a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    language: LanguageCode | None = None  # None: detected by the engine
    translate_to: list[LanguageCode] = Field(default_factory=list, max_length=MAX_TRANSLATIONS)
    enrichment: list[EnrichmentItem] = Field(default_factory=list)
    callback_url: AnyHttpUrl | None = None
    webhook_every_state: bool | None = None  # None: the server's default (terminal states)

    @field_validator("translate_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("translate_to", "enrichment")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    def steps(self) -> frozenset[Step]:
        """The pipeline steps this job needs; transcription always."""
        wanted = {Step.TRANSCRIBE}
        if self.translate_to:
            wanted.add(Step.TRANSLATE)
        if self.enrichment:
            wanted.add(Step.ENRICH)
        return frozenset(wanted)
