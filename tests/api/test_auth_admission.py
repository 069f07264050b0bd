"""Per-tenant running limit inside admission (TENANT_MAX_RUNNING_JOBS), on the real test database."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import func, select

from app.core.config import Settings
from app.core.db import session_scope
from app.models import ACTIVE_STATUSES, Job, JobStatus, utcnow
from app.services.auth import create_key
from app.services.scheduler import admit_queued_jobs

SPEC = {"teacher_model_name": "digits-cnn", "target_compression": 0.2}


def _tenant(name: str) -> str:
    with session_scope() as session:
        return create_key(session, tenant_name=name, name="t").tenant.id


def _queue(owner_and_age: list[tuple[str | None, float]], status: str = JobStatus.queued) -> list[str]:
    """Insert jobs of `owner` queued `age` seconds ago (older goes first)."""
    now = utcnow()
    ids = []
    with session_scope() as session:
        for owner, age in owner_and_age:
            job = Job(
                spec=SPEC,
                teacher_model_name="digits-cnn",
                status=status,
                queued_at=now - timedelta(seconds=age),
                tenant_id=owner,
            )
            session.add(job)
            session.flush()
            ids.append(job.id)
    return ids


def _admit(settings: Settings) -> list[str]:
    with session_scope() as session:
        return admit_queued_jobs(session, settings)


def _active(tenant_id: str) -> int:
    with session_scope() as session:
        query = select(func.count()).where(Job.status.in_(ACTIVE_STATUSES), Job.tenant_id == tenant_id)
        return int(session.scalar(query) or 0)


def test_a_tenant_at_its_limit_waits_while_others_pass(clean_database: str) -> None:
    alice, bob = _tenant("alice-adm"), _tenant("bob-adm")
    settings = Settings(max_concurrent_jobs=4, tenant_max_running_jobs=2)
    a1, a2, a3, b1, nobody = _queue([(alice, 50), (alice, 40), (alice, 30), (bob, 20), (None, 10)])
    # alice's third job waits for one of hers; bob's and the unowned job pass it in line.
    assert _admit(settings) == [a1, a2, b1, nobody]
    assert _admit(settings) == []
    with session_scope() as session:
        job = session.get(Job, a1)
        assert job is not None
        job.status = JobStatus.completed
    assert _admit(settings) == [a3]
    assert _active(alice) == 2


def test_running_and_cancelling_jobs_count_toward_the_tenant(clean_database: str) -> None:
    alice = _tenant("carol-adm")
    _queue([(alice, 90)], status=JobStatus.running)
    _queue([(alice, 80)], status=JobStatus.cancelling)
    waiting = _queue([(alice, 10)])
    assert _admit(Settings(max_concurrent_jobs=10, tenant_max_running_jobs=2)) == []
    assert _admit(Settings(max_concurrent_jobs=10, tenant_max_running_jobs=3)) == waiting


def test_unset_tenant_limit_is_the_global_limit(clean_database: str) -> None:
    alice = _tenant("dave-adm")
    queued = _queue([(alice, 30 - i) for i in range(4)])
    assert Settings(max_concurrent_jobs=3).effective_tenant_max_running_jobs == 3
    assert _admit(Settings(max_concurrent_jobs=3)) == queued[:3]


def test_concurrent_admitters_never_exceed_a_tenants_limit(clean_database: str) -> None:
    """Admitters in parallel (own connections) admit one tenant's jobs only up to its limit."""
    alice, bob = _tenant("erin-adm"), _tenant("frank-adm")
    settings = Settings(max_concurrent_jobs=10, tenant_max_running_jobs=2)
    _queue([(alice, 100 - i) for i in range(8)] + [(bob, 50 - i) for i in range(8)])
    barrier = threading.Barrier(6)
    admitted: list[list[str]] = []
    errors: list[BaseException] = []

    def admit_once() -> None:
        try:
            barrier.wait(timeout=10)
            admitted.append(_admit(settings))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=admit_once) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    flat = [job_id for ids in admitted for job_id in ids]
    assert len(flat) == len(set(flat)) == 4
    assert _active(alice) == 2 and _active(bob) == 2
