"""`jobs.read` (one Core SELECT, the API's polled read) and `jobs.read_async` (the same SELECT through the
async read pool) answer exactly as the ORM view, tenant-scoped."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import text

from app.core.db import AsyncDb, make_async_db, session_scope
from app.errors import NotFound
from app.models import Job, JobStatus, utcnow
from app.services import jobs as jobs_service
from app.services import tenants as tenants_service


def _stored_job() -> tuple[str, str, str]:
    """A failed job with every field set, its tenant and another tenant: (job_id, tenant_id, other_id)."""
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
        return job.id, tenant.id, other.id


def test_read_matches_the_orm_view_and_hides_other_tenants_jobs(clean_database: str) -> None:
    job_id, tenant_id, other_id = _stored_job()
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


@pytest.fixture()
def async_db(clean_database: str) -> AsyncDb:
    reads = make_async_db(clean_database)
    if reads is None:
        pytest.skip("the async read pool is PostgreSQL's (SQLite reads through the sync engine)")
    return reads


def test_read_async_matches_the_orm_view_and_hides_other_tenants_jobs(async_db: AsyncDb) -> None:
    job_id, tenant_id, other_id = _stored_job()
    with session_scope() as session:
        via_orm = jobs_service.to_read(jobs_service.get_or_raise(session, job_id=job_id, tenant_id=tenant_id))

    async def reads() -> None:
        await async_db.open()
        try:
            via_pool = await jobs_service.read_async(async_db, job_id=job_id, tenant_id=tenant_id)
            assert via_pool == via_orm
            # Byte for byte the same response (time zones included: the pool's sessions read UTC).
            assert via_pool.model_dump_json() == via_orm.model_dump_json()
            with pytest.raises(NotFound):
                await jobs_service.read_async(async_db, job_id=job_id, tenant_id=other_id)
            with pytest.raises(NotFound):
                await jobs_service.read_async(async_db, job_id="no-such-job", tenant_id=tenant_id)
        finally:
            await async_db.close()

    asyncio.run(reads())


def test_read_async_survives_a_dropped_connection(async_db: AsyncDb) -> None:
    """A server-side disconnect (restart, idle timeout) costs one retry on another connection, not a 503."""
    job_id, tenant_id, _ = _stored_job()

    async def reads() -> None:
        await async_db.open()
        try:
            await jobs_service.read_async(async_db, job_id=job_id, tenant_id=tenant_id)
            with session_scope() as session:  # end every backend of the pool ("api-reads" connections)
                dropped = session.scalars(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND backend_type = 'client backend' AND query LIKE '%FROM jobs%WHERE jobs.id%'"
                    )
                ).all()
            assert dropped and all(dropped)
            read = await jobs_service.read_async(async_db, job_id=job_id, tenant_id=tenant_id)
            assert read.job_id == job_id
        finally:
            await async_db.close()

    asyncio.run(reads())
