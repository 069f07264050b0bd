"""Worker death and leases: a killed pool process's job is re-queued and resumes, or fails after
MAX_ATTEMPTS; a worker whose lease was taken over stops without writing anything more."""

from __future__ import annotations

from typing import Any

import pytest
from integration_helpers import Stack, job_events, job_row, tiny_spec, wait_for, wait_for_status
from reliability_helpers import checkpointed_epochs, claims, kill_pool_process, wait_for_checkpoint
from sqlalchemy import func, select, update

pytestmark = pytest.mark.integration

# Long enough to be killed mid-way (several epoch checkpoints), short enough for the suite.
LONG = {"epochs": 12, "batch_size": 16}


def _start(api: Any, **training: Any) -> str:
    response = api.post("/distillation/jobs", json={**tiny_spec(**training), "auto_start": True})
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


def test_killed_pool_process_requeues_and_resumes_or_fails_after_max_attempts(stack: Stack, api: Any) -> None:
    stack.start_scheduler(HEARTBEAT_TIMEOUT="3", MAX_ATTEMPTS="2")
    worker = stack.start_worker(concurrency=2)
    resumed_job = _start(api, **LONG)  # killed once: resumes on attempt 2
    doomed_job = _start(api, **LONG)  # killed on both attempts: fails with max_attempts

    killed: dict[str, list[int]] = {resumed_job: [], doomed_job: []}
    at_kill: dict[str, list[int | None]] = {}  # checkpointed epochs just before each kill
    for attempt in (1, 2):
        for job_id in [resumed_job, doomed_job] if attempt == 1 else [doomed_job]:
            wait_for_checkpoint(job_id, attempt, min_epochs=1 if attempt == 1 else 0)
            at_kill.setdefault(job_id, []).append(checkpointed_epochs(job_id))
            killed[job_id].append(kill_pool_process(job_id, worker.process.pid))
    assert worker.alive(), "only the pool processes were killed, not the worker"

    job = wait_for_status(resumed_job, {"completed", "failed"}, timeout=120, stack=stack)
    assert job.status == "completed", job.error
    assert job.attempt == 2 and job.results is not None
    assert [c.data["attempt"] for c in claims(resumed_job)] == [1, 2]
    (resumed,) = [e for e in job_events(resumed_job, "checkpoint") if e.message == "resuming from checkpoint"]
    done = resumed.data["epoch"]
    assert resumed.attempt == 2 and done >= 1 and done >= at_kill[resumed_job][0], (resumed.data, at_kill)
    epochs = {
        a: {e.data["epoch"] for e in job_events(resumed_job, "metric") if e.attempt == a} for a in (1, 2)
    }
    # Attempt 2 trained exactly the epochs after its checkpoint; attempt 1 had trained those before it.
    assert epochs[2] == set(range(done + 1, LONG["epochs"] + 1)), (done, epochs)
    assert set(range(1, done + 1)) <= epochs[1], (done, epochs)
    history = [h["epoch"] for h in job.results["training_history"]]
    assert len(history) == len(set(history)) == LONG["epochs"], history

    job = wait_for_status(doomed_job, {"failed"}, timeout=60, stack=stack)
    assert job.attempt == 2 and job.lease_token is None
    assert job.error["code"] == "max_attempts"
    assert "attempt 2 of 2" in job.error["message"] and "not retried" in job.error["message"]
    reasons = [e.data.get("reason") for e in job_events(doomed_job, "state") if e.data["from"] == "running"]
    assert reasons == ["heartbeat_stale", "max_attempts"]
    assert all(len(pids) == (1 if j == resumed_job else 2) for j, pids in killed.items())
    assert len(set(killed[doomed_job])) == 2, "each attempt ran in its own (replaced) pool process"


def test_second_claimant_is_refused_and_a_taken_over_worker_writes_nothing_more(
    stack: Stack, api: Any
) -> None:
    from app.core.db import session_scope
    from app.models import Artifact, Job, JobEvent
    from app.services import lifecycle

    worker = stack.start_worker(concurrency=1)  # no scheduler: nothing re-queues the taken-over job
    job_id = _start(api, **LONG)
    wait_for_checkpoint(job_id, 1)
    with session_scope() as session:  # a second message for the same job (e.g. a re-send) is dropped
        assert lifecycle.claim_job(session, job_id=job_id, worker="intruder/1") is None

    # Take the lease over as a re-claim elsewhere would: new token and worker, fixed heartbeat/progress.
    # The row is locked before it is read: a heartbeat the worker commits between an unlocked read and the
    # takeover would be a legitimate pre-takeover write, yet differ from the values frozen here.
    with session_scope() as session:
        before = session.get(Job, job_id, with_for_update=True)
        assert before is not None and before.status == "running"
        frozen = {"heartbeat_at": before.heartbeat_at, "progress": before.progress, "phase": before.phase}
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_token="taken-over", worker="other-node/1", attempt=2)
            .execution_options(synchronize_session=False)
        )
        last_event = session.scalar(select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id))

    wait_for(
        f"the old worker to stop on its lost lease\n{worker.log_tail()}",
        lambda: f"job {job_id}: stopped: lease lost" in worker.log_path.read_text(errors="replace"),
        timeout=15,
        interval=0.1,
    )
    job = job_row(job_id)
    assert job.status == "running" and job.lease_token == "taken-over" and job.worker == "other-node/1"
    assert job.results is None and job.error is None
    assert {"heartbeat_at": job.heartbeat_at, "progress": job.progress, "phase": job.phase} == frozen
    with session_scope() as session:
        later = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > last_event)
        ).all()
        artifacts = session.scalar(
            select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)
        )
    assert [(e.kind, e.message) for e in later] == [], "the old worker wrote history after the takeover"
    assert artifacts == 0
    assert worker.alive()
