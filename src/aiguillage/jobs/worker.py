"""The worker loop: claim a job, do its step under a renewed lease, record the outcome.

`aiguillage worker` runs one of these per process; any number of processes on
any number of machines share the database. A worker that dies leaves its job
leased; the lease expires and another worker takes it up (store/jobs.py). A
worker told to stop (SIGTERM) claims nothing more, gives its current step
`stop_grace_s` to finish, and otherwise hands the job back unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable

from aiguillage.catalog.config import JobsConfig
from aiguillage.jobs.pipeline import Pipeline, StepFailed
from aiguillage.jobs.states import Step, step_of
from aiguillage.jobs.webhooks import WebhookSender
from aiguillage.store.jobs import JobRecord, JobRepository, RetryPolicy

log = logging.getLogger(__name__)

UPLOAD_SWEEP_INTERVAL_S = 60.0  # how often a worker looks for uploads that never finished


def worker_name() -> str:
    """Host, process and a random tag: unique, and readable in a job's history."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """One loop over the shared queue, for the steps it was given; see the module docstring."""

    def __init__(
        self,
        config: JobsConfig,
        repository: JobRepository,
        pipeline: Pipeline,
        webhooks: WebhookSender,
        *,
        steps: Iterable[Step] = tuple(Step),
        name: str | None = None,
    ) -> None:
        self.config = config
        self.repository = repository
        self.pipeline = pipeline
        self.webhooks = webhooks
        self.steps = tuple(steps)
        self.name = name or worker_name()
        self.retry = RetryPolicy(config.max_attempts, config.retry_backoff_s)
        self.stopping = asyncio.Event()
        self._next_upload_sweep = 0.0

    def stop(self) -> None:
        """Claim nothing more; the current step gets `stop_grace_s` to finish."""
        self.stopping.set()

    async def run(self) -> None:
        """Work until `stop()`; a database hiccup is logged and retried, never fatal."""
        log.info("worker %s started for steps %s", self.name, ",".join(self.steps))
        while not self.stopping.is_set():
            try:
                busy = await self.run_once()
            except Exception:
                log.exception("worker %s: unexpected error; going on", self.name)
                busy = False
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.config.poll_interval_s)
        log.info("worker %s stopped", self.name)

    async def run_once(self) -> bool:
        """Send a due webhook and do one step of one job; whether there was anything to do."""
        now = time.monotonic()
        if now >= self._next_upload_sweep:
            self._next_upload_sweep = now + UPLOAD_SWEEP_INTERVAL_S
            await self.repository.fail_stale_uploads(self.config.upload_timeout_s)
        sent = await self.webhooks.send_one()
        job = await self.repository.claim(self.steps, self.name, self.config.lease_s, self.retry)
        if job is not None:
            await self.work(job)
        return sent or job is not None

    async def work(self, job: JobRecord) -> None:
        step = step_of(job.state)
        assert step is not None and job.state == step.running
        task = asyncio.create_task(self.pipeline.run(job, step, self.name))
        if not await self._supervise(job, task):
            return
        try:
            results = task.result()
        except StepFailed as failure:
            state = await self.repository.step_failed(
                job, step, self.name, failure.cause, retry=None if failure.permanent else self.retry
            )
            log.info("job %s: %s failed (%s) -> %s", job.id, step, failure.cause, state)
            return
        except Exception as error:  # a bug or an unexpected engine failure: retried, then shown
            log.exception("job %s: %s raised", job.id, step)
            cause = f"internal error during {step}: {type(error).__name__}: {error}"
            await self.repository.step_failed(job, step, self.name, cause, retry=self.retry)
            return
        if await self.repository.complete_step(job, step, self.name, **results):
            log.info("job %s: %s done", job.id, step)
        elif await self.repository.get(job.id) is None:  # deleted by its owner meanwhile
            self.pipeline.storage.delete(job.id)  # a fetch may have re-created its folder
        else:
            log.warning("job %s: lease lost before %s was recorded", job.id, step)

    async def _supervise(self, job: JobRecord, task: asyncio.Task[object]) -> bool:
        """Renew the lease while the step runs; whether it ran to an outcome we may record."""
        step = step_of(job.state)
        assert step is not None
        renew_every = self.config.lease_s / 3
        stop_wait = asyncio.create_task(self.stopping.wait())
        try:
            while not task.done():
                await asyncio.wait(
                    {task, stop_wait}, timeout=renew_every, return_when=asyncio.FIRST_COMPLETED
                )
                if task.done():
                    break
                if self.stopping.is_set():
                    return await self._finish_or_hand_back(job, step, task)
                if not await self.repository.renew(job.id, self.name, self.config.lease_s):
                    log.warning("job %s: lease lost; abandoning %s", job.id, step)
                    await _cancel(task)
                    return False
            return True
        finally:
            stop_wait.cancel()

    async def _finish_or_hand_back(
        self, job: JobRecord, step: Step, task: asyncio.Task[object]
    ) -> bool:
        grace = self.config.stop_grace_s
        await self.repository.renew(job.id, self.name, self.config.lease_s + grace)
        done, _ = await asyncio.wait({task}, timeout=grace)
        if done:
            return True
        await _cancel(task)
        await self.repository.hand_back(job, step, self.name)
        log.info("job %s: handed back unfinished (worker stopping)", job.id)
        return False


async def _cancel(task: asyncio.Task[object]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
