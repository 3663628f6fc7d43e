"""Transcription jobs in the database: the queue, the leases, the history and the webhook outbox.

Every state change goes through `_transition`, in the same transaction as the
results it records: a job's history, its results and its webhook are written
together or not at all. Changes made by a worker are conditioned on the worker
still holding the job's lease, so a worker that lost its lease (it was too slow,
another one took the job up) cannot record anything twice; `SUCCESS` is written once.

Claiming: PostgreSQL locks the chosen row with `FOR UPDATE SKIP LOCKED`, so
concurrent workers pick different jobs without waiting on each other; SQLite has
one writer at a time, and the claim runs in a `BEGIN IMMEDIATE` transaction (see
`Database.begin_write`), which makes its read-then-update atomic across processes.
Lease times come from the workers' clocks: keep them in sync (NTP), as for any lease.
"""

from __future__ import annotations

import builtins
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from aiguillage.jobs.options import JobOptions
from aiguillage.jobs.states import JobState, Step, state_after, step_of
from aiguillage.store.database import Database
from aiguillage.store.tables import job_events, jobs, oauth_clients, webhook_deliveries

MAX_BACKOFF_S = 3600.0


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as stored; results are plain JSON documents."""

    id: str
    client: int
    organisation: str
    priority: int
    state: JobState
    options: JobOptions
    source_url: str | None
    media_name: str | None
    media_bytes: int | None
    attempts: int
    lease_owner: str | None
    lease_until: datetime | None
    failed_step: str | None
    failure_cause: str | None
    transcript: dict[str, Any] | None
    translations: dict[str, Any]
    enrichment: dict[str, Any]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class JobEvent:
    state: JobState
    at: datetime
    detail: str | None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    id: int
    job_id: str
    event: str
    url: str
    payload: dict[str, Any]
    idempotency_key: str
    status: str  # pending | delivered | failed
    attempts: int
    log: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a step may fail, and how long to wait before trying it again."""

    max_attempts: int
    backoff_s: float

    def delay(self, failures: int) -> timedelta:
        """Exponential: `backoff_s`, then twice as long after each further failure."""
        return timedelta(seconds=min(self.backoff_s * 2 ** max(failures - 1, 0), MAX_BACKOFF_S))


class JobRepository:
    """The `jobs`, `job_events` and `webhook_deliveries` tables."""

    def __init__(self, db: Database, *, webhook_every_state: bool = False) -> None:
        self._db = db
        self._engine = db.engine
        self._webhook_every_state = webhook_every_state

    # -- creation and reading (the API) --------------------------------------------------

    async def create(self, *, client: int, organisation: str, priority: int) -> JobRecord:
        """A new job in `UPLOADING`: its form (media, options) is still arriving."""
        job_id = "job_" + secrets.token_hex(12)
        now = datetime.now(UTC)
        async with self._engine.begin() as connection:
            await connection.execute(
                insert(jobs).values(
                    id=job_id,
                    client=client,
                    organisation=organisation,
                    priority=priority,
                    state=JobState.UPLOADING,
                    options=JobOptions().model_dump(mode="json"),
                    attempts=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            await self._record_event(connection, job_id, JobState.UPLOADING, now, None)
        job = await self.get(job_id)
        assert job is not None
        return job

    async def upload_finished(
        self,
        job_id: str,
        options: JobOptions,
        *,
        media_bytes: int | None = None,
        media_name: str | None = None,
        source_url: str | None = None,
    ) -> bool:
        """The form is in (a stored file, or a URL a worker will fetch): the job joins the queue."""
        async with self._engine.begin() as connection:
            return await self._transition(
                connection,
                job_id,
                JobState.WAITING_TRANSCRIPTION,
                where=[jobs.c.state == JobState.UPLOADING],
                values={
                    "options": options.model_dump(mode="json"),
                    "media_bytes": media_bytes,
                    "media_name": media_name,
                    "source_url": source_url,
                },
            )

    async def discard(self, job_id: str) -> None:
        """Forget a job whose request was refused (bad form, too large): it never existed."""
        async with self._engine.begin() as connection:
            await connection.execute(delete(jobs).where(jobs.c.id == job_id))
            await connection.execute(delete(job_events).where(job_events.c.job_id == job_id))

    async def get(self, job_id: str, *, client: int | None = None) -> JobRecord | None:
        """A job, if it exists (and belongs to `client` when one is given)."""
        query = select(jobs).where(jobs.c.id == job_id)
        if client is not None:
            query = query.where(jobs.c.client == client)
        async with self._engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return None if row is None else _job(row._asdict())

    async def list(
        self, *, client: int, limit: int = 100, before: str | None = None
    ) -> builtins.list[JobRecord]:
        """A client's jobs, newest first; `before` (a job id) pages back."""
        query = select(jobs).where(jobs.c.client == client)
        if before is not None:
            anchor = select(jobs.c.created_at).where(jobs.c.id == before).scalar_subquery()
            query = query.where(jobs.c.created_at < anchor)
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        async with self._engine.connect() as connection:
            return [_job(row._asdict()) for row in await connection.execute(query)]

    async def events(self, job_id: str) -> builtins.list[JobEvent]:
        """Every state the job went through, in order, with its time."""
        query = select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id)
        async with self._engine.connect() as connection:
            rows = await connection.execute(query)
            return [JobEvent(JobState(r.state), r.at, r.detail) for r in rows]

    async def deliveries(self, job_id: str) -> builtins.list[WebhookDelivery]:
        """The job's webhooks, with each delivery attempt."""
        query = (
            select(webhook_deliveries)
            .where(webhook_deliveries.c.job_id == job_id)
            .order_by(webhook_deliveries.c.id)
        )
        async with self._engine.connect() as connection:
            return [_delivery(row._asdict()) for row in await connection.execute(query)]

    async def delete(self, job_id: str, *, client: int) -> bool:
        """Remove a job with its history and webhooks; False if the client has no such job."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                delete(jobs).where(jobs.c.id == job_id, jobs.c.client == client)
            )
            if not result.rowcount:
                return False
            await connection.execute(delete(job_events).where(job_events.c.job_id == job_id))
            await connection.execute(
                delete(webhook_deliveries).where(webhook_deliveries.c.job_id == job_id)
            )
        return True

    async def fail_stale_uploads(self, older_than_s: float) -> int:
        """End in `FAILURE` the uploads that stopped arriving (their gateway died mid-upload).

        The client never got the job's id, but sees it in its list, with the cause.
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        cause = f"the upload did not complete within {older_than_s:.0f} s"
        async with self._engine.connect() as connection:
            stale = (
                await connection.execute(
                    select(jobs.c.id).where(
                        jobs.c.state == JobState.UPLOADING, jobs.c.updated_at < cutoff
                    )
                )
            ).scalars()
            job_ids = list(stale)
        failed = 0
        for job_id in job_ids:
            async with self._engine.begin() as connection:
                failed += await self._transition(
                    connection,
                    job_id,
                    JobState.FAILURE,
                    where=[jobs.c.state == JobState.UPLOADING],
                    values={"failed_step": "upload", "failure_cause": cause},
                    detail=cause,
                )
        return failed

    # -- the worker's side -------------------------------------------------------------

    async def claim(
        self, steps: Iterable[Step], owner: str, lease_s: float, retry: RetryPolicy
    ) -> JobRecord | None:
        """Take the most urgent job waiting for one of `steps`, or one whose lease expired.

        The job moves to the step's running state, leased to `owner`. A job taken
        from a dead worker counts that as a failed attempt: media that kills its
        worker every time must end in `FAILURE`, not loop forever.
        """
        steps = tuple(steps)
        now = datetime.now(UTC)
        waiting = [step.waiting for step in steps]
        running = [step.running for step in steps]
        query = (
            select(jobs)
            .where(
                or_(
                    and_(
                        jobs.c.state.in_(waiting),
                        or_(jobs.c.next_attempt_at.is_(None), jobs.c.next_attempt_at <= now),
                    ),
                    and_(jobs.c.state.in_(running), jobs.c.lease_until < now),
                )
            )
            .order_by(jobs.c.priority.desc(), jobs.c.created_at)
            .limit(1)
        )
        if not self._db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        async with self._db.begin_write() as connection:
            row = (await connection.execute(query)).first()
            if row is None:
                return None
            state = JobState(row.state)
            step = step_of(state)
            assert step is not None
            attempts = row.attempts
            detail = f"worker {owner}"
            if state == step.running:
                attempts += 1
                detail = f"taken up by worker {owner}: the lease of {row.lease_owner} expired"
                if attempts >= retry.max_attempts:
                    cause = f"the worker stopped responding {attempts} times during this step"
                    await self._transition(
                        connection,
                        row.id,
                        JobState.FAILURE,
                        values=_failure(step, cause),
                        detail=cause,
                    )
                    return None
            await self._transition(
                connection,
                row.id,
                step.running,
                values={
                    "lease_owner": owner,
                    "lease_until": now + timedelta(seconds=lease_s),
                    "attempts": attempts,
                    "next_attempt_at": None,
                },
                detail=detail,
            )
        return await self.get(row.id)

    async def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend a lease; False if the worker no longer holds it."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner)
                .values(lease_until=datetime.now(UTC) + timedelta(seconds=lease_s))
            )
            return bool(result.rowcount)

    async def save_progress(self, job_id: str, owner: str, **results: Any) -> bool:
        """Keep part of a step's results (one translated language), so a retake skips it."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner)
                .values(updated_at=datetime.now(UTC), **results)
            )
            return bool(result.rowcount)

    async def complete_step(self, job: JobRecord, step: Step, owner: str, **results: Any) -> bool:
        """Store a step's results and move on to the next step asked for (or `SUCCESS`)."""
        async with self._engine.begin() as connection:
            return await self._transition(
                connection,
                job.id,
                state_after(step, job.options.steps()),
                where=_held(step, owner),
                values={**results, **_NO_LEASE, "attempts": 0, "next_attempt_at": None},
            )

    async def step_failed(
        self, job: JobRecord, step: Step, owner: str, cause: str, *, retry: RetryPolicy | None
    ) -> JobState | None:
        """Retry the step later (back to its waiting state) or, past the limit, fail the job.

        `retry=None` fails at once (the cause will not go away: broken media).
        Returns the new state, or None if the worker no longer held the job.
        """
        failures = job.attempts + 1
        async with self._engine.begin() as connection:
            if retry is not None and failures < retry.max_attempts:
                moved = await self._transition(
                    connection,
                    job.id,
                    step.waiting,
                    where=_held(step, owner),
                    values={
                        **_NO_LEASE,
                        "attempts": failures,
                        "next_attempt_at": datetime.now(UTC) + retry.delay(failures),
                    },
                    detail=f"attempt {failures} failed, will retry: {cause}",
                )
                return step.waiting if moved else None
            moved = await self._transition(
                connection,
                job.id,
                JobState.FAILURE,
                where=_held(step, owner),
                values=_failure(step, cause),
                detail=cause,
            )
            return JobState.FAILURE if moved else None

    async def hand_back(self, job: JobRecord, step: Step, owner: str) -> bool:
        """Return a job unfinished (the worker is stopping); no attempt is counted."""
        async with self._engine.begin() as connection:
            return await self._transition(
                connection,
                job.id,
                step.waiting,
                where=_held(step, owner),
                values=dict(_NO_LEASE),
                detail=f"handed back by worker {owner}, which is stopping",
            )

    # -- webhooks ----------------------------------------------------------------------

    async def claim_webhook(self, lease_s: float) -> tuple[WebhookDelivery, str] | None:
        """A pending delivery that is due, with its client's signing secret.

        Leased, so that one worker sends it at a time.
        """
        now = datetime.now(UTC)
        query = (
            select(webhook_deliveries, oauth_clients.c.webhook_secret)
            .join(jobs, jobs.c.id == webhook_deliveries.c.job_id)
            .join(oauth_clients, oauth_clients.c.id == jobs.c.client)
            .where(
                webhook_deliveries.c.status == "pending",
                webhook_deliveries.c.next_attempt_at <= now,
                or_(
                    webhook_deliveries.c.lease_until.is_(None),
                    webhook_deliveries.c.lease_until < now,
                ),
            )
            .order_by(webhook_deliveries.c.next_attempt_at)
            .limit(1)
        )
        if not self._db.is_sqlite:
            query = query.with_for_update(of=webhook_deliveries, skip_locked=True)
        async with self._db.begin_write() as connection:
            row = (await connection.execute(query)).first()
            if row is None:
                return None
            await connection.execute(
                update(webhook_deliveries)
                .where(webhook_deliveries.c.id == row.id)
                .values(lease_until=now + timedelta(seconds=lease_s))
            )
        values = row._asdict()
        secret = values.pop("webhook_secret")
        return _delivery(values), secret

    async def webhook_attempted(
        self,
        delivery: WebhookDelivery,
        *,
        status_code: int | None,
        error: str | None,
        retry_in: timedelta | None,
    ) -> None:
        """Log one attempt; then delivered (no error), pending again (`retry_in`) or failed."""
        now = datetime.now(UTC)
        entry = {"at": now.isoformat(), "status_code": status_code, "error": error}
        status = "pending" if retry_in is not None else "failed"
        if error is None:
            status = "delivered"
        async with self._engine.begin() as connection:
            await connection.execute(
                update(webhook_deliveries)
                .where(webhook_deliveries.c.id == delivery.id)
                .values(
                    status=status,
                    attempts=delivery.attempts + 1,
                    log=[*delivery.log, entry],
                    lease_until=None,
                    next_attempt_at=now + (retry_in or timedelta(0)),
                )
            )

    # -- internals ---------------------------------------------------------------------

    async def _transition(
        self,
        connection: AsyncConnection,
        job_id: str,
        state: JobState,
        *,
        where: Iterable[Any] = (),
        values: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> bool:
        """Move a job to `state` if `where` holds; record the event and queue its webhook."""
        now = datetime.now(UTC)
        result = await connection.execute(
            update(jobs)
            .where(jobs.c.id == job_id, *where)
            .values(state=state, updated_at=now, **(values or {}))
        )
        if not result.rowcount:
            return False
        event_id = await self._record_event(connection, job_id, state, now, detail)
        await self._queue_webhook(connection, job_id, state, now, event_id)
        return True

    async def _record_event(
        self,
        connection: AsyncConnection,
        job_id: str,
        state: JobState,
        at: datetime,
        detail: str | None,
    ) -> int:
        result = await connection.execute(
            insert(job_events)
            .values(job_id=job_id, state=state, at=at, detail=detail)
            .returning(job_events.c.id)
        )
        return int(result.scalar_one())

    async def _queue_webhook(
        self, connection: AsyncConnection, job_id: str, state: JobState, at: datetime, event: int
    ) -> None:
        row = (
            await connection.execute(
                select(jobs.c.options, jobs.c.failed_step, jobs.c.failure_cause).where(
                    jobs.c.id == job_id
                )
            )
        ).one()
        options = JobOptions.model_validate(row.options)
        every_state = options.webhook_every_state
        if every_state is None:
            every_state = self._webhook_every_state
        if options.callback_url is None or not (state.terminal or every_state):
            return
        payload = {
            "id": job_id,
            "object": "transcription.job.event",
            "state": str(state),
            "at": at.isoformat(),
            "failed_step": row.failed_step,
            "failure_cause": row.failure_cause,
        }
        await connection.execute(
            insert(webhook_deliveries).values(
                job_id=job_id,
                event=state,
                url=str(options.callback_url),
                payload=payload,
                idempotency_key=f"{job_id}-{event}",
                status="pending",
                attempts=0,
                next_attempt_at=at,
                log=[],
                created_at=at,
            )
        )


_NO_LEASE = {"lease_owner": None, "lease_until": None}


def _held(step: Step, owner: str) -> list[Any]:
    return [jobs.c.state == step.running, jobs.c.lease_owner == owner]


def _failure(step: Step, cause: str) -> dict[str, Any]:
    return {**_NO_LEASE, "failed_step": str(step), "failure_cause": cause}


def _job(values: dict[str, Any]) -> JobRecord:
    values["state"] = JobState(values["state"])
    values["options"] = JobOptions.model_validate(values["options"])
    values["translations"] = values["translations"] or {}
    values["enrichment"] = values["enrichment"] or {}
    values.pop("next_attempt_at")
    return JobRecord(**values)


def _delivery(values: dict[str, Any]) -> WebhookDelivery:
    for unused in ("next_attempt_at", "lease_until", "created_at"):
        values.pop(unused)
    return WebhookDelivery(**values)
