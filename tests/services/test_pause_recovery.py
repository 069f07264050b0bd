"""Pause in the lifecycle services: the worker's stop ends as asked (paused or cancelled) under its lease,
an abandoned pause finishes as paused, a pausing job holds its slot, and pauses never use up MAX_ATTEMPTS."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete, update

from app.core.config import Settings
from app.core.db import session_scope
from app.models import Job, JobEvent, JobStatus, utcnow
from app.services import lifecycle
from app.services.scheduler import count_active, finish_abandoned_pauses, requeue_stale


@pytest.fixture()
def db(clean_database: str) -> Iterator[str]:
    with session_scope() as session:
        session.execute(delete(JobEvent))
        session.execute(delete(Job))
    yield clean_database


def _claimed() -> lifecycle.Claim:
    with session_scope() as session:
        job = Job(
            spec={"teacher_model_name": "digits-cnn"}, teacher_model_name="digits-cnn", status="dispatched"
        )
        session.add(job)
        session.flush()
        job_id = job.id
    with session_scope() as session:
        claim = lifecycle.claim_job(session, job_id=job_id, worker="w/1")
    assert claim is not None
    return claim


def _set(job_id: str, **values: object) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def _job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def test_a_stopped_worker_ends_the_job_as_asked_and_only_under_its_lease(db: str) -> None:
    pausing, cancelling, stolen = _claimed(), _claimed(), _claimed()
    _set(pausing.job_id, status="pausing")
    _set(cancelling.job_id, status="cancelling")
    _set(stolen.job_id, status="pausing", lease_token="someone-else")
    with session_scope() as session:
        assert count_active(session) == 3, "pausing and cancelling jobs hold their slots"
        assert lifecycle.read_lease(
            session, job_id=pausing.job_id, lease_token=pausing.lease_token
        ).should_stop
        ends = [
            lifecycle.end_stopped_job(session, job_id=c.job_id, lease_token=c.lease_token, attempt=c.attempt)
            for c in (pausing, cancelling, stolen)
        ]
    assert ends == ["paused", "cancelled", None]
    paused = _job(pausing.job_id)
    assert paused.lease_token is None and paused.worker is None and paused.pause_count == 1
    assert paused.finished_at is None and _job(cancelling.job_id).finished_at is not None
    assert _job(stolen.job_id).status == "pausing"
    with session_scope() as session:
        assert count_active(session) == 1
        # The old lease can write nothing more to the paused job.
        assert not lifecycle.heartbeat(session, job_id=pausing.job_id, lease_token=pausing.lease_token)


def test_an_abandoned_pause_finishes_as_paused(db: str) -> None:
    claim = _claimed()
    _set(claim.job_id, status="pausing", heartbeat_at=utcnow() - timedelta(seconds=60))
    fresh = _claimed()
    _set(fresh.job_id, status="pausing")
    with session_scope() as session:
        assert finish_abandoned_pauses(session, Settings(heartbeat_timeout=10.0)) == [claim.job_id]
    job = _job(claim.job_id)
    assert job.status == JobStatus.paused and job.pause_count == 1 and job.lease_token is None
    assert _job(fresh.job_id).status == "pausing"


def test_pauses_do_not_count_against_max_attempts(db: str) -> None:
    claim = _claimed()
    stale = utcnow() - timedelta(seconds=60)
    # Third claim after two pauses: 3 attempts, but only one of them can have failed.
    _set(claim.job_id, attempt=3, pause_count=2, heartbeat_at=stale)
    with session_scope() as session:
        requeued, failed = requeue_stale(session, Settings(heartbeat_timeout=10.0, max_attempts=3))
    assert (requeued, failed) == ([claim.job_id], [])
    _set(claim.job_id, status="running", attempt=5, pause_count=2, heartbeat_at=stale)
    with session_scope() as session:
        requeued, failed = requeue_stale(session, Settings(heartbeat_timeout=10.0, max_attempts=3))
    assert (requeued, failed) == ([], [claim.job_id])
