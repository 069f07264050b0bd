"""A job created over HTTP runs on a real Celery worker: pending → queued → dispatched → running → done."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from integration_helpers import Stack, job_events, tiny_spec, wait_for, wait_for_status

pytestmark = pytest.mark.integration


def test_job_over_http_runs_to_completion_with_results_and_artifacts(stack: Stack, api: Any) -> None:
    stack.start_scheduler()
    stack.start_worker(concurrency=1)

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
