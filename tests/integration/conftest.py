"""Integration fixtures: real Celery worker and scheduler processes, killed and reaped after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_helpers import TINY_JOB, Proc, Stack, tiny_spec
from sqlalchemy import delete


@pytest.fixture()
def empty_jobs(clean_database: str) -> Iterator[None]:
    """No jobs left over from other tests (they would hold admission slots)."""
    from app.core.db import session_scope
    from app.models import Artifact, Job, JobEvent

    with session_scope() as session:
        for model in (JobEvent, Artifact, Job):
            session.execute(delete(model))
    yield


@pytest.fixture(scope="session")
def digits_teacher(migrated_database: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in digits-cnn teacher, built once into the suite's DATA_DIR (workers then only load it).

    Building it is the engine's job and is tested there; here it would cost every integration test ~30 s.
    """
    import torch

    from app.core.config import get_settings
    from app.schemas.job_spec import JobSpec
    from app.schemas.teachers import DEFAULT_TEACHERS
    from workers.distill.contract import JobPaths
    from workers.distill.runner import run_job

    if not TINY_JOB.exists():
        pytest.fail(f"{TINY_JOB} is missing (the engine ships it)")
    settings = get_settings()
    spec = JobSpec.model_validate(tiny_spec(epochs=1))
    teacher = next(t for t in DEFAULT_TEACHERS if t.name == spec.teacher_model_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_job(
            spec,
            teacher=teacher,
            paths=JobPaths(tmp_path_factory.mktemp("warmup")),
            data_dir=settings.data_dir,
        )
    finally:
        torch.set_num_threads(threads)
    built = settings.teachers_dir / teacher.location
    assert built.is_dir(), f"the engine did not build {built}"
    return built


@pytest.fixture()
def stack(
    tmp_path: Path, empty_jobs: None, digits_teacher: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """Worker/scheduler processes for one test; their logs are printed when the test fails."""
    stack = Stack(log_dir=tmp_path)
    try:
        yield stack
    finally:
        stack.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(stack.logs())


@pytest.fixture(scope="module")
def shared_worker(digits_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """One real worker with capacity 4 (`-c 4`), shared by the tests of a module (it starts in ~10 s)."""
    owner = Stack(log_dir=tmp_path_factory.mktemp("shared-worker"))
    try:
        yield owner.start_worker(concurrency=4)
    finally:
        owner.close()


@pytest.fixture()
def api(auth_headers: dict[str, str]) -> Iterator[Any]:
    """The real FastAPI app in-process (TestClient); starts admit and send to the real broker."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(), headers=auth_headers) as client:
        yield client


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
