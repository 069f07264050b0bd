"""The teacher registry service that workers and `distillery up` call directly."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, func, select

from app.core.db import session_scope
from app.errors import NotFound
from app.models import Teacher
from app.schemas.teachers import DEFAULT_TEACHERS, TeacherSourceKind
from app.services.teachers import get_teacher_source, seed_default_teachers


def test_seed_is_idempotent_and_restores_missing_defaults(migrated_database: str) -> None:
    with session_scope() as session:
        seed_default_teachers(session)
        assert seed_default_teachers(session) == 0
        count = session.scalar(select(func.count()).select_from(Teacher).where(Teacher.builtin.is_(True)))
        assert count == len(DEFAULT_TEACHERS)
        session.execute(delete(Teacher).where(Teacher.name == "gpt2-medium"))
        session.commit()
        assert seed_default_teachers(session) == 1
        assert get_teacher_source(session, "gpt2-medium").location == "gpt2-medium"


def test_get_teacher_source_maps_rows_to_sources(migrated_database: str) -> None:
    with session_scope() as session:
        seed_default_teachers(session)
        digits = get_teacher_source(session, "digits-cnn")
        assert digits.kind == TeacherSourceKind.builtin and digits.type == "cnn"
        bert = get_teacher_source(session, "bert-large")
        assert bert.kind == TeacherSourceKind.hub and bert.location == "bert-large-uncased"
        with pytest.raises(NotFound) as raised:
            get_teacher_source(session, "nope")
        assert "digits-cnn" in raised.value.extras["valid_teachers"]
