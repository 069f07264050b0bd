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
            made = await jobs_service.create_pending_async(
                async_db, request=request, tenant_id=tenant_id, settings=get_settings()
            )
            # Another tenant's teacher is invisible: nothing is stored, the caller runs the full check.
            hidden = JobCreate(teacher_model_name="others-private-teacher")
            refused = await jobs_service.create_pending_async(
                async_db, request=hidden, tenant_id=tenant_id, settings=get_settings()
            )
            return made, refused
        finally:
            await async_db.close()

    made, refused = asyncio.run(create())
    assert refused is None
    assert made is not None and made.status == JobStatus.pending
    # The estimate is made and stored by the create itself, from what its statement read.
    assert made.estimate is not None and made.estimate["train_rows"] == 1294
    columns, events = _stored(made.job_id)
    expected, expected_events = _stored(reference_id)
    for volatile in ("id", "created_at", "updated_at"):
        columns.pop(volatile)
        expected.pop(volatile)
    assert columns == expected
    assert events == expected_events == [("state", "created", {"from": None, "to": "pending"}, 0)]
    with session_scope() as session:
        via_orm = jobs_service.read(session, job_id=made.job_id, tenant_id=tenant_id)
        # The response is the stored job, estimate included.
        assert via_orm == made
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


def test_the_statement_fits_image_teachers_to_image_tasks_only(
    async_db: AsyncDb, tenants: tuple[str, str]
) -> None:
    """An image_classifier teacher is created in one statement for image-classification; with task
    classification (or digits-cnn with the image task) nothing is stored and the full check answers."""
    tenant_id, _ = tenants
    with session_scope() as session:
        session.add(
            Teacher(
                name="my-vit",
                source_kind="hub",
                location="org/vit",
                type="image_classifier",
                tenant_id=tenant_id,
            )
        )
    hub_images = {"kind": "hub", "name": "org/images"}
    image_job = JobCreate.model_validate(
        {"teacher_model_name": "my-vit", "task": "image-classification", "dataset_config": hub_images}
    )
    wrong_task = JobCreate.model_validate({"teacher_model_name": "my-vit", "task": "classification"})
    wrong_teacher = JobCreate.model_validate(
        {"teacher_model_name": "digits-cnn", "task": "image-classification", "dataset_config": hub_images}
    )
    assert all(jobs_service.creates_in_one_statement(r, get_settings()) for r in (image_job, wrong_task))

    async def create() -> list[Any]:
        await async_db.open()
        try:
            return [
                await jobs_service.create_pending_async(
                    async_db, request=r, tenant_id=tenant_id, settings=get_settings()
                )
                for r in (image_job, wrong_task, wrong_teacher)
            ]
        finally:
            await async_db.close()

    try:
        made, refused_task, refused_teacher = asyncio.run(create())
        assert made is not None and made.spec["task"] == "image-classification"
        assert refused_task is None and refused_teacher is None
    finally:
        with session_scope() as session:
            session.execute(delete(Job))
            session.execute(delete(Teacher).where(Teacher.name == "my-vit"))
