"""POST /distillation/jobs/estimate: sizes, FLOPs and expected seconds from measured history, basis stated;
the same estimate is stored on each job at create."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.core.db import session_scope
from app.models import Job, Teacher, utcnow
from app.services import heartbeats

DIGITS: dict[str, Any] = {
    "teacher_model_name": "digits-cnn",
    "target_compression": 0.25,
    "training_config": {"epochs": 4, "batch_size": 32, "device": "cpu"},
    "dataset_config": {"kind": "builtin", "name": "digits"},
}


def _finished(
    *,
    device: str,
    flops_per_second: float,
    teacher_parameters: int = 846826,
    features: dict[str, float] | None = None,
    seconds: float = 5.0,
) -> None:
    """A completed job as the worker leaves it: its estimate with what it measured."""
    now = utcnow()
    extra = {"features": features} if features else {}
    with session_scope() as session:
        session.add(
            Job(
                spec=DIGITS,
                teacher_model_name="digits-cnn",
                status="completed",
                created_at=now,
                updated_at=now,
                finished_at=now,
                estimate={
                    "task": "classification",
                    "teacher_model_name": "digits-cnn",
                    "actual": {
                        "device_type": device,
                        "teacher_parameters": teacher_parameters,
                        "flops_per_second": flops_per_second,
                        "training_seconds": seconds,
                        **extra,
                    },
                },
            )
        )


def _estimate(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/distillation/jobs/estimate", json=DIGITS | fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_without_a_teacher_size_it_says_why_there_is_no_figure(client: TestClient) -> None:
    with session_scope() as session:
        params = session.scalar(select(Teacher.params).where(Teacher.name == "digits-cnn"))
        session.execute(update(Teacher).where(Teacher.name == "digits-cnn").values(params=None))
    try:
        body = _estimate(client)
    finally:
        with session_scope() as session:
            session.execute(update(Teacher).where(Teacher.name == "digits-cnn").values(params=params))
    assert body["expected_training_seconds"] is None and body["flops"] is None
    assert body["basis"].startswith("no estimate: unknown the parameter count of teacher 'digits-cnn'")
    assert (body["dataset_rows"], body["train_rows"], body["val_rows"]) == (1797, 1294, 144)
    assert client.get("/distillation/jobs").json()["data"] == [], "an estimate stores nothing"


def test_a_registered_teacher_size_with_no_history_gives_the_flop_count_only(make_client: Any) -> None:
    body = _estimate(make_client(estimate_default_flops_per_second=1e9))
    assert body["teacher_parameters"] and body["parameters_source"] == "registry"
    assert body["basis"].startswith("no history: FLOP count only")
    assert body["expected_training_seconds"] == body["flops"] / 1e9


def test_measured_history_of_the_same_task_device_and_size_gives_the_figure(client: TestClient) -> None:
    _finished(device="cpu", flops_per_second=1e11)
    _finished(device="cpu", flops_per_second=3e11)
    _finished(device="cpu", flops_per_second=2e11, teacher_parameters=100_000_000)  # not similar in size
    _finished(device="cuda", flops_per_second=9e12)
    body = _estimate(client)
    assert body["parameters_source"] == "registry"
    assert body["student_parameters"] == round(body["teacher_parameters"] * 0.25)
    assert body["history_jobs"] == 2 and body["flops_per_second"] == 2e11
    assert "2 finished jobs (same task, device type and teacher size" in body["basis"]
    assert abs(body["expected_training_seconds"] - body["flops"] / 2e11) < 1e-9
    low, high = body["expected_training_seconds_range"]
    assert low < body["expected_training_seconds"] < high
    # Twice the epochs: twice the student's FLOPs; the teacher's outputs are cached once either way.
    longer = _estimate(client, training_config=DIGITS["training_config"] | {"epochs": 8})
    assert 1.5 * body["flops"] < longer["flops"] < 2 * body["flops"]
    uncached = _estimate(
        client, training_config=DIGITS["training_config"] | {"epochs": 8, "teacher_cache": "off"}
    )
    assert uncached["flops"] > longer["flops"]
    # A device with no history of its own falls back to the FLOP count alone.
    cuda = _estimate(client, training_config=DIGITS["training_config"] | {"device": "cuda"})
    assert cuda["history_jobs"] == 1 and cuda["flops_per_second"] == 9e12
    _finished(device="cpu", flops_per_second=1e11)
    baseline = _estimate(client, training_config=DIGITS["training_config"] | {"baseline": True})
    assert [r["run"] for r in baseline["runs"]] == ["baseline", "stage 1"]


def test_no_history_on_this_device_uses_the_flop_count_only(make_client: Any) -> None:
    _finished(device="cuda", flops_per_second=9e12)
    client = make_client(estimate_default_flops_per_second=1e9)
    body = _estimate(client)
    assert body["basis"].startswith("no history: FLOP count only")
    assert body["history_jobs"] == 0 and body["expected_training_seconds"] == body["flops"] / 1e9


def test_estimate_checks_the_spec_like_create(client: TestClient, problem: Any) -> None:
    body = problem(
        client.post("/distillation/jobs/estimate", json=DIGITS | {"teacher_model_name": "nope"}), 422
    )
    assert "teacher_model_name" in body["detail"]
    problem(client.post("/distillation/jobs/estimate", json=DIGITS | {"target_compression": 2}), 422)


def test_create_stores_the_estimate_on_the_job(client: TestClient) -> None:
    _finished(device="cpu", flops_per_second=2e11)
    expected = _estimate(client)["expected_training_seconds"]
    # A pending create (the one-statement path on PostgreSQL) stores it right after its answer ...
    job = client.post("/distillation/jobs", json=DIGITS).json()
    stored = client.get(f"/distillation/jobs/{job['job_id']}").json()["estimate"]
    assert stored["history_jobs"] == 1 and stored["expected_training_seconds"] == expected
    # ... and a queued create (the full path) in its own transaction.
    queued = client.post("/distillation/jobs", json=DIGITS | {"auto_start": True}).json()
    assert queued["estimate"]["expected_training_seconds"] == expected


def test_each_create_stores_the_estimate_of_the_state_it_was_made_in(client: TestClient) -> None:
    """The one-statement create makes its estimate from what the previous create read, and its statement
    checks those inputs: a job finishing, a teacher re-sized or a GPU worker appearing in between is in
    the next job's estimate, never the previous state's."""

    def create() -> dict[str, Any]:
        job = client.post("/distillation/jobs", json=DIGITS | {"training_config": {"epochs": 4}}).json()
        stored = client.get(f"/distillation/jobs/{job['job_id']}").json()["estimate"]
        assert stored == job["estimate"]  # the answer is what was stored
        return dict(stored)

    first = create()
    assert first["history_jobs"] == 0 and first["device_type"] == "cpu"
    assert create() == first  # nothing changed: the same estimate, from the remembered inputs
    _finished(device="cpu", flops_per_second=2e11)
    after_one = create()
    assert after_one["history_jobs"] == 1 and after_one["flops_per_second"] == 2e11
    _finished(device="cpu", flops_per_second=4e11)
    assert create()["flops_per_second"] == pytest.approx(3e11)  # the median of both
    with session_scope() as session:
        session.execute(update(Teacher).where(Teacher.name == "digits-cnn").values(params=500_000))
    assert create()["teacher_parameters"] == 500_000
    with session_scope() as session:
        heartbeats.beat(session, kind="worker", sid="gpu-worker-1", info={"cuda_visible_devices": "0"})
    try:
        assert create()["device_type"] == "cuda"
        # The estimate endpoint (the session path) reads the same rule.
        assert _estimate(client, training_config={"epochs": 4})["device_type"] == "cuda"
    finally:
        with session_scope() as session:
            heartbeats.remove(session, sid="gpu-worker-1")


def test_start_makes_a_missing_estimate(client: TestClient) -> None:
    job = client.post("/distillation/jobs", json=DIGITS).json()
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job["job_id"]).values(estimate=None))
    started = client.post(f"/distillation/jobs/{job['job_id']}/start").json()
    assert started["estimate"] is not None and started["estimate"]["train_rows"] == 1294


def test_three_or_more_jobs_fit_seconds_on_flops_steps_and_epochs(client: TestClient) -> None:
    def truth(f: dict[str, float]) -> float:  # a machine with per-step overhead: 2 ms a step, 50 ms an epoch
        return 1e-10 * f["flops"] + 2e-3 * f["steps"] + 0.05 * f["epochs"]

    for flops, steps, epochs in ((1e9, 100, 2), (5e9, 400, 4), (2e9, 800, 8), (8e9, 200, 6), (3e9, 300, 3)):
        features = {"flops": flops, "steps": float(steps), "epochs": float(epochs)}
        _finished(device="cpu", flops_per_second=1.0, features=features, seconds=truth(features))
    body = _estimate(client)
    assert body["basis"].startswith("fitted on the measured training seconds of 5 finished jobs")
    assert "ms per optimizer step" in body["basis"] and body["history_jobs"] == 5
    assert body["expected_training_seconds"] == pytest.approx(truth(body["features"]), rel=1e-6)
    low, high = body["expected_training_seconds_range"]
    assert low == pytest.approx(high, rel=1e-6), "an exact fit has no spread"
