"""`aiguillage worker`: a process that does the steps of transcription jobs.

Start as many as the machines allow; they share the work through the database.
SIGTERM or Ctrl-C stops one cleanly: its current step finishes within
`jobs.stop_grace_s` or is handed back for another worker.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from aiguillage.catalog.config import GatewayConfig, TranscriberConfig
from aiguillage.cli.keys import fail
from aiguillage.jobs.llm import GatewayLlm
from aiguillage.jobs.media import MediaStorage
from aiguillage.jobs.pipeline import Pipeline
from aiguillage.jobs.states import Step
from aiguillage.jobs.webhooks import WebhookSender
from aiguillage.jobs.worker import Worker
from aiguillage.speech.engines import LocalWhisper, OpenAICompatibleTranscriber, Transcriber
from aiguillage.store.database import open_database
from aiguillage.store.jobs import JobRepository

log = logging.getLogger(__name__)


def worker(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway YAML file.")],
    steps: Annotated[
        str,
        typer.Option(help="Comma-separated steps this worker does: transcribe,translate,enrich."),
    ] = "transcribe,translate,enrich",
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Do transcription job steps until stopped (SIGTERM: finish or hand back, then exit)."""
    from aiguillage.cli import _load

    try:
        chosen = parse_steps(steps)
    except ValueError as error:
        fail(str(error), 2)
    gateway_config = _load(config)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    asyncio.run(run_worker(gateway_config, chosen))


def parse_steps(text: str) -> tuple[Step, ...]:
    """`transcribe,enrich` -> the steps; a `ValueError` naming an unknown one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = {step.value: step for step in Step}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown steps {unknown or text!r}: expected {', '.join(known)}")
    return tuple(dict.fromkeys(known[name] for name in names))


def build_transcriber(config: TranscriberConfig) -> Transcriber:
    if config.engine == "local":
        return LocalWhisper(config.model)
    assert config.url is not None
    key = None if config.api_key is None else config.api_key.get_secret_value()
    return OpenAICompatibleTranscriber(str(config.url), config.model, api_key=key)


async def run_worker(config: GatewayConfig, steps: tuple[Step, ...]) -> None:
    """Run one worker until SIGTERM or SIGINT."""
    jobs_config = config.jobs
    database = await open_database(config.resolved_database_url())
    repository = JobRepository(database, webhook_every_state=jobs_config.webhooks.every_state)
    llm = GatewayLlm(jobs_config.llm)
    webhooks = WebhookSender(
        repository, jobs_config.webhooks, allow_private=jobs_config.allow_private_urls
    )
    pipeline = Pipeline(
        jobs_config,
        repository,
        MediaStorage(jobs_config.storage_dir),
        build_transcriber(jobs_config.transcriber),
        llm,
    )
    job_worker = Worker(jobs_config, repository, pipeline, webhooks, steps=steps)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, job_worker.stop)
    try:
        await job_worker.run()
    finally:
        await llm.close()
        await webhooks.close()
        await database.dispose()
