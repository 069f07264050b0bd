"""Recovery never waits on the broker: a lost message is re-sent, a dead worker's job re-queued, resumed."""

from __future__ import annotations

from typing import Any

import pytest
from integration_helpers import Stack, job_events, job_row, tiny_spec, wait_for, wait_for_status, worker_alive

pytestmark = pytest.mark.integration


def test_running_job_whose_worker_died_is_requeued_and_resumes(stack: Stack, api: Any) -> None:
    from app.core.config import get_settings

    stack.start_scheduler(HEARTBEAT_TIMEOUT="3")
    # Two workers (started together to share the start-up time): one gets the job and is killed.
    workers = [stack.start_worker(wait=False), stack.start_worker(wait=False)]
    for worker in workers:
        wait_for(f"{worker.name} to start", lambda w=worker: worker_alive(w.name), timeout=90, interval=0.2)
    spec = tiny_spec(epochs=EPOCHS_WHEN_KILLED, batch_size=16)  # long enough to be killed mid-way
    response = api.post("/distillation/jobs", json={**spec, "auto_start": True})
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]

    # Kill the whole worker that holds it (parent and pool process) once epoch 1 is checkpointed.
    checkpoints = get_settings().jobs_dir / job_id / "checkpoints"
    wait_for(
        "a first checkpoint",
        lambda: job_events(job_id, "metric") and checkpoints.is_dir() and any(checkpoints.iterdir()),
        timeout=120,
        interval=0.05,
    )
    running = job_row(job_id)
    assert running.status == "running"
    (holder,) = [w for w in workers if running.worker.startswith(f"{w.name}@")]
    holder.kill()

    job = wait_for_status(job_id, {"completed", "failed"}, timeout=120, stack=stack)
    assert job.status == "completed", job.error
    assert job.attempt == 2
    claims = job_events(job_id, "claim")
    assert [c.data["attempt"] for c in claims] == [1, 2]
    assert claims[0].data["worker"] != claims[1].data["worker"]
    assert not claims[1].data["worker"].startswith(f"{holder.name}@")
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


EPOCHS_WHEN_KILLED = 12
