"""A worker built from the configuration, with everything it opens closed on the way out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from aiguillage.catalog.config import JobsConfig, TranscriberConfig
from aiguillage.jobs.llm import GatewayLlm
from aiguillage.jobs.media import MediaStorage
from aiguillage.jobs.pipeline import Pipeline
from aiguillage.jobs.states import Step
from aiguillage.jobs.webhooks import WebhookSender
from aiguillage.jobs.worker import Worker
from aiguillage.speech.engines import LocalWhisper, OpenAICompatibleTranscriber, Transcriber
from aiguillage.store.database import Database
from aiguillage.store.jobs import JobRepository


def build_transcriber(config: TranscriberConfig) -> Transcriber:
    """The configured engine: faster-whisper here, or a remote OpenAI-compatible server."""
    if config.engine == "local":
        return LocalWhisper(config.model)
    assert config.url is not None  # the config's validator requires it for `openai`
    key = None if config.api_key is None else config.api_key.get_secret_value()
    return OpenAICompatibleTranscriber(str(config.url), config.model, api_key=key)


@asynccontextmanager
async def configured_worker(
    config: JobsConfig, database: Database, steps: Iterable[Step] = tuple(Step)
) -> AsyncIterator[Worker]:
    """A worker on `database` for `steps`; its HTTP sessions are closed when the block ends."""
    repository = JobRepository(database, webhook_every_state=config.webhooks.every_state)
    llm = GatewayLlm(config.llm)
    webhooks = WebhookSender(repository, config.webhooks, allow_private=config.allow_private_urls)
    pipeline = Pipeline(
        config,
        repository,
        MediaStorage(config.storage_dir),
        build_transcriber(config.transcriber),
        llm,
    )
    try:
        yield Worker(config, repository, pipeline, webhooks, steps=steps)
    finally:
        await llm.close()
        await webhooks.close()
