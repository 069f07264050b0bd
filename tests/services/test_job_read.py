"""`jobs.read` (one Core SELECT, the API's polled read) answers exactly as the ORM view, tenant-scoped."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.core.db import session_scope
from app.errors import NotFound
from app.models import Job, JobStatus, utcnow
from app.services import jobs as jobs_service
from app.services import tenants as tenants_service


def test_read_matches_the_orm_view_and_hides_other_tenants_jobs(clean_database: str) -> None:
    now = utcnow()
    with session_scope() as session:
        tenant = tenants_service.get_or_create(session, name="reader")
        other = tenants_service.get_or_create(session, name="other-reader")
        job = Job(
            spec={"teacher_model_name": "digits-cnn", "target_compression": 0.25},
            teacher_model_name="digits-cnn",
            status=JobStatus.failed,
            attempt=2,
            progress=37.5,
            phase="distill",
            created_at=now - timedelta(minutes=3),
            updated_at=now,
            queued_at=now - timedelta(minutes=2),
            started_at=now - timedelta(minutes=1),
            finished_at=now,
            metrics={"epoch": 3, "total_loss": 0.5},
            results={"teacher_accuracy": 0.98},
            error={"code": "nan_loss", "message": "the loss became NaN", "epoch": 3},
            tenant_id=tenant.id,
        )
        session.add(job)
        session.flush()
        job_id, tenant_id, other_id = job.id, tenant.id, other.id
    with session_scope() as session:
        via_orm = jobs_service.to_read(jobs_service.get_or_raise(session, job_id=job_id, tenant_id=tenant_id))
    with session_scope() as session:
        via_core = jobs_service.read(session, job_id=job_id, tenant_id=tenant_id)
        assert via_core == via_orm
        assert via_core.error is not None and via_core.error.code == "nan_loss"
        assert via_core.model_dump()["error"]["epoch"] == 3
        with pytest.raises(NotFound):
            jobs_service.read(session, job_id=job_id, tenant_id=other_id)
        with pytest.raises(NotFound):
            jobs_service.read(session, job_id="no-such-job", tenant_id=tenant_id)
