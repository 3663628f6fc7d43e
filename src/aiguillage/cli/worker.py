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

from aiguillage.catalog.config import GatewayConfig
from aiguillage.cli.keys import fail
from aiguillage.jobs.runtime import configured_worker
from aiguillage.jobs.states import Step
from aiguillage.store.database import open_database


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


async def run_worker(config: GatewayConfig, steps: tuple[Step, ...]) -> None:
    """Run one worker until SIGTERM or SIGINT."""
    database = await open_database(config.resolved_database_url())
    try:
        async with configured_worker(config.jobs, database, steps) as job_worker:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, job_worker.stop)
            await job_worker.run()
    finally:
        await database.dispose()
