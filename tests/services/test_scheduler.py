"""Scheduler and lifecycle services on the real test database: admission, claims, leases, recovery."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete, func, insert, select

from app.core.config import Settings
from app.core.db import session_scope
from app.models import Job, JobEvent, JobStatus, utcnow
from app.services import lifecycle
from app.services.scheduler import (
    admit_queued_jobs,
    count_active,
    finish_abandoned_cancels,
    redispatch_unclaimed,
    requeue_stale,
)

SPEC = {"teacher_model_name": "digits-cnn", "target_compression": 0.2}


@pytest.fixture()
def db(clean_database: str) -> Iterator[str]:
    """An empty jobs table before and after the test."""
    with session_scope() as session:
        session.execute(delete(JobEvent))
        session.execute(delete(Job))
    yield clean_database


def _settings(**overrides: object) -> Settings:
    base: dict[str, object] = {"max_concurrent_jobs": 2, "dispatch_timeout": 10.0, "heartbeat_timeout": 10.0}
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


def _make_jobs(statuses_and_age: list[tuple[str, float]]) -> list[str]:
    """Insert jobs; `age` seconds before now is their queued_at (older = earlier in line)."""
    now = utcnow()
    ids = []
    with session_scope() as session:
        for status, age in statuses_and_age:
            job = Job(
                spec=SPEC,
                teacher_model_name="digits-cnn",
                status=status,
                queued_at=now - timedelta(seconds=age),
            )
            session.add(job)
            session.flush()
            ids.append(job.id)
    return ids


def _job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _admit(settings: Settings) -> list[str]:
    with session_scope() as session:
        return admit_queued_jobs(session, settings)


def _claim(job_id: str, worker: str = "w1") -> lifecycle.Claim | None:
    with session_scope() as session:
        return lifecycle.claim_job(session, job_id=job_id, worker=worker)


def test_admission_follows_queued_at_and_holds_the_limit(db: str) -> None:
    settings = _settings()
    # Inserted out of order: the oldest queued_at must go first.
    newest, oldest, middle, pending = _make_jobs(
        [(JobStatus.queued, 1), (JobStatus.queued, 30), (JobStatus.queued, 20), (JobStatus.pending, 99)]
    )
    assert _admit(settings) == [oldest, middle]
    assert _admit(settings) == []  # two active: the limit is reached
    assert _job(newest).status == JobStatus.queued
    assert _job(pending).status == JobStatus.pending
    assert _job(oldest).dispatched_at is not None

    with session_scope() as session:  # one finishes: a slot frees up
        session.get(Job, oldest).status = JobStatus.completed  # type: ignore[union-attr]
    assert _admit(settings) == [newest]
    with session_scope() as session:
        assert count_active(session) == 2
        states = session.scalars(
            select(JobEvent.data).where(JobEvent.job_id == newest, JobEvent.kind == "state")
        ).all()
    assert states == [{"from": "queued", "to": "dispatched"}]


def test_cancelling_jobs_still_hold_their_slot(db: str) -> None:
    _make_jobs([(JobStatus.cancelling, 50), (JobStatus.running, 40), (JobStatus.queued, 1)])
    assert _admit(_settings()) == []


def test_concurrent_admitters_never_exceed_the_limit(db: str) -> None:
    """Many processes admitting at once (threads with their own connections) admit exactly the free slots."""
    limit = 3
    settings = _settings(max_concurrent_jobs=limit)
    _make_jobs([(JobStatus.queued, 100 - i) for i in range(24)])
    admitters = 8
    for _round in range(3):
        barrier = threading.Barrier(admitters)
        admitted: list[list[str]] = []
        errors: list[BaseException] = []

        def admit_once(
            barrier: threading.Barrier = barrier,
            admitted: list[list[str]] = admitted,
            errors: list[BaseException] = errors,
        ) -> None:
            try:
                barrier.wait(timeout=10)
                admitted.append(_admit(settings))
            except BaseException as exc:  # reported by the main thread's assertion
                errors.append(exc)

        threads = [threading.Thread(target=admit_once) for _ in range(admitters)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors
        flat = [job_id for ids in admitted for job_id in ids]
        assert len(flat) == len(set(flat)) == limit
        with session_scope() as session:
            assert count_active(session) == limit
            # Finish them all so the next round races for fresh slots.
            for job in session.scalars(select(Job).where(Job.status == JobStatus.dispatched)):
                job.status = JobStatus.completed


def test_claim_is_a_compare_and_set_with_a_lease(db: str) -> None:
    (job_id,) = _make_jobs([(JobStatus.queued, 1)])
    assert _claim(job_id) is None  # not dispatched yet
    assert _admit(_settings()) == [job_id]
    first = _claim(job_id, "w1")
    assert first is not None and first.attempt == 1
    assert _claim(job_id, "w2") is None  # a second claimant is refused
    job = _job(job_id)
    assert (job.status, job.attempt, job.lease_token, job.worker) == ("running", 1, first.lease_token, "w1")
    assert job.started_at is not None and job.heartbeat_at is not None
    with session_scope() as session:
        claims = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "claim")
        ).all()
        assert [(c.data["attempt"], c.data["lease_token"], c.data["worker"]) for c in claims] == [
            (1, first.lease_token, "w1")
        ]
        # Writes with another token are refused; with the lease they land.
        assert not lifecycle.heartbeat(session, job_id=job_id, lease_token="not-the-lease")
        assert not lifecycle.fail_job(
            session, job_id=job_id, lease_token="not-the-lease", attempt=1, code="x", message="y"
        )
        assert lifecycle.update_progress(
            session,
            job_id=job_id,
            lease_token=first.lease_token,
            progress=42.0,
            phase="distill",
            eta_seconds=3,
        )
        assert (
            lifecycle.read_lease(session, job_id=job_id, lease_token=first.lease_token).should_stop is False
        )
    assert _job(job_id).progress == 42.0


def test_stale_running_job_is_requeued_first_and_loses_its_lease(db: str) -> None:
    settings = _settings(heartbeat_timeout=5.0)
    stale_id, newer_id = _make_jobs([(JobStatus.queued, 60), (JobStatus.queued, 30)])
    assert _admit(_settings(max_concurrent_jobs=1)) == [stale_id]
    claim = _claim(stale_id)
    assert claim is not None
    queued_at = _job(stale_id).queued_at
    with session_scope() as session:  # the worker died 30 s ago
        session.get(Job, stale_id).heartbeat_at = utcnow() - timedelta(seconds=30)  # type: ignore[union-attr]
    with session_scope() as session:
        assert requeue_stale(session, settings) == ([stale_id], [])
    job = _job(stale_id)
    assert (job.status, job.lease_token, job.worker, job.queued_at) == ("queued", None, None, queued_at)
    with session_scope() as session:  # the old worker, if it still lives, must stop and cannot write
        state = lifecycle.read_lease(session, job_id=stale_id, lease_token=claim.lease_token)
        assert state.should_stop and not state.held
        assert not lifecycle.complete_job(
            session, job_id=stale_id, lease_token=claim.lease_token, attempt=1, results={}, artifacts=[]
        )
    # Re-queued first (its original queued_at), then claimed again as attempt 2.
    assert _admit(_settings(max_concurrent_jobs=1)) == [stale_id]
    second = _claim(stale_id, "w2")
    assert second is not None and second.attempt == 2 and second.lease_token != claim.lease_token
    assert _job(newer_id).status == JobStatus.queued


def test_stale_job_fails_after_max_attempts(db: str) -> None:
    settings = _settings(heartbeat_timeout=5.0, max_attempts=2)
    (job_id,) = _make_jobs([(JobStatus.queued, 10)])
    for attempt in (1, 2):
        assert _admit(settings) == [job_id]
        claim = _claim(job_id)
        assert claim is not None and claim.attempt == attempt
        with session_scope() as session:
            session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=30)  # type: ignore[union-attr]
        with session_scope() as session:
            requeued, failed = requeue_stale(session, settings)
        assert (requeued, failed) == (([job_id], []) if attempt == 1 else ([], [job_id]))
    job = _job(job_id)
    assert job.status == JobStatus.failed and job.finished_at is not None
    assert job.error is not None and job.error["code"] == "max_attempts"
    assert "attempt 2 of 2" in job.error["message"]


def test_unclaimed_dispatch_is_resent_with_backoff(db: str) -> None:
    settings = _settings(dispatch_timeout=5.0)
    (job_id,) = _make_jobs([(JobStatus.queued, 10)])
    assert _admit(settings) == [job_id]
    with session_scope() as session:
        assert redispatch_unclaimed(session, settings) == []  # still within DISPATCH_TIMEOUT
        session.get(Job, job_id).dispatched_at = utcnow() - timedelta(seconds=6)  # type: ignore[union-attr]
    with session_scope() as session:
        assert redispatch_unclaimed(session, settings) == [job_id]
    assert (utcnow() - _job(job_id).dispatched_at).total_seconds() < 5  # type: ignore[operator]
    with session_scope() as session:  # the second re-send waits twice as long
        session.get(Job, job_id).dispatched_at = utcnow() - timedelta(seconds=6)  # type: ignore[union-attr]
    with session_scope() as session:
        assert redispatch_unclaimed(session, settings) == []
        session.get(Job, job_id).dispatched_at = utcnow() - timedelta(seconds=11)  # type: ignore[union-attr]
    with session_scope() as session:
        assert redispatch_unclaimed(session, settings) == [job_id]
        kinds = session.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id)).all()
    assert kinds.count("dispatch") == 2


def test_abandoned_cancels_are_finished_by_the_scheduler(db: str) -> None:
    settings = _settings(heartbeat_timeout=5.0)
    unclaimed, live, dead = _make_jobs(
        [(JobStatus.queued, 30), (JobStatus.queued, 20), (JobStatus.queued, 10)]
    )
    assert _admit(_settings(max_concurrent_jobs=3)) == [unclaimed, live, dead]
    assert _claim(live) is not None and _claim(dead) is not None
    with session_scope() as session:
        for job_id in (unclaimed, live, dead):
            session.get(Job, job_id).status = JobStatus.cancelling  # type: ignore[union-attr]
        session.get(Job, dead).heartbeat_at = utcnow() - timedelta(seconds=30)  # type: ignore[union-attr]
    with session_scope() as session:
        assert sorted(finish_abandoned_cancels(session, settings)) == sorted([unclaimed, dead])
    assert [_job(j).status for j in (unclaimed, live, dead)] == ["cancelled", "cancelling", "cancelled"]


def _make_tenant_jobs(
    tenant_id: str, count: int, *, oldest_age: float, status: str = JobStatus.queued
) -> None:
    """`count` jobs of `tenant_id`, queued_at from `oldest_age` seconds ago, one ms apart (bulk insert)."""
    now = utcnow()
    rows = [
        {
            "id": str(uuid.uuid4()),
            "spec": SPEC,
            "teacher_model_name": "digits-cnn",
            "status": status,
            "attempt": 0,
            "progress": 0.0,
            "created_at": now,
            "updated_at": now,
            "queued_at": now - timedelta(seconds=oldest_age) + timedelta(milliseconds=i),
            "tenant_id": tenant_id,
        }
        for i in range(count)
    ]
    with session_scope() as session:
        session.execute(insert(Job), rows)


def test_a_full_tenants_long_queue_does_not_block_another_tenants_job(db: str) -> None:
    """Many queued jobs of a tenant at its limit, all ahead in line: the next tenant's job is still admitted.

    Admission reads the queue in pages as long as the free slots, so this needs the full tenant left out of
    the query (a first page of its jobs alone would otherwise end the tick with nothing admitted).
    """
    settings = _settings(max_concurrent_jobs=4, tenant_max_running_jobs=1)
    _make_tenant_jobs("tenant-busy", 1, oldest_age=1000, status=JobStatus.running)
    _make_tenant_jobs("tenant-busy", 500, oldest_age=900)
    (behind,) = _make_jobs([(JobStatus.queued, 1)])  # unowned, last in line
    with session_scope() as session:
        session.get(Job, behind).tenant_id = "tenant-other"  # type: ignore[union-attr]
    assert _admit(settings) == [behind]
    assert _admit(settings) == []  # busy is still at its limit; other has nothing left
    with session_scope() as session:
        assert session.scalar(select(func.count()).where(Job.status == JobStatus.queued)) == 500


def test_a_tenant_that_fills_up_mid_page_lets_the_next_jobs_in_line_pass(db: str) -> None:
    settings = _settings(max_concurrent_jobs=3, tenant_max_running_jobs=1)
    _make_tenant_jobs("tenant-a", 3, oldest_age=300)
    _make_tenant_jobs("tenant-b", 3, oldest_age=200)
    _make_tenant_jobs("tenant-c", 3, oldest_age=100)
    with session_scope() as session:
        admitted = admit_queued_jobs(session, settings)
        owners = [session.get(Job, job_id).tenant_id for job_id in admitted]  # type: ignore[union-attr]
    assert owners == ["tenant-a", "tenant-b", "tenant-c"]


def test_admission_locks_only_the_rows_it_admits(db: str, migrated_database: str) -> None:
    """Other writers (a cancel, a second admitter) are not kept waiting on the rest of the queue."""
    if not migrated_database.startswith("postgresql"):
        pytest.skip("row locks: PostgreSQL only (SQLite serialises every writer with BEGIN IMMEDIATE)")
    _make_tenant_jobs("tenant-lock", 200, oldest_age=500)
    with session_scope() as admitting:
        admitted = admit_queued_jobs(admitting, _settings(max_concurrent_jobs=2))
        assert len(admitted) == 2
        with session_scope() as other:  # while the admitting transaction is still open
            unlocked = other.scalars(
                select(Job.id).where(Job.status == JobStatus.queued).with_for_update(skip_locked=True)
            ).all()
    assert len(unlocked) == 198
