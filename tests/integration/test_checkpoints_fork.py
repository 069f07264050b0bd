"""Kept checkpoints and forks with a real worker: a job keeps last, best and its latest epoch (CHECKPOINT_KEEP
=3), lists them with their validation metric, serves the student weights; a new job started from one trains
only the epochs after it, with other hyperparameters, and shows its lineage."""

from __future__ import annotations

from typing import Any

import pytest
from integration_helpers import Stack, job_events, tiny_spec, wait_for_status

pytestmark = pytest.mark.integration


def _metric_epochs(job_id: str) -> list[int]:
    return [e.data["epoch"] for e in job_events(job_id, "metric")]


def test_checkpoints_are_listed_downloaded_and_forked(
    stack: Stack, api: Any, make_api_key: Any, tmp_path: Any
) -> None:
    from safetensors.torch import load_file

    stack.start_worker(concurrency=1)
    parent = api.post("/distillation/jobs", json={**tiny_spec(epochs=3, batch_size=32), "auto_start": True})
    parent_id = parent.json()["job_id"]
    done = wait_for_status(parent_id, {"completed", "failed"}, timeout=120, stack=stack)
    assert done.status == "completed", done.error

    listed = api.get(f"/distillation/jobs/{parent_id}/checkpoints").json()
    assert [(c["name"], c["kind"], c["epoch"]) for c in listed][:1] == [("last", "last", 3)]
    names = {c["name"] for c in listed}
    assert names == {"last", "best", "epoch-3"}, "CHECKPOINT_KEEP=3: epochs 1 and 2 were dropped"
    history = {h["epoch"]: h["student_accuracy"] for h in done.results["training_history"]}
    for checkpoint in listed:
        assert checkpoint["metric"] == "accuracy" and checkpoint["metric_split"] == "validation"
        assert checkpoint["validation_metric"] == pytest.approx(history[checkpoint["epoch"]])
        assert checkpoint["bytes"] > 1000
    best = next(c for c in listed if c["name"] == "best")
    assert best["validation_metric"] == max(history.values())

    response = api.get(f"/distillation/jobs/{parent_id}/checkpoints/best")
    assert response.status_code == 200 and response.headers["x-checkpoint-epoch"] == str(best["epoch"])
    weights = tmp_path / "best.safetensors"
    weights.write_bytes(response.content)
    state = load_file(str(weights))
    assert state and all(
        t.dtype.is_floating_point or t.dtype == state[next(iter(state))].dtype for t in state.values()
    )
    assert api.get(f"/distillation/jobs/{parent_id}/checkpoints/epoch-1").status_code == 404

    # Bad forks answer 422 naming the field.
    fork = tiny_spec(epochs=5, batch_size=32, learning_rate=0.005)
    cases = [
        ({"epochs": 3}, {"job_id": parent_id, "checkpoint": "last"}, "training_config.epochs"),
        ({}, {"job_id": parent_id, "checkpoint": "epoch-1"}, "from_checkpoint.checkpoint"),
        ({}, {"job_id": "no-such-job", "checkpoint": "last"}, "from_checkpoint.job_id"),
    ]
    for training, source, field in cases:
        body = fork | {"training_config": fork["training_config"] | training, "from_checkpoint": source}
        response = api.post("/distillation/jobs", json=body)
        assert response.status_code == 422 and response.json()["detail"].startswith(field), response.text
    other = api.post(
        "/distillation/jobs",
        json=fork
        | {"target_compression": 0.2, "from_checkpoint": {"job_id": parent_id, "checkpoint": "last"}},
    )
    assert other.status_code == 422 and "target_compression" in other.json()["detail"]
    theirs = api.post(
        "/distillation/jobs",
        json=fork | {"from_checkpoint": {"job_id": parent_id, "checkpoint": "last"}},
        headers=make_api_key(),
    )
    assert theirs.status_code == 422 and "from_checkpoint.job_id" in theirs.json()["detail"]

    # The estimate of a fork counts only the epochs it trains.
    source = {"job_id": parent_id, "checkpoint": "last"}
    whole = api.post("/distillation/jobs/estimate", json=fork).json()
    forked = api.post("/distillation/jobs/estimate", json=fork | {"from_checkpoint": source}).json()
    assert forked["start_epoch"] == 3 and forked["features"]["epochs"] == 2 < whole["features"]["epochs"] == 5

    # A fork from `last` with another learning rate: trains epochs 4 and 5 only.
    created = api.post(
        "/distillation/jobs",
        json=fork | {"auto_start": True, "from_checkpoint": {"job_id": parent_id, "checkpoint": "last"}},
    )
    assert created.status_code == 201, created.text
    child_id = created.json()["job_id"]
    assert created.json()["parent"] == {"job_id": parent_id, "checkpoint": "last"}
    assert created.json()["estimate"]["start_epoch"] == 3
    child = wait_for_status(child_id, {"completed", "failed"}, timeout=120, stack=stack)
    assert child.status == "completed", child.error
    assert _metric_epochs(child_id) == [4, 5], "only the new epochs trained"
    (started,) = [
        e for e in job_events(child_id, "checkpoint") if e.message == "starting from a parent checkpoint"
    ]
    assert started.data["epoch"] == 3
    lineage = [h["epoch"] for h in child.results["training_history"]]
    assert lineage == [1, 2, 3, 4, 5], "the parent's epochs are carried as its history"
    assert [h["student_accuracy"] for h in child.results["training_history"][:3]] == [
        history[e] for e in (1, 2, 3)
    ]
    assert (
        child.results["training_history"][3]["learning_rate"]
        != done.results["training_history"][2]["learning_rate"]
    )
    read = api.get(f"/distillation/jobs/{child_id}").json()
    assert read["parent"] == {"job_id": parent_id, "checkpoint": "last"}
    # The fork does not depend on its parent's files.
    assert api.delete(f"/distillation/jobs/{parent_id}").status_code == 204
    assert api.get(f"/distillation/jobs/{child_id}/checkpoints/last").status_code == 200
