"""`jobs.list_page` reads only the summary columns (the spec's fields extracted by the database) and pages
exactly as before: each summary equals the one built from the whole ORM row."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from app.core.db import make_async_db, session_scope
from app.models import Job, JobStatus, utcnow
from app.schemas.jobs import JobSummary
from app.services import jobs as jobs_service
from app.services import tenants as tenants_service


def _store_jobs() -> str:
    """Seven jobs of one tenant (mixed specs, statuses, teachers, errors) and one of another; the tenant."""
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
        return tenant.id


def test_list_summaries_match_the_orm_rows_and_page_by_cursor(clean_database: str) -> None:
    tenant_id = _store_jobs()
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


def test_async_list_pages_like_the_sync_one(clean_database: str) -> None:
    db = make_async_db(clean_database)
    if db is None:
        pytest.skip("the async pool is PostgreSQL's (SQLite lists through the sync engine)")
    tenant_id = _store_jobs()
    queries: list[dict[str, Any]] = [
        {},
        {"statuses": ["failed"]},
        {"statuses": ["failed", "completed"], "teacher": "gpt2"},
        {"teacher": "digits-cnn"},
    ]

    async def pages(query: dict[str, Any]) -> list[list[JobSummary]]:
        out, cursor = [], None
        while True:
            rows, has_more, cursor = await jobs_service.list_page_async(
                db, limit=2, cursor=cursor, tenant_id=tenant_id, **query
            )
            out.append([jobs_service.to_summary(row) for row in rows])
            if not has_more:
                return out

    async def run() -> list[list[list[JobSummary]]]:
        await db.open()
        try:
            return [await pages(query) for query in queries]
        finally:
            await db.close()

    got = asyncio.run(run())
    with session_scope() as session:
        for query, async_pages in zip(queries, got, strict=True):
            sync_pages, cursor = [], None
            while True:
                rows, has_more, cursor = jobs_service.list_page(
                    session, limit=2, cursor=cursor, tenant_id=tenant_id, **query
                )
                sync_pages.append([jobs_service.to_summary(row) for row in rows])
                if not has_more:
                    break
            assert async_pages == sync_pages, query
            assert [s.model_dump_json() for p in async_pages for s in p] == [
                s.model_dump_json() for p in sync_pages for s in p
            ]
