"""The teacher registry service that workers and `distillery up` call directly."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import delete, func, select

from app.core.db import session_scope
from app.errors import NotFound
from app.models import Teacher
from app.schemas.teachers import DEFAULT_TEACHERS, TeacherSourceKind
from app.services.teachers import (
    get_teacher_source,
    list_all,
    record_measured_params,
    seed_default_teachers,
)


def test_seed_is_idempotent_and_restores_missing_defaults(migrated_database: str) -> None:
    with session_scope() as session:
        seed_default_teachers(session)
        assert seed_default_teachers(session) == 0
        count = session.scalar(select(func.count()).select_from(Teacher).where(Teacher.builtin.is_(True)))
        assert count == len(DEFAULT_TEACHERS)
        session.execute(delete(Teacher).where(Teacher.name == "gpt2-medium"))
        session.commit()
        assert seed_default_teachers(session) == 1
        assert get_teacher_source(session, "gpt2-medium", tenant_id=None).location == "gpt2-medium"


def test_get_teacher_source_maps_rows_to_sources(migrated_database: str) -> None:
    with session_scope() as session:
        seed_default_teachers(session)
        digits = get_teacher_source(session, "digits-cnn", tenant_id=None)
        assert digits.kind == TeacherSourceKind.builtin and digits.type == "cnn"
        bert = get_teacher_source(session, "bert-large", tenant_id=None)
        assert bert.kind == TeacherSourceKind.hub and bert.location == "bert-large-uncased"
        with pytest.raises(NotFound) as raised:
            get_teacher_source(session, "nope", tenant_id=None)
        assert "digits-cnn" in raised.value.extras["valid_teachers"]


def test_a_name_means_the_tenants_own_teacher_else_the_global_one(migrated_database: str) -> None:
    """Per-owner names: a worker resolves the job's teacher as its tenant sees it, its own first (a global
    teacher seeded later may share the name), and a measured size fills only that row."""
    name = f"per-tenant-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        for tenant, location in ((None, "org/global"), ("tenant-a", "org/a"), ("tenant-b", "org/b")):
            session.add(
                Teacher(
                    name=name,
                    source_kind="hub",
                    location=location,
                    type="transformer",
                    description="",
                    builtin=False,
                    tenant_id=tenant,
                )
            )
    try:
        with session_scope() as session:
            assert get_teacher_source(session, name, tenant_id="tenant-a").location == "org/a"
            assert get_teacher_source(session, name, tenant_id="tenant-b").location == "org/b"
            assert get_teacher_source(session, name, tenant_id="tenant-c").location == "org/global"
            assert get_teacher_source(session, name, tenant_id=None).location == "org/global"
            listed = {t.location for t in list_all(session, tenant_id="tenant-a") if t.name == name}
            assert listed == {"org/a"}  # the global one it shadows is not listed beside it
            assert {t.location for t in list_all(session, tenant_id="tenant-c") if t.name == name} == {
                "org/global"
            }
            assert record_measured_params(session, name=name, tenant_id="tenant-b", params=1234)
            assert not record_measured_params(session, name=name, tenant_id="tenant-b", params=99)  # known
        with session_scope() as session:
            sizes = dict(
                session.execute(select(Teacher.location, Teacher.params).where(Teacher.name == name)).all()
            )
        assert sizes == {"org/global": None, "org/a": None, "org/b": 1234}
    finally:
        with session_scope() as session:
            session.execute(delete(Teacher).where(Teacher.name == name))
