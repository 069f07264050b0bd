"""Jobs over HTTP: create, start, read, list, cancel, delete, events and artifacts, with every error."""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.core.config import get_settings
from app.core.db import session_scope
from app.models import Artifact, Job, JobEvent, JobStatus

DIGITS: dict[str, Any] = {
    "teacher_model_name": "digits-cnn",
    "target_compression": 0.25,
    "distillation_method": "response_distillation",
    "task": "classification",
    "training_config": {"epochs": 2, "batch_size": 32, "temperature": 4.0, "alpha": 0.7},
    "dataset_config": {"kind": "builtin", "name": "digits"},
}
# A text task names a transformers teacher (digits-cnn with a text task is refused at create).
TEXT_TEACHER: dict[str, Any] = {"teacher_model_name": "bert-large", "task": "sequence-classification"}


def _create(client: TestClient, **overrides: Any) -> dict[str, Any]:
    response = client.post("/distillation/jobs", json=DIGITS | overrides)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _set_status(job_id: str, status: str, **values: Any) -> None:
    """Put a job in a state only the scheduler or a worker reaches (those are tested in integration)."""
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status, **values))


# --------------------------------------------------------------------------------------------- create


def test_create_returns_pending_job_with_spec_and_location(client: TestClient) -> None:
    response = client.post("/distillation/jobs", json=DIGITS)
    assert response.status_code == 201
    job = response.json()
    assert job["status"] == "pending"
    assert response.headers["location"] == f"/distillation/jobs/{job['job_id']}"
    assert job["spec"]["training_config"]["epochs"] == 2
    assert job["spec"]["training_config"]["learning_rate"] == 1e-3  # defaults filled in
    assert job["progress"] == 0 and job["attempt"] == 0 and job["queued_at"] is None
    assert client.get(f"/distillation/jobs/{job['job_id']}").json()["spec"] == job["spec"]


def test_create_with_auto_start_queues_the_job(client: TestClient) -> None:
    job = _create(client, auto_start=True)
    assert job["status"] == "queued"
    assert job["queued_at"] is not None
    assert "auto_start" not in job["spec"]


@pytest.mark.parametrize(
    ("patch", "field", "bound"),
    [
        ({"training_config": {"temperature": 20}}, "training_config.temperature", "10"),
        ({"training_config": {"alpha": 1.5}}, "training_config.alpha", "1"),
        ({"target_compression": 1.0}, "target_compression", "1"),
        ({"target_compression": 0}, "target_compression", "0"),
        ({"training_config": {"epochs": 0}}, "training_config.epochs", "1"),
    ],
)
def test_bad_spec_gets_422_naming_the_field_and_its_bound(
    client: TestClient, problem: Any, patch: dict[str, Any], field: str, bound: str
) -> None:
    body = problem(client.post("/distillation/jobs", json=DIGITS | patch), 422)
    fields = [e["field"] for e in body["errors"]]
    assert fields == [field]
    assert bound in body["errors"][0]["msg"]
    assert field in body["detail"]


def test_unknown_field_is_rejected(client: TestClient, problem: Any) -> None:
    body = problem(client.post("/distillation/jobs", json=DIGITS | {"learning_rate": 0.1}), 422)
    assert body["errors"][0]["field"] == "learning_rate"
    assert "Extra inputs" in body["errors"][0]["msg"]


def test_unknown_teacher_gets_422_listing_the_valid_ones(client: TestClient, problem: Any) -> None:
    body = problem(client.post("/distillation/jobs", json=DIGITS | {"teacher_model_name": "gpt-9"}), 422)
    assert {"digits-cnn", "bert-large", "roberta-large", "gpt2-medium"} <= set(body["valid_teachers"])
    assert body["errors"][0]["field"] == "teacher_model_name"
    assert "digits-cnn" in body["detail"] and "gpt-9" in body["detail"]


def test_epochs_and_batch_size_are_capped_by_settings(make_client: Any, problem: Any) -> None:
    client = make_client(max_epochs=5, max_batch_size=16)
    spec = DIGITS | {"training_config": {"epochs": 6, "batch_size": 32}}
    body = problem(client.post("/distillation/jobs", json=spec), 422)
    assert [e["field"] for e in body["errors"]] == ["training_config.epochs", "training_config.batch_size"]
    assert "5 (MAX_EPOCHS)" in body["errors"][0]["msg"]
    assert "16 (MAX_BATCH_SIZE)" in body["errors"][1]["msg"]
    ok = DIGITS | {"training_config": {"epochs": 5, "batch_size": 16}}
    assert client.post("/distillation/jobs", json=ok).status_code == 201


def test_unknown_uploaded_dataset_names_the_list_endpoint(client: TestClient, problem: Any) -> None:
    spec = DIGITS | {"dataset_config": {"kind": "uploaded", "dataset_id": "no-such-id"}}
    body = problem(client.post("/distillation/jobs", json=spec), 422)
    assert body["errors"][0]["field"] == "dataset_config.dataset_id"
    assert "GET /distillation/datasets" in body["detail"]


def _file_root_dir() -> Path:
    folder = get_settings().file_root / "files" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    return folder


def test_file_dataset_must_exist_under_the_allowed_root(
    client: TestClient, problem: Any, tmp_path: Path
) -> None:
    folder = _file_root_dir()
    good = folder / "train.csv"
    good.write_text("text,label\nhi,1\n")
    outside = tmp_path / "secret.csv"
    outside.write_text("text,label\nx,0\n")
    (folder / "escape.csv").symlink_to(outside)

    def spec(path: str) -> dict[str, Any]:
        return DIGITS | {"dataset_config": {"kind": "file", "path": path}}

    cases = {
        str(outside): "outside the allowed root",
        str(folder / "escape.csv"): "outside the allowed root",  # symlink followed
        str(folder / ".." / ".." / ".." / "etc" / "passwd"): "outside the allowed root",
        str(folder / "missing.csv"): "No file or directory at",
    }
    for path, message in cases.items():
        body = problem(client.post("/distillation/jobs", json=spec(path) | TEXT_TEACHER), 422)
        assert body["errors"][0]["field"] == "dataset_config.path"
        assert message in body["detail"], path
    relative = str(good.relative_to(get_settings().file_root))
    job = _create(client, **TEXT_TEACHER, dataset_config={"kind": "file", "path": relative})
    assert job["spec"]["dataset_config"]["path"] == relative  # stored relative to the root, never absolute


# --------------------------------------------------------------------------------------------- start


def test_start_queues_a_pending_job_and_records_an_event(client: TestClient, problem: Any) -> None:
    job = _create(client)
    response = client.post(f"/distillation/jobs/{job['job_id']}/start")
    assert response.status_code == 202
    started = response.json()
    assert started["status"] == "queued"
    assert started["queued_at"] is not None
    events = client.get(f"/distillation/jobs/{job['job_id']}/events").json()["data"]
    assert [e["data"]["to"] for e in events if e["kind"] == "state"] == ["pending", "queued"]
    body = problem(client.post(f"/distillation/jobs/{job['job_id']}/start"), 409)
    assert body["job_status"] == "queued"


def test_start_of_unknown_job_is_404(client: TestClient, problem: Any) -> None:
    problem(client.post(f"/distillation/jobs/{uuid.uuid4()}/start"), 404)


def test_start_answers_429_with_retry_after_when_the_queue_is_full(make_client: Any, problem: Any) -> None:
    client = make_client(max_queued_jobs=2, tick_seconds=3)
    jobs = [_create(client) for _ in range(3)]
    for job in jobs[:2]:
        assert client.post(f"/distillation/jobs/{job['job_id']}/start").status_code == 202
    response = client.post(f"/distillation/jobs/{jobs[2]['job_id']}/start")
    body = problem(response, 429)
    assert response.headers["retry-after"] == "3"
    assert body["max_queued_jobs"] == 2
    assert client.get(f"/distillation/jobs/{jobs[2]['job_id']}").json()["status"] == "pending"
    problem(client.post("/distillation/jobs", json=DIGITS | {"auto_start": True}), 429)
    # A queued job admitted by the scheduler frees a place.
    _set_status(jobs[0]["job_id"], JobStatus.dispatched)
    assert client.post(f"/distillation/jobs/{jobs[2]['job_id']}/start").status_code == 202


# --------------------------------------------------------------------------------------------- read


def test_get_unknown_job_is_404_problem(client: TestClient, problem: Any) -> None:
    body = problem(client.get("/distillation/jobs/nope"), 404)
    assert body["instance"] == "/distillation/jobs/nope"


def test_running_job_shows_progress_eta_metrics_and_estimated_completion(client: TestClient) -> None:
    job = _create(client)
    now = datetime.now(UTC)
    _set_status(
        job["job_id"],
        JobStatus.running,
        progress=42.5,
        phase="distill",
        eta_seconds=120.0,
        attempt=1,
        started_at=now,
        heartbeat_at=now,
        metrics={"epoch": 3, "student_accuracy": 0.81},
    )
    body = client.get(f"/distillation/jobs/{job['job_id']}").json()
    assert body["status"] == "running" and body["progress"] == 42.5 and body["phase"] == "distill"
    assert body["metrics"] == {"epoch": 3, "student_accuracy": 0.81}
    eta = datetime.fromisoformat(body["estimated_completion"]) - now
    assert 110 <= eta.total_seconds() <= 200
    assert body["started_at"] is not None and body["heartbeat_at"] is not None and body["attempt"] == 1


def test_failed_job_shows_its_error(client: TestClient) -> None:
    job = _create(client)
    _set_status(job["job_id"], JobStatus.failed, error={"code": "nan_loss", "message": "loss became NaN"})
    body = client.get(f"/distillation/jobs/{job['job_id']}").json()
    assert body["error"] == {"code": "nan_loss", "message": "loss became NaN"}
    assert body["estimated_completion"] is None


def test_list_pages_round_trip_newest_first(client: TestClient) -> None:
    created = [_create(client)["job_id"] for _ in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/distillation/jobs", params=params).json()
        pages += 1
        seen += [j["job_id"] for j in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert pages == 3
    assert seen == list(reversed(created))


def test_a_listed_job_shows_what_its_read_shows(client: TestClient) -> None:
    """A page's summaries (progress bounded, no metadata as {}, the error with its extra fields) agree with
    each job's own read."""
    over, under, failed = (_create(client)["job_id"] for _ in range(3))
    _set_status(over, JobStatus.running, progress=130.0, job_metadata=None)
    _set_status(under, JobStatus.running, progress=-4.0, job_metadata={"team": "vision"})
    error = {"code": "nan_loss", "message": "loss became NaN", "epoch": 3}
    _set_status(failed, JobStatus.failed, error=error)
    listed = {j["job_id"]: j for j in client.get("/distillation/jobs").json()["data"]}
    assert (listed[over]["progress"], listed[over]["metadata"]) == (100.0, {})
    assert (listed[under]["progress"], listed[under]["metadata"]) == (0.0, {"team": "vision"})
    assert listed[failed]["error"] == error
    for job_id, summary in listed.items():
        read = client.get(f"/distillation/jobs/{job_id}").json()
        assert {k: read[k] for k in summary if k in read} == {k: v for k, v in summary.items() if k in read}


def test_list_filters_by_status_and_teacher(client: TestClient) -> None:
    pending = _create(client)["job_id"]
    queued = _create(client, auto_start=True)["job_id"]
    by_status = client.get("/distillation/jobs", params={"status": "queued"}).json()["data"]
    assert [j["job_id"] for j in by_status] == [queued]
    both = client.get("/distillation/jobs", params=[("status", "queued"), ("status", "pending")]).json()
    assert {j["job_id"] for j in both["data"]} == {pending, queued}
    assert client.get("/distillation/jobs", params={"teacher": "bert-large"}).json()["data"] == []
    assert len(client.get("/distillation/jobs", params={"teacher": "digits-cnn"}).json()["data"]) == 2


def test_list_rejects_a_bad_cursor_limit_or_status(client: TestClient, problem: Any) -> None:
    body = problem(client.get("/distillation/jobs", params={"cursor": "not-a-cursor"}), 422)
    assert "cursor" in body["detail"]
    body = problem(client.get("/distillation/jobs", params={"limit": 500}), 422)
    assert body["errors"][0]["field"] == "limit" and "200" in body["errors"][0]["msg"]
    body = problem(client.get("/distillation/jobs", params={"status": "sleeping"}), 422)
    assert body["errors"][0]["field"].startswith("status")


# --------------------------------------------------------------------------------------------- cancel


def test_cancel_pending_and_queued_jobs_at_once(client: TestClient) -> None:
    for job in (_create(client), _create(client, auto_start=True)):
        response = client.post(f"/distillation/jobs/{job['job_id']}/cancel")
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        assert response.json()["finished_at"] is not None


def test_cancel_running_job_asks_the_worker_and_is_idempotent(client: TestClient) -> None:
    job = _create(client)
    _set_status(job["job_id"], JobStatus.running, attempt=1)
    first = client.post(f"/distillation/jobs/{job['job_id']}/cancel")
    assert first.status_code == 202 and first.json()["status"] == "cancelling"
    again = client.post(f"/distillation/jobs/{job['job_id']}/cancel")
    assert again.status_code == 202 and again.json()["status"] == "cancelling"
    events = client.get(f"/distillation/jobs/{job['job_id']}/events").json()["data"]
    assert [e["data"]["to"] for e in events if e["kind"] == "state"] == ["pending", "cancelling"]


def test_cancel_dispatched_job_goes_to_cancelling(client: TestClient) -> None:
    job = _create(client)
    _set_status(job["job_id"], JobStatus.dispatched)
    assert client.post(f"/distillation/jobs/{job['job_id']}/cancel").json()["status"] == "cancelling"


@pytest.mark.parametrize("status", [JobStatus.completed, JobStatus.failed, JobStatus.cancelled])
def test_cancel_finished_job_is_409(client: TestClient, problem: Any, status: str) -> None:
    job = _create(client)
    _set_status(job["job_id"], status)
    body = problem(client.post(f"/distillation/jobs/{job['job_id']}/cancel"), 409)
    assert body["job_status"] == status


# --------------------------------------------------------------------------------------------- delete


def _add_artifact(job_id: str, name: str, content: bytes) -> Path:
    folder = get_settings().jobs_dir / job_id / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    with session_scope() as session:
        session.add(
            Artifact(
                job_id=job_id,
                name=name,
                path=str(path),
                size_bytes=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                media_type="application/json" if name.endswith(".json") else "application/octet-stream",
            )
        )
    return path


@pytest.mark.parametrize(
    "status", [JobStatus.pending, JobStatus.queued, JobStatus.running, JobStatus.cancelling]
)
def test_delete_unfinished_job_is_409(client: TestClient, problem: Any, status: str) -> None:
    job = _create(client)
    _set_status(job["job_id"], status)
    problem(client.delete(f"/distillation/jobs/{job['job_id']}"), 409)
    assert client.get(f"/distillation/jobs/{job['job_id']}").status_code == 200


def test_delete_finished_job_removes_row_events_artifacts_and_files(client: TestClient, problem: Any) -> None:
    job_id = _create(client)["job_id"]
    _set_status(job_id, JobStatus.completed)
    artifact = _add_artifact(job_id, "results.json", b"{}")
    checkpoint = get_settings().jobs_dir / job_id / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"x")
    response = client.delete(f"/distillation/jobs/{job_id}")
    assert response.status_code == 204 and response.content == b""
    problem(client.get(f"/distillation/jobs/{job_id}"), 404)
    assert not artifact.exists() and not checkpoint.exists()
    assert not (get_settings().jobs_dir / job_id).exists()
    with session_scope() as session:
        assert (
            session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)) == 0
        )
        assert (
            session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)) == 0
        )
    problem(client.delete(f"/distillation/jobs/{job_id}"), 404)


# --------------------------------------------------------------------------------------------- events


def test_events_page_in_id_order(client: TestClient, problem: Any) -> None:
    job_id = _create(client)["job_id"]
    with session_scope() as session:
        for epoch in range(1, 6):
            session.add(
                JobEvent(job_id=job_id, kind="metric", message=f"epoch {epoch}", data={"epoch": epoch})
            )
    seen: list[int] = []
    after = 0
    while True:
        page = client.get(f"/distillation/jobs/{job_id}/events", params={"after": after, "limit": 2}).json()
        seen += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            break
        after = int(page["next_cursor"])
    assert seen == sorted(seen) and len(seen) == 6  # the 'created' state event plus 5 metrics
    metrics = client.get(f"/distillation/jobs/{job_id}/events", params={"after": seen[0]}).json()["data"]
    assert [e["data"]["epoch"] for e in metrics] == [1, 2, 3, 4, 5]
    problem(client.get(f"/distillation/jobs/{uuid.uuid4()}/events"), 404)
    problem(client.get(f"/distillation/jobs/{job_id}/events", params={"after": -1}), 422)


# --------------------------------------------------------------------------------------------- artifacts


def test_artifacts_list_and_download(client: TestClient, problem: Any) -> None:
    job_id = _create(client)["job_id"]
    _set_status(job_id, JobStatus.completed)
    weights = os.urandom(2048)
    _add_artifact(job_id, "student.safetensors", weights)
    _add_artifact(job_id, "results.json", b'{"teacher_accuracy": 0.98}')
    listed = client.get(f"/distillation/jobs/{job_id}/artifacts").json()
    assert [a["name"] for a in listed] == ["results.json", "student.safetensors"]
    entry = listed[1]
    assert entry["size_bytes"] == 2048 and entry["sha256"] == hashlib.sha256(weights).hexdigest()
    download = client.get(entry["url"])
    assert download.status_code == 200 and download.content == weights
    assert download.headers["x-content-sha256"] == entry["sha256"]
    assert client.get(listed[0]["url"]).json() == {"teacher_accuracy": 0.98}
    body = problem(client.get(f"/distillation/jobs/{job_id}/artifacts/student.pt2"), 404)
    assert body["artifacts"] == ["results.json", "student.safetensors"]
    (get_settings().jobs_dir / job_id / "artifacts" / "results.json").unlink()
    problem(client.get(listed[0]["url"]), 404)
    problem(client.get(f"/distillation/jobs/{uuid.uuid4()}/artifacts"), 404)


def test_start_asks_for_admission_at_once(clean_database: str, auth_headers: dict[str, str]) -> None:
    """With the wake-up on (as in production), a start is admitted before the scheduler's next tick."""
    from app.core.config import Settings
    from app.main import create_app

    app = create_app(Settings(max_concurrent_jobs=1, tick_seconds=3600))
    with TestClient(app, headers=auth_headers) as client:
        first = _create(client, auto_start=True)["job_id"]
        second = _create(client)["job_id"]
        assert client.post(f"/distillation/jobs/{second}/start").json()["status"] == "queued"
        # The background wake-up ran after each response: the first job was admitted, the second waits.
        assert client.get(f"/distillation/jobs/{first}").json()["status"] == "dispatched"
        assert client.get(f"/distillation/jobs/{second}").json()["status"] == "queued"
