"""Pause and resume over HTTP, for the states the API changes itself (a running job's pause is stopped by
the worker: tests/integration/test_pause.py)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.core.config import get_settings
from app.core.db import session_scope
from app.models import Job

DIGITS: dict[str, Any] = {
    "teacher_model_name": "digits-cnn",
    "target_compression": 0.25,
    "training_config": {"epochs": 2, "batch_size": 32},
    "dataset_config": {"kind": "builtin", "name": "digits"},
}


def _create(client: TestClient, **fields: Any) -> str:
    response = client.post("/distillation/jobs", json=DIGITS | fields)
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


def _set_status(job_id: str, status: str, **values: Any) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status, **values))


def _states(client: TestClient, job_id: str) -> list[tuple[str, str]]:
    events = client.get(f"/distillation/jobs/{job_id}/events").json()["data"]
    return [
        (e["data"]["from"], e["data"]["to"]) for e in events if e["kind"] == "state" and e["data"]["from"]
    ]


def test_queued_job_pauses_at_once_and_resumes_to_queued(client: TestClient) -> None:
    job_id = _create(client, auto_start=True)
    response = client.post(f"/distillation/jobs/{job_id}/pause")
    assert response.status_code == 200 and response.json()["status"] == "paused", response.text
    again = client.post(f"/distillation/jobs/{job_id}/pause")
    assert again.status_code == 200 and again.json()["status"] == "paused"
    response = client.post(f"/distillation/jobs/{job_id}/resume")
    assert response.status_code == 202 and response.json()["status"] == "queued", response.text
    assert _states(client, job_id) == [("pending", "queued"), ("queued", "paused"), ("paused", "queued")]
    assert client.post(f"/distillation/jobs/{job_id}/resume").status_code == 409


def test_running_job_goes_to_pausing_and_a_dispatched_one_is_paused(client: TestClient) -> None:
    running = _create(client, auto_start=True)
    _set_status(running, "running", lease_token="lease-1")
    response = client.post(f"/distillation/jobs/{running}/pause")
    assert response.status_code == 202 and response.json()["status"] == "pausing", response.text
    resume = client.post(f"/distillation/jobs/{running}/resume")
    assert resume.status_code == 409 and "still stopping" in resume.json()["detail"]
    dispatched = _create(client, auto_start=True)
    _set_status(dispatched, "dispatched")
    response = client.post(f"/distillation/jobs/{dispatched}/pause")
    assert response.status_code == 200 and response.json()["status"] == "paused"


def test_pause_is_refused_for_pending_cancelling_and_finished_jobs(client: TestClient, problem: Any) -> None:
    pending = _create(client)
    assert "not queued" in problem(client.post(f"/distillation/jobs/{pending}/pause"), 409)["detail"]
    for status in ("cancelling", "completed", "failed", "cancelled"):
        job_id = _create(client)
        _set_status(job_id, status)
        body = problem(client.post(f"/distillation/jobs/{job_id}/pause"), 409)
        assert body["job_status"] == status
        problem(client.post(f"/distillation/jobs/{job_id}/resume"), 409)


def test_cancel_from_paused_and_pausing(client: TestClient) -> None:
    paused = _create(client, auto_start=True)
    client.post(f"/distillation/jobs/{paused}/pause")
    response = client.post(f"/distillation/jobs/{paused}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    pausing = _create(client, auto_start=True)
    _set_status(pausing, "pausing", lease_token="lease-2")
    response = client.post(f"/distillation/jobs/{pausing}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelling"


def test_deleting_a_paused_job_removes_its_files(client: TestClient) -> None:
    job_id = _create(client, auto_start=True)
    client.post(f"/distillation/jobs/{job_id}/pause")
    checkpoint = get_settings().jobs_dir / job_id / "checkpoints" / "last.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"state")
    assert client.delete(f"/distillation/jobs/{job_id}").status_code == 204
    assert not checkpoint.parent.parent.exists()
    assert client.get(f"/distillation/jobs/{job_id}").status_code == 404


def test_resume_is_refused_when_the_queue_is_full(make_client: Any, problem: Any) -> None:
    client = make_client(max_queued_jobs=1)
    paused = _create(client, auto_start=True)
    client.post(f"/distillation/jobs/{paused}/pause")
    _create(client, auto_start=True)
    problem(client.post(f"/distillation/jobs/{paused}/resume"), 429)
    assert client.get(f"/distillation/jobs/{paused}").json()["status"] == "paused"


def test_pause_and_resume_replay_with_an_idempotency_key(client: TestClient) -> None:
    job_id = _create(client, auto_start=True)
    first = client.post(f"/distillation/jobs/{job_id}/pause", headers={"Idempotency-Key": "p-1"})
    assert first.status_code == 200 and first.json()["status"] == "paused"
    resumed = client.post(f"/distillation/jobs/{job_id}/resume", headers={"Idempotency-Key": "r-1"})
    assert resumed.status_code == 202 and resumed.json()["status"] == "queued", resumed.text
    again = client.post(f"/distillation/jobs/{job_id}/resume", headers={"Idempotency-Key": "r-1"})
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == resumed.json(), "a retried resume replays its first answer instead of a 409"
    assert (
        client.post(f"/distillation/jobs/{job_id}/resume", headers={"Idempotency-Key": "r-2"}).status_code
        == 409
    )
    assert _states(client, job_id).count(("paused", "queued")) == 1
