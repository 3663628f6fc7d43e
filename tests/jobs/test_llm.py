"""Structured LLM answers: the schema is sent, the priority too, and bad answers are re-asked."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from aiguillage.catalog.config import JobsLlmConfig
from aiguillage.jobs.enrichment import ITEMS, QuizAnswer, TitleAnswer, _translation_answer
from aiguillage.jobs.llm import GatewayLlm, LlmError
from tests.fakes.engine import FakeEngine


async def test_an_answer_that_is_not_valid_is_asked_again_then_fails_with_a_cause(
    fake_engine: FakeEngine,
) -> None:
    before = len(fake_engine.log.requests)
    llm = GatewayLlm(JobsLlmConfig(gateway_url=fake_engine.url("ok"), attempts=2, model="m"))
    try:
        with pytest.raises(LlmError, match=r"not valid.*after 2 attempts"):
            await llm.ask(TitleAnswer, [{"role": "user", "content": "x"}], priority=3)
    finally:
        await llm.close()
    seen = fake_engine.log.requests[before:]
    assert len(seen) == 2
    assert seen[0].headers["x-priority"] == "3"
    schema = seen[0].body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["title"]["maxLength"] == 120


async def test_a_gateway_error_is_a_cause_the_client_can_read(fake_engine: FakeEngine) -> None:
    llm = GatewayLlm(JobsLlmConfig(gateway_url=fake_engine.url("status-503"), attempts=1))
    try:
        with pytest.raises(LlmError, match="HTTP 503"):
            await llm.ask(TitleAnswer, [{"role": "user", "content": "x"}], priority=0)
    finally:
        await llm.close()


def test_quiz_questions_need_four_choices_and_an_answer_among_them() -> None:
    good = {"questions": [{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2}]}
    assert QuizAnswer.model_validate(good).questions[0].answer == 2
    for bad in (
        {"questions": [{"question": "Q?", "choices": ["a", "b"], "answer": 0}]},
        {"questions": [{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 4}]},
        {"questions": []},
    ):
        with pytest.raises(ValidationError):
            QuizAnswer.model_validate(bad)


def test_translations_must_match_the_segment_count() -> None:
    answer = _translation_answer(2)
    assert answer.model_validate({"translations": ["un", "deux"]})
    with pytest.raises(ValidationError):
        answer.model_validate({"translations": ["un"]})
    schema = answer.model_json_schema()["properties"]["translations"]
    assert (schema["minItems"], schema["maxItems"]) == (2, 2)


def test_every_enrichment_item_has_a_schema() -> None:
    assert set(ITEMS) == {"title", "description", "keywords", "summary", "quiz"}
