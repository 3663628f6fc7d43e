"""The job queue in the database: states, leases, retries, history, webhooks; both backends."""

from __future__ import annotations

import asyncio

from sqlalchemy import update

from aiguillage.jobs.options import JobOptions
from aiguillage.jobs.states import JobState, Step
from aiguillage.store.database import Database
from aiguillage.store.jobs import JobRecord, JobRepository, RetryPolicy
from aiguillage.store.oauth import OAuthRepository
from aiguillage.store.tables import jobs

RETRY = RetryPolicy(max_attempts=3, backoff_s=0)


async def new_job(
    repo: JobRepository, options: JobOptions | None = None, client: int = 1
) -> JobRecord:
    job = await repo.create(client=client, organisation="org", priority=0)
    assert await repo.upload_finished(job.id, options or JobOptions(), media_bytes=1234)
    return job


async def states(repo: JobRepository, job_id: str) -> list[JobState]:
    return [event.state for event in await repo.events(job_id)]


async def test_a_job_goes_through_the_steps_it_asked_for_only(db: Database) -> None:
    repo = JobRepository(db)
    job = await new_job(repo, JobOptions(enrichment=["title"]))
    claimed = await repo.claim([Step.TRANSCRIBE], "w1", 30, RETRY)
    assert claimed is not None and claimed.id == job.id and claimed.state == JobState.TRANSCRIBING
    assert await repo.claim([Step.TRANSCRIBE], "w2", 30, RETRY) is None  # leased
    assert await repo.complete_step(claimed, Step.TRANSCRIBE, "w1", transcript={"text": "hi"})
    claimed = await repo.claim(list(Step), "w1", 30, RETRY)
    assert claimed is not None and claimed.state == JobState.AI_ENRICHING
    assert claimed.transcript == {"text": "hi"}
    assert await repo.complete_step(claimed, Step.ENRICH, "w1", enrichment={"title": "T"})
    assert await states(repo, job.id) == [
        JobState.UPLOADING,
        JobState.WAITING_TRANSCRIPTION,
        JobState.TRANSCRIBING,
        JobState.WAITING_AI_ENRICHMENT,
        JobState.AI_ENRICHING,
        JobState.SUCCESS,
    ]
    done = await repo.get(job.id)
    assert done is not None and done.lease_owner is None and done.enrichment == {"title": "T"}


async def test_a_worker_that_lost_its_lease_records_nothing(db: Database) -> None:
    repo = JobRepository(db)
    job = await new_job(repo)
    first = await repo.claim([Step.TRANSCRIBE], "w1", 30, RETRY)
    assert first is not None
    await expire_lease(db, job.id)
    second = await repo.claim([Step.TRANSCRIBE], "w2", 30, RETRY)
    assert second is not None and second.attempts == 1
    assert not await repo.complete_step(first, Step.TRANSCRIBE, "w1", transcript={})
    assert not await repo.renew(job.id, "w1", 30)
    assert await repo.complete_step(second, Step.TRANSCRIBE, "w2", transcript={})
    assert (await states(repo, job.id)).count(JobState.SUCCESS) == 1


async def test_failures_are_retried_then_end_in_failure_with_the_cause(db: Database) -> None:
    repo = JobRepository(db)
    job = await new_job(repo)
    for attempt in range(3):
        claimed = await repo.claim([Step.TRANSCRIBE], "w", 30, RETRY)
        assert claimed is not None and claimed.attempts == attempt
        await repo.step_failed(claimed, Step.TRANSCRIBE, "w", f"boom {attempt}", retry=RETRY)
    failed = await repo.get(job.id)
    assert failed is not None and failed.state == JobState.FAILURE
    assert (failed.failed_step, failed.failure_cause) == ("transcribe", "boom 2")
    assert await repo.claim([Step.TRANSCRIBE], "w", 30, RETRY) is None


async def test_backoff_delays_the_next_claim(db: Database) -> None:
    repo = JobRepository(db)
    await new_job(repo)
    slow = RetryPolicy(max_attempts=3, backoff_s=60)
    claimed = await repo.claim([Step.TRANSCRIBE], "w", 30, slow)
    assert claimed is not None
    assert await repo.step_failed(claimed, Step.TRANSCRIBE, "w", "x", retry=slow) == (
        JobState.WAITING_TRANSCRIPTION
    )
    assert await repo.claim([Step.TRANSCRIBE], "w", 30, slow) is None


async def test_concurrent_claims_never_share_a_job(db: Database) -> None:
    repo = JobRepository(db)
    created = {(await new_job(repo)).id for _ in range(6)}
    claims = await asyncio.gather(
        *(repo.claim([Step.TRANSCRIBE], f"w{n}", 30, RETRY) for n in range(10))
    )
    taken = [job.id for job in claims if job is not None]
    assert sorted(taken) == sorted(created)


async def test_terminal_states_queue_a_webhook_with_an_idempotency_key(db: Database) -> None:
    repo = JobRepository(db)
    secrets, client = await OAuthRepository(db).create_client(name="pod", organisation="org")
    options = JobOptions(callback_url="http://127.0.0.1:9/hook")  # type: ignore[arg-type]
    job = await new_job(repo, options, client=client.id)
    claimed = await repo.claim([Step.TRANSCRIBE], "w", 30, RETRY)
    assert claimed is not None
    await repo.step_failed(claimed, Step.TRANSCRIBE, "w", "broken media", retry=None)
    [delivery] = await repo.deliveries(job.id)
    assert delivery.payload["state"] == "FAILURE"
    assert delivery.payload["failure_cause"] == "broken media"
    claimed_hook = await repo.claim_webhook(30)
    assert claimed_hook is not None
    leased, secret = claimed_hook
    assert leased.idempotency_key == delivery.idempotency_key
    assert secret == secrets.webhook_secret
    assert await repo.claim_webhook(30) is None
    await repo.webhook_attempted(leased, status_code=500, error="HTTP 500", retry_in=None)
    [logged] = await repo.deliveries(job.id)
    assert logged.status == "failed" and logged.log[0]["status_code"] == 500


async def test_a_job_may_ask_for_a_webhook_on_every_state(db: Database) -> None:
    repo = JobRepository(db)
    _, client = await OAuthRepository(db).create_client(name="pod", organisation="org")
    options = JobOptions(callback_url="http://127.0.0.1:9/h", webhook_every_state=True)  # type: ignore[arg-type]
    job = await new_job(repo, options, client=client.id)
    claimed = await repo.claim([Step.TRANSCRIBE], "w", 30, RETRY)
    assert claimed is not None
    await repo.complete_step(claimed, Step.TRANSCRIBE, "w", transcript={})
    events = [delivery.event for delivery in await repo.deliveries(job.id)]
    assert events == ["WAITING_TRANSCRIPTION", "TRANSCRIBING", "SUCCESS"]


async def test_a_client_sees_and_deletes_only_its_own_jobs(db: Database) -> None:
    repo = JobRepository(db)
    job = await new_job(repo)
    assert await repo.get(job.id, client=2) is None
    assert await repo.list(client=2) == []
    assert not await repo.delete(job.id, client=2)
    assert [j.id for j in await repo.list(client=1)] == [job.id]
    assert await repo.delete(job.id, client=1)
    assert await repo.get(job.id) is None and await repo.events(job.id) == []


async def test_a_refused_upload_leaves_no_trace(db: Database) -> None:
    repo = JobRepository(db)
    job = await repo.create(client=1, organisation="org", priority=0)
    await repo.discard(job.id)
    assert await repo.get(job.id) is None and await repo.events(job.id) == []


async def test_uploads_that_never_finish_end_in_failure(db: Database) -> None:
    repo = JobRepository(db)
    stuck = await repo.create(client=1, organisation="org", priority=0)
    assert await repo.fail_stale_uploads(older_than_s=3600) == 0  # still recent
    assert await repo.fail_stale_uploads(older_than_s=-1) == 1
    failed = await repo.get(stuck.id)
    assert failed is not None and failed.state == JobState.FAILURE
    assert failed.failed_step == "upload" and "did not complete" in (failed.failure_cause or "")


async def expire_lease(db: Database, job_id: str) -> None:
    from datetime import UTC, datetime, timedelta

    async with db.engine.begin() as connection:
        await connection.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(lease_until=datetime.now(UTC) - timedelta(seconds=1))
        )
