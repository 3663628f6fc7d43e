"""Job states and the order of the pipeline's steps.

A job moves `UPLOADING → WAITING_TRANSCRIPTION → TRANSCRIBING → WAITING_TRANSLATION →
TRANSLATING → WAITING_AI_ENRICHMENT → AI_ENRICHING → SUCCESS`, or to `FAILURE` from any
of them. A step the job did not ask for is skipped: its two states never appear.
A `WAITING_*` state is a queue a worker claims from; the running state that follows
is held under a lease.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    UPLOADING = "UPLOADING"
    WAITING_TRANSCRIPTION = "WAITING_TRANSCRIPTION"
    TRANSCRIBING = "TRANSCRIBING"
    WAITING_TRANSLATION = "WAITING_TRANSLATION"
    TRANSLATING = "TRANSLATING"
    WAITING_AI_ENRICHMENT = "WAITING_AI_ENRICHMENT"
    AI_ENRICHING = "AI_ENRICHING"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCESS, JobState.FAILURE)


class Step(StrEnum):
    """A unit of work a worker may be told to do (`aiguillage worker --steps`)."""

    TRANSCRIBE = "transcribe"
    TRANSLATE = "translate"
    ENRICH = "enrich"

    @property
    def waiting(self) -> JobState:
        return _WAITING[self]

    @property
    def running(self) -> JobState:
        return _RUNNING[self]


STEP_ORDER = (Step.TRANSCRIBE, Step.TRANSLATE, Step.ENRICH)
_WAITING = {
    Step.TRANSCRIBE: JobState.WAITING_TRANSCRIPTION,
    Step.TRANSLATE: JobState.WAITING_TRANSLATION,
    Step.ENRICH: JobState.WAITING_AI_ENRICHMENT,
}
_RUNNING = {
    Step.TRANSCRIBE: JobState.TRANSCRIBING,
    Step.TRANSLATE: JobState.TRANSLATING,
    Step.ENRICH: JobState.AI_ENRICHING,
}


def step_of(state: JobState) -> Step | None:
    """The step a waiting or running state belongs to."""
    for step in STEP_ORDER:
        if state in (step.waiting, step.running):
            return step
    return None


def state_after(step: Step | None, wanted: frozenset[Step]) -> JobState:
    """Where a job goes once `step` is done (None: the upload), skipping steps not asked for."""
    later = STEP_ORDER if step is None else STEP_ORDER[STEP_ORDER.index(step) + 1 :]
    for candidate in later:
        if candidate in wanted:
            return candidate.waiting
    return JobState.SUCCESS
