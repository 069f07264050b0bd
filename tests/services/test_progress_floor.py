"""Stored progress never goes down: within an attempt and when a re-queued job's next attempt starts over."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete

from app.core.config import Settings
from app.core.db import session_scope
from app.models import Job, JobEvent, JobStatus, utcnow
from app.services import lifecycle
from app.services.scheduler import admit_queued_jobs, requeue_stale


@pytest.fixture()
def job_id(clean_database: str) -> Iterator[str]:
    with session_scope() as session:
        session.execute(delete(JobEvent))
        session.execute(delete(Job))
        job = Job(
            spec={"teacher_model_name": "digits-cnn"},
            teacher_model_name="digits-cnn",
            status=JobStatus.queued,
            queued_at=utcnow(),
        )
        session.add(job)
        session.flush()
        new_id = job.id
    yield new_id


def _write(job_id: str, token: str, progress: float) -> None:
    with session_scope() as session:
        assert lifecycle.update_progress(
            session, job_id=job_id, lease_token=token, progress=progress, phase="distill", eta_seconds=None
        )


def _progress(job_id: str) -> float:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return float(job.progress)


def test_progress_is_a_floor_within_and_across_attempts(job_id: str) -> None:
    settings = Settings(max_concurrent_jobs=1, heartbeat_timeout=5.0)  # type: ignore[call-arg]
    with session_scope() as session:
        assert admit_queued_jobs(session, settings) == [job_id]
    with session_scope() as session:
        first = lifecycle.claim_job(session, job_id=job_id, worker="w1")
    assert first is not None
    _write(job_id, first.lease_token, 40.0)
    _write(job_id, first.lease_token, 35.0)  # a late, lower report
    assert _progress(job_id) == 40.0

    # The worker dies; the job is re-queued and claimed again: attempt 2 reports from its own start.
    with session_scope() as session:
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=60)  # type: ignore[union-attr]
    with session_scope() as session:
        requeue_stale(session, settings)
    with session_scope() as session:
        assert admit_queued_jobs(session, settings) == [job_id]
    with session_scope() as session:
        second = lifecycle.claim_job(session, job_id=job_id, worker="w2")
    assert second is not None and second.attempt == 2
    _write(job_id, second.lease_token, 2.0)
    assert _progress(job_id) == 40.0
    _write(job_id, second.lease_token, 55.0)
    assert _progress(job_id) == 55.0
