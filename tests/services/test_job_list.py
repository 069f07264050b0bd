"""`jobs.list_page` reads only the summary columns (the spec's fields extracted by the database) and pages
exactly as before: each summary equals the one built from the whole ORM row."""

from __future__ import annotations

from datetime import timedelta

from app.core.db import session_scope
from app.models import Job, JobStatus, utcnow
from app.services import jobs as jobs_service
from app.services import tenants as tenants_service


def test_list_summaries_match_the_orm_rows_and_page_by_cursor(clean_database: str) -> None:
    now = utcnow()
    specs = [
        {
            "teacher_model_name": "digits-cnn",
            "target_compression": 0.25,
            "distillation_method": "x",
            "task": "t",
        },
        {"teacher_model_name": "digits-cnn", "target_compression": 1},  # an int in the JSON
        {"teacher_model_name": "digits-cnn"},  # fields missing: nulls
    ]
    with session_scope() as session:
        tenant = tenants_service.get_or_create(session, name="lister")
        other = tenants_service.get_or_create(session, name="other-lister")
        for i in range(7):
            session.add(
                Job(
                    spec=specs[i % 3],
                    teacher_model_name="digits-cnn" if i % 2 else "gpt2",
                    status=JobStatus.failed if i % 2 else JobStatus.completed,
                    progress=12.5 * i,
                    created_at=now - timedelta(seconds=i),
                    error={"code": "boom", "message": "it broke", "epoch": i} if i % 2 else None,
                    tenant_id=tenant.id,
                )
            )
        session.add(Job(spec=specs[0], teacher_model_name="gpt2", tenant_id=other.id))
        tenant_id = tenant.id
    with session_scope() as session:
        orm_jobs = session.query(Job).filter(Job.tenant_id == tenant_id).order_by(Job.created_at.desc()).all()
        expected = [jobs_service.to_summary(job) for job in orm_jobs]
        got, cursor = [], None
        while True:
            rows, has_more, cursor = jobs_service.list_page(
                session, limit=3, cursor=cursor, tenant_id=tenant_id
            )
            got += [jobs_service.to_summary(row) for row in rows]
            if not has_more:
                break
        assert got == expected
        assert [s.target_compression for s in got[:3]] == [0.25, 1.0, None]
        failed_gpt = jobs_service.list_page(
            session, limit=10, statuses=["failed"], teacher="digits-cnn", tenant_id=tenant_id
        )[0]
        assert [jobs_service.to_summary(r) for r in failed_gpt] == [
            s for s in expected if s.status == "failed"
        ]
