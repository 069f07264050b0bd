"""Jobs over HTTP on a real Celery worker (capacity 4) and scheduler: the contract's path, the limit, re-send.

One worker process serves the whole module (it takes ~10 s to start); each test starts its own scheduler.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from integration_helpers import Proc, Stack, job_events, job_row, tiny_spec, wait_for, wait_for_status

pytestmark = pytest.mark.integration


@pytest.fixture()
def service(stack: Stack, shared_worker: Proc) -> Iterator[Stack]:
    """The test's stack, with the module's worker in its logs."""
    stack.shared.append(shared_worker)
    yield stack


def test_job_over_http_runs_to_completion_with_results_and_artifacts(service: Stack, api: Any) -> None:
    stack = service
    stack.start_scheduler()

    created = api.post("/distillation/jobs", json=tiny_spec())
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    assert created.json()["status"] == "pending"

    started = api.post(f"/distillation/jobs/{job_id}/start")
    assert started.status_code == 202, started.text
    assert started.json()["status"] == "queued"

    # Watch it over HTTP until it ends; every status seen must be on the contract's path.
    seen: list[str] = []

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = api.get(f"/distillation/jobs/{job_id}").json()
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        return body if body["status"] in {"completed", "failed", "cancelled"} else None

    try:
        job = wait_for("the job to finish", finished, timeout=120, interval=0.05)
    except AssertionError:
        print(stack.logs())
        raise
    assert job["status"] == "completed", (job["error"], stack.logs())
    assert set(seen) <= {"queued", "dispatched", "running", "completed"}
    assert job["attempt"] == 1 and job["progress"] == 100
    assert job["started_at"] and job["finished_at"] and job["started_at"] <= job["finished_at"]

    # The stored history shows each transition of the contract, in order.
    transitions = [event.data["to"] for event in job_events(job_id, "state")]
    assert transitions == ["pending", "queued", "dispatched", "running", "completed"]
    (claim,) = job_events(job_id, "claim")
    assert claim.data["attempt"] == 1 and claim.data["worker"]
    assert job_events(job_id, "metric"), "per-epoch metric events were written"

    # Real, measured results.
    results = job["results"]
    assert 0.0 < results["final_student_accuracy"] <= 1.0
    assert 0.0 < results["teacher_accuracy"] <= 1.0
    assert 0 < results["compressed_parameters"] < results["original_parameters"]

    # Every artifact downloads with the stored size and sha256.
    listing = api.get(f"/distillation/jobs/{job_id}/artifacts")
    assert listing.status_code == 200
    artifacts = {item["name"]: item for item in listing.json()}
    assert {"student.safetensors", "student_config.json", "results.json", "student.pt2"} <= set(artifacts)
    for name, item in artifacts.items():
        download = api.get(f"/distillation/jobs/{job_id}/artifacts/{name}")
        assert download.status_code == 200, name
        assert len(download.content) == item["size_bytes"]
        assert hashlib.sha256(download.content).hexdigest() == item["sha256"]
    assert wait_for_status(job_id, {"completed"}, timeout=1).results == results


def test_bad_spec_gets_a_precise_422(api: Any, empty_jobs: None) -> None:
    spec = tiny_spec()
    spec["target_compression"] = 1.5
    response = api.post("/distillation/jobs", json=spec)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "target_compression" in response.text


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (an end before a start at the same instant)."""
    points = [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals]
    open_now = best = 0
    for _, delta in sorted(points, key=lambda p: (p[0], p[1])):
        open_now += delta
        best = max(best, open_now)
    return best


def test_six_jobs_run_two_at_a_time_in_queued_order(service: Stack, api: Any) -> None:
    from app.core.config import get_settings

    stack = service  # the module's worker has capacity 4: only the limit keeps it at 2
    assert get_settings().max_concurrent_jobs == 2  # the default; the API admits under it too
    stack.start_scheduler(MAX_CONCURRENT_JOBS="2")

    job_ids = []
    for _ in range(6):
        response = api.post("/distillation/jobs", json=tiny_spec())
        assert response.status_code == 201, response.text
        job_ids.append(response.json()["job_id"])
    for job_id in job_ids:  # started at once, one after the other
        assert api.post(f"/distillation/jobs/{job_id}/start").status_code == 202

    jobs = [wait_for_status(job_id, {"completed", "failed"}, timeout=240, stack=stack) for job_id in job_ids]
    assert [job.status for job in jobs] == ["completed"] * 6, [job.error for job in jobs]

    intervals = [(job.started_at, job.finished_at) for job in jobs]
    assert _max_overlap(intervals) == 2, intervals

    # Admission follows queued_at: the order of the queued → dispatched events is the start order.
    assert [job.queued_at for job in jobs] == sorted(job.queued_at for job in jobs)
    dispatch_event_ids = [
        next(e.id for e in job_events(job.id, "state") if e.data["to"] == "dispatched") for job in jobs
    ]
    assert dispatch_event_ids == sorted(dispatch_event_ids)
    assert [job_row(job_id).attempt for job_id in job_ids] == [1] * 6


def test_dispatched_job_whose_message_was_lost_is_resent(
    service: Stack, auth_headers: dict[str, str]
) -> None:
    from fastapi.testclient import TestClient

    from app.core.config import get_settings
    from app.core.db import session_scope
    from app.main import create_app
    from app.services.scheduler import admit_queued_jobs

    with TestClient(
        create_app(wake_scheduler=False), headers=auth_headers
    ) as api:  # this API never admits or sends
        response = api.post("/distillation/jobs", json={**tiny_spec(), "auto_start": True})
        assert response.status_code == 201, response.text
        job_id = response.json()["job_id"]
    with session_scope() as session:  # admitted and committed, but the message is never sent: "lost"
        assert admit_queued_jobs(session, get_settings()) == [job_id]
    assert job_row(job_id).status == "dispatched"  # the live worker got no message to claim

    service.start_scheduler(DISPATCH_TIMEOUT="1")
    job = wait_for_status(job_id, {"completed", "failed"}, timeout=120, stack=service)
    assert job.status == "completed", job.error
    (resend, *_) = job_events(job_id, "dispatch")
    assert resend.message.startswith("re-sent")
    assert job.attempt == 1
