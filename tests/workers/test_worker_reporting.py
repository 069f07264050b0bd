"""The worker side without Celery: JobReporter (throttled writes, heartbeat, stop checks), execute_job."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.models import Job, JobEvent, JobStatus, utcnow
from app.services import lifecycle
from app.services.scheduler import admit_queued_jobs
from workers.distill.contract import Progress
from workers.reporting import JobReporter

TINY_JOB = Path(__file__).resolve().parents[2] / "examples" / "tiny.json"


@pytest.fixture()
def db(clean_database: str) -> Iterator[str]:
    """No jobs; the default teachers registered (as the worker does at start-up)."""
    from app.services.teachers import seed_default_teachers

    with session_scope() as session:
        session.execute(delete(JobEvent))
        session.execute(delete(Job))
        seed_default_teachers(session)
    yield clean_database


def _claimed_job(
    spec: dict[str, Any] | None = None, *, claim: bool = True
) -> tuple[str, lifecycle.Claim | None]:
    """A job admitted (dispatched) and, by default, claimed by this test as worker 'test'."""
    spec = spec or json.loads(TINY_JOB.read_text())
    with session_scope() as session:
        job = Job(
            spec=spec, teacher_model_name=spec["teacher_model_name"], status="queued", queued_at=utcnow()
        )
        session.add(job)
        session.flush()
        job_id = job.id
    with session_scope() as session:
        assert admit_queued_jobs(session, Settings(max_concurrent_jobs=10)) == [job_id]
    if not claim:
        return job_id, None
    with session_scope() as session:
        return job_id, lifecycle.claim_job(session, job_id=job_id, worker="test")


def _job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _events(job_id: str, kind: str) -> list[JobEvent]:
    with session_scope() as session:
        stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == kind).order_by(JobEvent.id)
        rows = list(session.scalars(stmt))
        for row in rows:
            session.expunge(row)
        return rows


def _wait(what: str, probe: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_progress_writes_are_throttled_but_phase_changes_and_close_flush(db: str) -> None:
    job_id, claim = _claimed_job()
    assert claim is not None
    reporter = JobReporter(claim, Settings(progress_min_interval=60.0, heartbeat_interval=60.0))
    with reporter:
        reporter.on_progress(Progress(phase="distill", fraction=0.10, epoch=1, metrics={"loss": 2.0}))
        for step in range(50):  # within the interval: kept in memory, not written
            reporter.on_progress(Progress(phase="distill", fraction=0.10 + step / 1000, epoch=1))
        assert _job(job_id).progress == 10.0
        reporter.on_progress(Progress(phase="evaluate", fraction=0.92, eta_seconds=3.0))  # phase change: now
        job = _job(job_id)
        assert (job.phase, job.progress, job.eta_seconds) == ("evaluate", 92.0, 3.0)
        reporter.on_progress(Progress(phase="evaluate", fraction=0.95))
        reporter.on_event("metric", "epoch 1", {"epoch": 1, "student_accuracy": 0.5})
    assert _job(job_id).progress == 95.0  # closing flushed the last report
    (metric,) = _events(job_id, "metric")
    assert metric.attempt == 1 and metric.data["student_accuracy"] == 0.5
    assert [e.data["phase"] for e in _events(job_id, "progress")] == ["distill", "evaluate"]


def test_heartbeat_thread_refreshes_heartbeat_at(db: str) -> None:
    job_id, claim = _claimed_job()
    assert claim is not None
    first = _job(job_id).heartbeat_at
    with JobReporter(claim, Settings(heartbeat_interval=0.05)):
        _wait("a heartbeat", lambda: _job(job_id).heartbeat_at > first)  # type: ignore[operator]


def test_should_stop_on_cancel_and_on_a_lost_lease(db: str) -> None:
    job_id, claim = _claimed_job()
    assert claim is not None
    with JobReporter(claim, Settings(heartbeat_interval=60.0)) as reporter:
        assert reporter.should_stop() is False
        with session_scope() as session:  # the API's cancel of a running job
            session.get(Job, job_id).status = JobStatus.cancelling  # type: ignore[union-attr]
        _wait("should_stop after a cancel", reporter.should_stop, timeout=2)
        assert not reporter.lease_lost
        with session_scope() as session:
            assert lifecycle.cancel_stopped_job(
                session, job_id=job_id, lease_token=claim.lease_token, attempt=claim.attempt
            )
    assert _job(job_id).status == "cancelled"

    job_id, claim = _claimed_job()
    assert claim is not None
    with JobReporter(claim, Settings(heartbeat_interval=0.05)) as reporter:
        with session_scope() as session:  # the scheduler re-queued it (stale heartbeat): the lease is gone
            job = session.get(Job, job_id)
            assert job is not None
            job.status, job.lease_token = JobStatus.queued, None
        _wait(
            "the lease loss to be noticed", lambda: reporter.should_stop() and reporter.lease_lost, timeout=2
        )


def test_may_write_holds_only_while_the_lease_is_freshly_renewed(db: str) -> None:
    """The job's files are written only within half of HEARTBEAT_TIMEOUT after a guarded write held the
    lease (so no re-queue can have happened); past it the reporter renews the lease itself before saying
    yes, and once the job was re-queued elsewhere it says no, even before any other write noticed."""
    job_id, claim = _claimed_job()
    assert claim is not None
    # No heartbeat thread to speak of (60 s), a 2 s timeout: the window is 1 s after each renewal (room for a
    # loaded machine's statements inside it).
    settings = Settings(heartbeat_interval=60.0, heartbeat_timeout=2.0)
    with JobReporter(claim, settings) as reporter:
        assert reporter.may_write()  # the claim itself renewed the lease
        before = _job(job_id).heartbeat_at
        time.sleep(1.2)  # past the window: may_write renews the lease itself
        assert reporter.may_write()
        renewed = _job(job_id).heartbeat_at
        assert before is not None and renewed is not None and renewed > before
        with session_scope() as session:  # the scheduler re-queued it, another worker claimed it
            job = session.get(Job, job_id)
            assert job is not None
            job.status, job.lease_token, job.worker = JobStatus.running, "taken-over", "other/1"
        assert reporter.may_write()  # inside the window: no takeover could have been legitimate yet
        time.sleep(1.2)
        assert not reporter.may_write()  # its renewal fails: the files are another attempt's now
        time.sleep(1.1)  # retried after RENEW_RETRY_SECONDS, still refused
        assert not reporter.may_write()
        assert _job(job_id).heartbeat_at == renewed  # nothing of the old worker's reached the row


def test_execute_job_fails_cleanly_with_a_code(db: str) -> None:
    from workers.tasks import execute_job

    spec = json.loads(TINY_JOB.read_text())
    spec["teacher_model_name"] = "no-such-teacher"  # the API refuses this; a registry change could cause it
    job_id, _ = _claimed_job(spec, claim=False)
    assert execute_job(job_id, worker="test").startswith("failed (unknown_teacher)")
    job = _job(job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error is not None and job.error["code"] == "unknown_teacher"
    assert "digits-cnn" in job.error["message"]  # names the valid ones
    assert execute_job(job_id, worker="test") == "dropped"  # a duplicate message cannot claim it again


def test_execute_job_stops_on_cancel_and_keeps_its_checkpoint(db: str) -> None:
    import torch

    from workers.tasks import execute_job

    torch.set_num_threads(1)
    spec = json.loads(TINY_JOB.read_text())
    spec["training_config"].update(epochs=30, batch_size=16)
    job_id, _ = _claimed_job(spec, claim=False)

    def cancel_once_training() -> None:
        _wait("an epoch", lambda: _events(job_id, "metric"), timeout=300)
        with session_scope() as session:
            session.get(Job, job_id).status = JobStatus.cancelling  # type: ignore[union-attr]

    canceller = threading.Thread(target=cancel_once_training)
    canceller.start()
    outcome = execute_job(job_id, worker="test", settings=Settings(heartbeat_interval=0.5))
    canceller.join()
    assert outcome == "cancelled"
    job = _job(job_id)
    assert job.status == "cancelled" and job.results is None and job.finished_at is not None
    assert len(_events(job_id, "metric")) < 30
    assert any((get_settings().jobs_dir / job_id / "checkpoints").iterdir())


def test_a_cancel_after_the_last_stop_check_ends_the_job_cancelled_not_completed(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine finished (its last stop check passed), then the cancel landed before the worker stored the
    results: the job ends `cancelled` as the cancel's answer said, with no results, no artifact rows and no
    `job.completed` webhook; the state event says why."""
    import torch

    import workers.distill.runner as runner
    from app.models import Artifact
    from workers.tasks import execute_job

    torch.set_num_threads(1)
    job_id, _ = _claimed_job(claim=False)
    engine = runner.run_job

    def run_then_cancel(*args: Any, **kwargs: Any) -> Any:
        results = engine(*args, **kwargs)  # the real engine, to its end
        with session_scope() as session:  # the API's cancel of the running job, just too late for it
            session.get(Job, job_id).status = JobStatus.cancelling  # type: ignore[union-attr]
        return results

    monkeypatch.setattr(runner, "run_job", run_then_cancel)
    assert execute_job(job_id, worker="test", settings=Settings(heartbeat_interval=0.5)) == "cancelled"
    job = _job(job_id)
    assert job.status == "cancelled" and job.results is None and job.finished_at is not None
    with session_scope() as session:
        assert session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []
    last = _events(job_id, "state")[-1]
    assert last.data["to"] == "cancelled" and "before its results were stored" in last.data["reason"]


def test_job_progress_in_the_database_only_moves_forward(db: str) -> None:
    """A whole job with a baseline, sampled from the jobs row while it runs: never decreasing, ends at 100."""
    import torch

    from workers.tasks import execute_job

    torch.set_num_threads(1)
    spec = json.loads(TINY_JOB.read_text())
    spec["training_config"].update(epochs=3, baseline=True)
    job_id, _ = _claimed_job(spec, claim=False)
    samples: list[tuple[float, str | None]] = []
    finished = threading.Event()

    def sample() -> None:
        while not finished.is_set():
            job = _job(job_id)
            if job.progress is not None and (not samples or samples[-1] != (job.progress, job.phase)):
                samples.append((job.progress, job.phase))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        outcome = execute_job(job_id, worker="test", settings=Settings(progress_min_interval=0.0))
    finally:
        finished.set()
        sampler.join()
    assert outcome == "completed"
    progress_events = [float(e.data["progress"]) for e in _events(job_id, "progress")]
    assert progress_events == sorted(progress_events) and progress_events[-1] == 100.0
    percents = [p for p, _ in samples]
    assert percents == sorted(percents), f"progress went backwards: {samples}"
    phases = [phase for _, phase in samples]
    assert "baseline" in phases and "distill" in phases  # sampled across the baseline -> distill change
    assert _job(job_id).progress == 100.0
