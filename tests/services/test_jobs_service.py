"""Job state changes are compare-and-set: a stale view never overwrites what the scheduler or a worker did."""

from __future__ import annotations

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.db import get_sessionmaker, session_scope
from app.errors import Conflict
from app.models import Job, JobStatus
from app.schemas.jobs import JobCreate
from app.services import jobs as jobs_service
from app.services.teachers import seed_default_teachers


def _new_job() -> str:
    with session_scope() as session:
        seed_default_teachers(session)
        job = jobs_service.create(
            session,
            request=JobCreate(teacher_model_name="digits-cnn"),
            settings=get_settings(),
            tenant_id=None,
        )
        return job.id


def _stale_view(job_id: str, actual: JobStatus) -> tuple[Session, Job]:
    """A session holding the job as it was, after another process moved it to `actual`."""
    session = get_sessionmaker()()
    job = jobs_service.get_or_raise(session, job_id=job_id, tenant_id=None)
    session.commit()  # ends the transaction; the loaded attributes stay (expire_on_commit=False)
    with session_scope() as other:
        other.execute(update(Job).where(Job.id == job_id).values(status=actual))
    return session, job


def test_cancel_from_a_stale_view_follows_the_real_state(clean_database: str) -> None:
    job_id = _new_job()
    session, job = _stale_view(job_id, JobStatus.running)
    assert job.status == JobStatus.pending  # what this session believes
    cancelled = jobs_service.cancel(session, job_id=job_id, tenant_id=None)
    assert cancelled.status == JobStatus.cancelling  # not 'cancelled': a worker holds the job
    assert cancelled.finished_at is None
    session.close()


def test_start_from_a_stale_view_is_a_conflict(clean_database: str) -> None:
    job_id = _new_job()
    session, _ = _stale_view(job_id, JobStatus.cancelled)
    with pytest.raises(Conflict):
        jobs_service.start(session, job_id=job_id, settings=get_settings(), tenant_id=None)
    session.close()
    with session_scope() as check:
        assert check.get(Job, job_id).status == JobStatus.cancelled  # type: ignore[union-attr]


def test_delete_from_a_stale_view_keeps_a_revived_job(clean_database: str) -> None:
    job_id = _new_job()
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.failed))
    session, _ = _stale_view(job_id, JobStatus.queued)  # e.g. re-queued meanwhile
    with pytest.raises(Conflict):
        jobs_service.delete_job(session, job_id=job_id, settings=get_settings(), tenant_id=None)
    session.close()
    with session_scope() as check:
        assert check.get(Job, job_id) is not None
