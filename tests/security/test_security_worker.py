"""The worker resolves a job's paths under its tenant's file root with the API's helper: a stored spec that
names another tenant's upload (a row from before the root rule) fails with a path code, quoting nothing."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.models import Job, Tenant, utcnow
from app.services.scheduler import admit_queued_jobs
from app.services.teachers import seed_default_teachers

SECRET = "alice-private-review-text"
CLASSIFY: dict[str, Any] = {
    "teacher_model_name": "digits-cnn",
    "target_compression": 0.25,
    "task": "classification",
    "training_config": {"epochs": 1},
}


def _tenant_id(name: str) -> str:
    with session_scope() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == name))
        assert tenant_id is not None
        return tenant_id


def _run(spec: dict[str, Any], tenant_id: str, settings: Settings) -> dict[str, Any]:
    from workers.tasks import execute_job

    with session_scope() as session:
        seed_default_teachers(session)
        job = Job(
            spec=spec,
            teacher_model_name=spec["teacher_model_name"],
            status="queued",
            queued_at=utcnow(),
            tenant_id=tenant_id,
        )
        session.add(job)
        session.flush()
        job_id = job.id
    with session_scope() as session:
        assert job_id in admit_queued_jobs(session, Settings(max_concurrent_jobs=100))
    execute_job(job_id, worker="security-test", settings=settings)
    with session_scope() as session:
        stored = session.get(Job, job_id)
        assert stored is not None and stored.status == "failed", stored and stored.status
        assert stored.error is not None
        return dict(stored.error)


def test_a_stored_path_into_data_dir_fails_without_quoting_it(
    clean_database: str, make_api_key: Any, tmp_path: Path
) -> None:
    make_api_key("mallory-w")
    settings = get_settings()
    assert settings.file_root is not None
    victim = settings.uploads_dir / f"{uuid.uuid4()}.csv"
    victim.write_text(f"text,label\n{SECRET},1\n")
    mallory = _tenant_id("mallory-w")
    try:
        legacy = CLASSIFY | {"dataset_config": {"kind": "file", "path": str(victim)}}
        error = _run(legacy, mallory, settings)
        assert error["code"] == "path_outside_root", error
        assert SECRET not in error["message"] and str(settings.data_dir) not in error["message"]

        # The same for a held-out split and a local student stored before the rule.
        held_out = CLASSIFY | {
            "dataset_config": {"kind": "builtin", "test": {"kind": "file", "path": str(victim)}}
        }
        assert _run(held_out, mallory, settings)["code"] == "path_outside_root"
        student = CLASSIFY | {"student": {"kind": "local", "path": str(settings.jobs_dir)}}
        assert _run(student, mallory, settings)["code"] == "path_outside_root"

        # The operator turned server paths off since: the job is refused, saying how to enable them.
        own = settings.file_root / f"{uuid.uuid4().hex}.csv"
        own.write_text("text,label\nmine,1\n")
        spec = CLASSIFY | {"dataset_config": {"kind": "file", "path": own.name}}
        off = Settings(**(settings.model_dump() | {"allowed_file_root": None}))
        error = _run(spec, mallory, off)
        assert error["code"] == "files_disabled" and "ALLOWED_FILE_ROOT" in error["message"]

        # With the root on, the worker reads the tenant's own file (it fails as a table, quoting only it).
        error = _run(spec, mallory, settings)
        assert error["code"] == "dataset_invalid", error
        assert str(settings.file_root) not in error["message"] and os.sep + "tmp" not in error["message"]
    finally:
        victim.unlink(missing_ok=True)
