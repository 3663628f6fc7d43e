"""What the LLM is asked for a job: translated segments and enrichment items, with their schemas.

Each item is its own small question with its own JSON schema: small models
(the embedded SmolLM2) follow one short instruction far better than a composite
one, a failure costs one item and not all of them, and items already answered
are kept when a job is retaken. Lengths are bounded in the schemas themselves, so
that the grammar stops a model that would ramble.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from aiguillage.jobs.llm import GatewayLlm
from aiguillage.jobs.options import EnrichmentItem

MAX_TRANSCRIPT_CHARS = 8000  # about 2,000 tokens: fits the smallest context with room to answer
TRANSLATION_BATCH = 20  # segments per call: keeps each answer short and its count checkable


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TitleAnswer(_Answer):
    title: Annotated[str, Field(min_length=1, max_length=120)]


class DescriptionAnswer(_Answer):
    description: Annotated[str, Field(min_length=1, max_length=600)]


class KeywordsAnswer(_Answer):
    keywords: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=40)]], Field(min_length=3, max_length=10)
    ]


class SummaryAnswer(_Answer):
    summary: Annotated[str, Field(min_length=1, max_length=1200)]


class QuizQuestion(_Answer):
    """A multiple-choice question; `answer` is the index of the right choice."""

    question: Annotated[str, Field(min_length=1, max_length=160)]
    choices: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=80)]], Field(min_length=4, max_length=4)
    ]
    answer: Annotated[int, Field(ge=0, le=3)]

    @model_validator(mode="after")
    def _answer_is_a_choice(self) -> QuizQuestion:
        if self.answer >= len(self.choices):
            raise ValueError("answer must be the index of one of the choices")
        return self


class QuizAnswer(_Answer):
    questions: Annotated[list[QuizQuestion], Field(min_length=1, max_length=3)]


# Per item: the answer's schema, the instruction, and how many times the configured
# max_tokens it may take (a quiz is several questions of four choices each).
ITEMS: dict[str, tuple[type[_Answer], str, int]] = {
    "title": (TitleAnswer, "Write a short title for this transcript.", 1),
    "description": (DescriptionAnswer, "Write a two-sentence description of this transcript.", 1),
    "keywords": (KeywordsAnswer, "List 3 to 10 keywords for this transcript.", 1),
    "summary": (SummaryAnswer, "Summarise this transcript in a short paragraph.", 1),
    "quiz": (
        QuizAnswer,
        "Write multiple-choice questions about this transcript, each with 4 choices and "
        "the index (0 to 3) of the right one.",
        3,
    ),
}


async def enrich(
    llm: GatewayLlm, item: EnrichmentItem, text: str, language: str, *, priority: int
) -> dict[str, Any]:
    """One enrichment item for a transcript, validated, as JSON."""
    answer_type, instruction, budget = ITEMS[item]
    messages = [
        {
            "role": "system",
            "content": f"You describe lecture and meeting transcripts. {instruction} "
            f"Answer in the transcript's language ({language}), in JSON.",
        },
        {"role": "user", "content": text[:MAX_TRANSCRIPT_CHARS]},
    ]
    answer = await llm.ask(answer_type, messages, priority=priority, budget=budget)
    return answer.model_dump(mode="json")


async def translate(
    llm: GatewayLlm, texts: list[str], source: str, target: str, *, priority: int
) -> list[str]:
    """The texts translated one for one, in batches; the count is enforced by the schema."""
    translated: list[str] = []
    for start in range(0, len(texts), TRANSLATION_BATCH):
        batch = texts[start : start + TRANSLATION_BATCH]
        answer_type = _translation_answer(len(batch))
        numbered = "\n".join(f"{index + 1}. {text}" for index, text in enumerate(batch))
        messages = [
            {
                "role": "system",
                "content": f"Translate each numbered line from {source} to {target}. "
                f"Answer in JSON with exactly {len(batch)} translations, in order.",
            },
            {"role": "user", "content": numbered},
        ]
        budget = 1 + sum(len(text) for text in batch) // 500  # roughly 1 per 500 characters
        answer = await llm.ask(answer_type, messages, priority=priority, budget=budget)
        translated.extend(answer.model_dump()["translations"])
    return translated


def _translation_answer(count: int) -> type[_Answer]:
    """A schema with exactly `count` translations, so that no segment is dropped or merged."""
    lines = Annotated[
        list[Annotated[str, Field(min_length=1, max_length=2000)]],
        Field(min_length=count, max_length=count),
    ]
    return create_model("TranslationAnswer", __base__=_Answer, translations=(lines, ...))
