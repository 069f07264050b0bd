"""Pause and resume with a real worker: a paused job frees its slot for a queued job, keeps its checkpoint,
and, resumed, completes without repeating a finished epoch (compared in its metric events)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from integration_helpers import Stack, job_events, job_row, tiny_spec, wait_for, wait_for_status

pytestmark = pytest.mark.integration

EPOCHS = 8
LONG = {"epochs": EPOCHS, "batch_size": 16}


@pytest.fixture()
def one_slot_api(auth_headers: dict[str, str]) -> Iterator[TestClient]:
    """The real app with MAX_CONCURRENT_JOBS=1 (its admissions after a start or resume use it)."""
    from app.core.config import Settings
    from app.main import create_app

    with TestClient(create_app(Settings(max_concurrent_jobs=1)), headers=auth_headers) as client:
        yield client


def _start(api: Any, **training: Any) -> str:
    response = api.post("/distillation/jobs", json={**tiny_spec(**training), "auto_start": True})
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


def _metric_epochs(job_id: str, attempt: int) -> list[int]:
    return [e.data["epoch"] for e in job_events(job_id, "metric") if e.attempt == attempt]


def test_pause_frees_the_slot_and_resume_repeats_no_epoch(stack: Stack, one_slot_api: TestClient) -> None:
    api = one_slot_api
    stack.start_worker(concurrency=2, MAX_CONCURRENT_JOBS="1")  # capacity 2, but one slot
    paused = _start(api, **LONG)
    waiting = _start(api, epochs=1)
    wait_for(
        "the long job to finish an epoch",
        lambda: job_row(paused).status == "running" and _metric_epochs(paused, 1),
        timeout=120,
    )
    assert job_row(waiting).status == "queued", "one slot: the second job waits"

    response = api.post(f"/distillation/jobs/{paused}/pause")
    assert response.status_code == 202 and response.json()["status"] == "pausing", response.text
    job = wait_for_status(paused, {"paused"}, timeout=30, stack=stack)
    assert job.lease_token is None and job.finished_at is None and job.results is None
    from app.core.config import get_settings

    checkpoints = get_settings().jobs_dir / paused / "checkpoints"
    assert any(checkpoints.iterdir()), "the checkpoint is kept"
    done_before = _metric_epochs(paused, 1)
    assert done_before and max(done_before) < EPOCHS, done_before

    # Its slot went to the queued job, which completes while the first one rests.
    assert wait_for_status(waiting, {"completed"}, timeout=90, stack=stack).results is not None
    assert job_row(paused).status == "paused"
    assert _metric_epochs(paused, 1) == done_before, "nothing trains while paused"

    response = api.post(f"/distillation/jobs/{paused}/resume")
    assert response.status_code == 202 and response.json()["status"] == "queued", response.text
    job = wait_for_status(paused, {"completed", "failed"}, timeout=120, stack=stack)
    assert job.status == "completed", job.error
    assert job.attempt == 2 and job.pause_count == 1
    (resumed,) = [e for e in job_events(paused, "checkpoint") if e.message == "resuming from checkpoint"]
    assert resumed.attempt == 2 and resumed.data["epoch"] == max(done_before)
    after = _metric_epochs(paused, 2)
    assert after == list(range(max(done_before) + 1, EPOCHS + 1)), (done_before, after)
    assert sorted(done_before + after) == list(range(1, EPOCHS + 1)), "every epoch trained exactly once"
    history = [h["epoch"] for h in job.results["training_history"]]
    assert history == list(range(1, EPOCHS + 1))
    states = [(e.data["from"], e.data["to"]) for e in job_events(paused, "state") if e.data.get("from")]
    assert ("running", "pausing") in states and ("pausing", "paused") in states
    assert ("paused", "queued") in states and states[-1] == ("running", "completed")
