"""/distillation/teachers gives the built-in digits-cnn's parameter count (789,310, as the README says),
also on a database seeded before the count was known, over real HTTP."""

from __future__ import annotations

import httpx
from sqlalchemy import update

from app.core.db import session_scope
from app.models import Teacher
from app.services.teachers import seed_default_teachers
from tests.live_server import live_server


def test_the_built_in_teacher_lists_its_parameter_count_after_a_restart(
    clean_database: str, auth_headers: dict[str, str]
) -> None:
    with session_scope() as session:
        seed_default_teachers(session)
        session.execute(update(Teacher).where(Teacher.name == "digits-cnn").values(params=None))
    with live_server() as url:  # its startup seeds the defaults again
        teacher = httpx.get(f"{url}/distillation/teachers/digits-cnn", headers=auth_headers, timeout=10)
    assert teacher.status_code == 200, teacher.text
    assert teacher.json()["params"] == 789_310
