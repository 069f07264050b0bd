"""`jobs.create_pending_async`: the common create in one statement stores what `jobs.create` stores."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete, select

from app.core.config import Settings, get_settings
from app.core.db import AsyncDb, make_async_db, session_scope
from app.models import Job, JobEvent, JobStatus, Teacher
from app.schemas.jobs import JobCreate
from app.services import jobs as jobs_service
from app.services import tenants as tenants_service
from app.services.teachers import seed_default_teachers


@pytest.fixture()
def async_db(clean_database: str) -> AsyncDb:
    db = make_async_db(clean_database)
    if db is None:
        pytest.skip("the async pool is PostgreSQL's (SQLite creates through the sync engine)")
    return db


@pytest.fixture()
def tenants(clean_database: str) -> Iterator[tuple[str, str]]:
    """(mine, other): two tenants; `other` owns the teacher `others-private-teacher` (removed after)."""
    with session_scope() as session:
        seed_default_teachers(session)
        mine = tenants_service.get_or_create(session, name="creator")
        other = tenants_service.get_or_create(session, name="other-creator")
        session.add(
            Teacher(
                name="others-private-teacher",
                source_kind="local",
                location="/nowhere",
                type="hf",
                tenant_id=other.id,
            )
        )
        ids = mine.id, other.id
    yield ids
    with session_scope() as session:
        session.execute(delete(Teacher).where(Teacher.name == "others-private-teacher"))


def _stored(job_id: str) -> tuple[dict[str, Any], list[tuple[str, str, dict[str, Any], int]]]:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        columns = {c.key: getattr(job, c.key) for c in Job.__table__.columns}
        events = session.execute(
            select(JobEvent.kind, JobEvent.message, JobEvent.data, JobEvent.attempt).where(
                JobEvent.job_id == job_id
            )
        ).all()
    return columns, [tuple(e) for e in events]  # type: ignore[misc]


def test_one_statement_create_stores_what_create_stores(async_db: AsyncDb, tenants: tuple[str, str]) -> None:
    tenant_id, other_id = tenants
    request = JobCreate.model_validate(
        {"teacher_model_name": "digits-cnn", "target_compression": 0.1, "training_config": {"epochs": 2}}
    )
    assert jobs_service.creates_in_one_statement(request, get_settings())
    with session_scope() as session:
        reference = jobs_service.create(
            session, request=request, settings=get_settings(), tenant_id=tenant_id
        )
        reference_id = reference.id

    async def create() -> tuple[Any, Any]:
        await async_db.open()
        try:
            made = await jobs_service.create_pending_async(async_db, request=request, tenant_id=tenant_id)
            # Another tenant's teacher is invisible: nothing is stored, the caller runs the full check.
            hidden = JobCreate(teacher_model_name="others-private-teacher")
            refused = await jobs_service.create_pending_async(async_db, request=hidden, tenant_id=tenant_id)
            return made, refused
        finally:
            await async_db.close()

    made, refused = asyncio.run(create())
    assert refused is None
    assert made is not None and made.status == JobStatus.pending
    assert made.estimate is None  # made right after the answer (the route's background task), as here:
    jobs_service.store_estimate(get_settings(), job_id=made.job_id, tenant_id=tenant_id)
    columns, events = _stored(made.job_id)
    expected, expected_events = _stored(reference_id)
    for volatile in ("id", "created_at", "updated_at"):
        columns.pop(volatile)
        expected.pop(volatile)
    assert columns == expected
    assert events == expected_events == [("state", "created", {"from": None, "to": "pending"}, 0)]
    with session_scope() as session:
        via_orm = jobs_service.read(session, job_id=made.job_id, tenant_id=tenant_id)
        # The response is the stored job (but for the estimate written after it).
        assert via_orm.model_copy(update={"estimate": None, "updated_at": made.updated_at}) == made
        owners = session.scalars(select(Job.tenant_id)).all()
    assert sorted(owners) == [tenant_id, tenant_id]  # and nothing for the refused request
    assert other_id not in owners


@pytest.mark.parametrize(
    ("body", "settings"),
    [
        ({"auto_start": True}, {}),  # queue checks under a lock: the transaction path
        ({"dataset_config": {"kind": "uploaded", "dataset_id": "d"}}, {}),
        ({"dataset_config": {"kind": "file", "path": "x.csv"}}, {}),
        ({"training_config": {"epochs": 9}}, {"max_epochs": 5}),  # the full check lists every error
    ],
)
def test_other_creates_take_the_full_path(body: dict[str, Any], settings: dict[str, Any]) -> None:
    request = JobCreate.model_validate({"teacher_model_name": "digits-cnn", **body})
    assert not jobs_service.creates_in_one_statement(request, Settings(**settings))
