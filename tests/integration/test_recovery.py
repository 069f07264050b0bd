"""Recovery never waits on the broker: a lost message is re-sent, a dead worker's job re-queued, resumed."""

from __future__ import annotations

from typing import Any

import pytest
from integration_helpers import Stack, job_events, job_row, tiny_spec, wait_for, wait_for_status

pytestmark = pytest.mark.integration


def test_dispatched_job_whose_message_was_lost_is_resent(stack: Stack, empty_jobs: None) -> None:
    from fastapi.testclient import TestClient

    from app.core.config import get_settings
    from app.core.db import session_scope
    from app.main import create_app
    from app.services.scheduler import admit_queued_jobs

    with TestClient(create_app(wake_scheduler=False)) as api:  # this API never admits or sends
        response = api.post("/distillation/jobs", json={**tiny_spec(), "auto_start": True})
        assert response.status_code == 201, response.text
        job_id = response.json()["job_id"]
    with session_scope() as session:  # admitted and committed, but the message is never sent: "lost"
        assert admit_queued_jobs(session, get_settings()) == [job_id]
    stack.start_worker()
    assert job_row(job_id).status == "dispatched"  # the worker has nothing to claim

    stack.start_scheduler(DISPATCH_TIMEOUT="1")
    job = wait_for_status(job_id, {"completed", "failed"}, timeout=120, stack=stack)
    assert job.status == "completed", job.error
    (resend, *_) = job_events(job_id, "dispatch")
    assert resend.message.startswith("re-sent")
    assert job.attempt == 1


def test_running_job_whose_worker_died_is_requeued_and_resumes(stack: Stack, api: Any) -> None:
    from app.core.config import get_settings

    stack.start_scheduler(HEARTBEAT_TIMEOUT="3")
    first = stack.start_worker()
    spec = tiny_spec(epochs=EPOCHS_WHEN_KILLED)
    response = api.post("/distillation/jobs", json={**spec, "auto_start": True})
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]

    # Kill the whole worker (parent and pool process) once epoch 1 is checkpointed.
    checkpoints = get_settings().jobs_dir / job_id / "checkpoints"
    wait_for(
        "a first checkpoint",
        lambda: job_events(job_id, "metric") and checkpoints.is_dir() and any(checkpoints.iterdir()),
        timeout=120,
        interval=0.05,
    )
    assert job_row(job_id).status == "running"
    first.kill()

    stack.start_worker()
    job = wait_for_status(job_id, {"completed", "failed"}, timeout=120, stack=stack)
    assert job.status == "completed", job.error
    assert job.attempt == 2
    claims = job_events(job_id, "claim")
    assert [c.data["attempt"] for c in claims] == [1, 2]
    assert claims[0].data["worker"] != claims[1].data["worker"]
    requeue = [e for e in job_events(job_id, "state") if e.data["to"] == "queued" and e.data.get("reason")]
    assert [e.data["reason"] for e in requeue] == ["heartbeat_stale"]

    # Resumed from the checkpoint: attempt 2 said so and did not retrain the epochs attempt 1 finished.
    resumed = [e for e in job_events(job_id, "checkpoint") if e.message == "resuming from checkpoint"]
    assert [e.attempt for e in resumed] == [2]
    metrics = job_events(job_id, "metric")

    def epochs(attempt: int) -> set[tuple[Any, Any, Any]]:
        return {
            (e.data.get("phase"), e.data.get("stage"), e.data["epoch"])
            for e in metrics
            if e.attempt == attempt
        }

    assert epochs(1) and epochs(2)
    assert not epochs(1) & epochs(2), (epochs(1), epochs(2))
    assert len(epochs(1) | epochs(2)) == EPOCHS_WHEN_KILLED


EPOCHS_WHEN_KILLED = 6
