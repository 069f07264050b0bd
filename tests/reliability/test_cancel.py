"""Cancel: a running job stops at its next check and keeps its checkpoint and history; a queued job is
cancelled at once; a finished job answers 409."""

from __future__ import annotations

import time
from typing import Any

import pytest
from integration_helpers import Stack, job_events, job_row, tiny_spec, wait_for_status
from reliability_helpers import wait_for_checkpoint

pytestmark = pytest.mark.integration


def _start(api: Any, **training: Any) -> str:
    response = api.post("/distillation/jobs", json={**tiny_spec(**training), "auto_start": True})
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


def test_cancel_running_queued_and_finished_jobs(stack: Stack, api: Any) -> None:
    from app.core.config import get_settings

    assert get_settings().max_concurrent_jobs == 2
    stack.start_worker(concurrency=2)
    finished = _start(api, epochs=1)
    assert wait_for_status(finished, {"completed"}, timeout=90, stack=stack).results is not None
    running = [_start(api, epochs=40, batch_size=16) for _ in range(2)]
    for job_id in running:
        wait_for_checkpoint(job_id, 1)
    queued = _start(api, epochs=1)
    assert job_row(queued).status == "queued", "two running jobs fill MAX_CONCURRENT_JOBS"

    response = api.post(f"/distillation/jobs/{queued}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
    assert job_row(queued).status == "cancelled" and job_row(queued).attempt == 0

    target = running[0]
    requested = time.monotonic()
    response = api.post(f"/distillation/jobs/{target}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelling", response.text
    job = wait_for_status(target, {"cancelled"}, timeout=15, stack=stack)
    latency = time.monotonic() - requested
    assert job.results is None and job.error is None and job.finished_at is not None
    # Its last checkpoint and its history so far stay, so the work done is not lost.
    checkpoints = get_settings().jobs_dir / target / "checkpoints"
    assert checkpoints.is_dir() and any(checkpoints.iterdir())
    metrics = job_events(target, "metric")
    assert 1 <= len(metrics) < 40 and all("epoch" in e.data for e in metrics)
    assert job_events(target, "state")[-1].data["to"] == "cancelled"
    assert job_row(running[1]).status == "running", f"only {target} was cancelled ({latency:.1f} s)"

    api.post(f"/distillation/jobs/{running[1]}/cancel")
    wait_for_status(running[1], {"cancelled"}, timeout=15, stack=stack)
    for job_id, status in ((finished, "completed"), (target, "cancelled")):
        response = api.post(f"/distillation/jobs/{job_id}/cancel")
        assert response.status_code == 409, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert job_row(job_id).status == status
