"""Worker capacity on the real test database: a job of world_size n waits until a live worker offers n
devices, says why on its read and in an event, and is routed to the queue of its size."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete, select, update

from app.core.celery_client import QUEUE_TRAINING, training_queue
from app.core.config import Settings
from app.core.db import make_async_db, session_scope
from app.models import Job, JobEvent, JobStatus, ServiceHeartbeat, utcnow
from app.services import heartbeats
from app.services import jobs as jobs_service
from app.services.scheduler import admit_queued_jobs
from workers.celery_app import worker_devices, worker_queues


@pytest.fixture()
def db(clean_database: str) -> Iterator[str]:
    """No jobs and no worker heartbeats before and after the test."""

    def clear() -> None:
        with session_scope() as session:
            session.execute(delete(JobEvent))
            session.execute(delete(Job))
            session.execute(delete(ServiceHeartbeat).where(ServiceHeartbeat.kind == "worker"))

    clear()
    yield clean_database
    clear()


def _settings() -> Settings:
    return Settings(max_concurrent_jobs=4, heartbeat_timeout=10.0)  # type: ignore[call-arg]


def _beat(sid: str, devices: int, *, age_s: float = 0.0) -> None:
    with session_scope() as session:
        heartbeats.beat(session, kind="worker", sid=sid, info={"devices": devices})
        if age_s:
            session.execute(
                update(ServiceHeartbeat)
                .where(ServiceHeartbeat.id == sid)
                .values(last_seen_at=utcnow() - timedelta(seconds=age_s))
            )


def _queued_job(world_size: int, settings: Settings) -> str:
    """A pending job started through the service (as POST .../start does)."""
    spec = {
        "teacher_model_name": "digits-cnn",
        "target_compression": 0.2,
        "training_config": {"batch_size": 64, "world_size": world_size},
    }
    with session_scope() as session:
        job = Job(spec=spec, teacher_model_name="digits-cnn", status=JobStatus.pending)
        session.add(job)
        session.flush()
        job_id = job.id
    with session_scope() as session:
        jobs_service.start(session, job_id=job_id, settings=settings, tenant_id=None)
    return job_id


def _read(job_id: str) -> tuple[str, str | None]:
    with session_scope() as session:
        read = jobs_service.read(session, job_id=job_id, tenant_id=None)
    return read.status, read.queue_reason


def test_a_two_rank_job_with_only_one_device_workers_stays_queued_with_its_reason(db: str) -> None:
    settings = _settings()
    _beat("worker:one-device", 1)
    _beat("worker:gone-four-devices", 4, age_s=60)  # stale: its devices do not count
    big = _queued_job(2, settings)
    small = _queued_job(1, settings)  # queued after the big one

    with session_scope() as session:
        assert admit_queued_jobs(session, settings) == [small]  # passes the job no worker can take
    status, reason = _read(big)
    assert status == JobStatus.queued
    assert reason is not None and "2 devices" in reason and "largest offers 1" in reason
    assert _read(small) == (JobStatus.dispatched, None)
    with session_scope() as session:
        events = session.execute(
            select(JobEvent.message, JobEvent.data).where(JobEvent.job_id == big, JobEvent.kind == "queue")
        ).all()
    assert len(events) == 1 and events[0].data == {"world_size": 2, "live_devices": 1}

    with session_scope() as session:  # still nobody: later ticks leave it queued
        assert admit_queued_jobs(session, settings) == []
    assert _read(big)[0] == JobStatus.queued

    _beat("worker:two-devices", 2)  # a worker that can take it comes up
    with session_scope() as session:
        assert admit_queued_jobs(session, settings) == [big]
    assert _read(big) == (JobStatus.dispatched, None)


def test_without_any_live_worker_the_reason_says_so_and_one_rank_jobs_still_go(db: str) -> None:
    settings = _settings()
    big = _queued_job(4, settings)
    small = _queued_job(1, settings)
    with session_scope() as session:
        assert admit_queued_jobs(session, settings) == [small]  # as before: any worker takes it later
    reason = _read(big)[1]
    assert reason is not None and "no worker is live" in reason


def test_the_async_read_gives_the_same_reason(db: str) -> None:
    reads = make_async_db(db)
    if reads is None:
        pytest.skip("the async read pool is PostgreSQL's")
    settings = _settings()
    _beat("worker:one-device", 1)
    big = _queued_job(2, settings)

    async def read_async() -> str | None:
        await reads.open()
        try:
            read = await jobs_service.read_async(reads, job_id=big, tenant_id=None)
        finally:
            await reads.close()
        return read.queue_reason

    assert asyncio.run(read_async()) == _read(big)[1] is not None


def test_workers_offer_their_devices_and_consume_the_queues_up_to_them() -> None:
    assert worker_devices(Settings(worker_devices=3)) == 3  # type: ignore[call-arg]
    assert worker_devices(Settings()) >= 1
    assert worker_queues(3) == [QUEUE_TRAINING, training_queue(2), training_queue(3)]
    assert training_queue(1) == QUEUE_TRAINING and training_queue(2) == f"{QUEUE_TRAINING}-2ranks"
