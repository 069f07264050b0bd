"""A retention-search job with seeds over HTTP on a real Celery worker: an impossible target completes
with target_met false, its trials in the results and as events, progress ending at 100."""

from __future__ import annotations

from typing import Any

import pytest
from integration_helpers import Proc, Stack, job_events, tiny_spec, wait_for

pytestmark = pytest.mark.integration


def test_impossible_target_completes_with_trials_events_and_seed_spread(
    stack: Stack, shared_worker: Proc, api: Any
) -> None:
    stack.shared.append(shared_worker)
    stack.start_scheduler()
    spec = tiny_spec(epochs=1, max_trials=2, seeds=[0, 1], baseline=True)
    del spec["target_compression"]
    spec["target_retention"] = 1.2
    created = api.post("/distillation/jobs", json=spec | {"auto_start": True})
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = api.get(f"/distillation/jobs/{job_id}").json()
        return body if body["status"] in {"completed", "failed", "cancelled"} else None

    job = wait_for("the search job to finish", finished, timeout=180, interval=0.2)
    assert job["status"] == "completed", (job["error"], stack.logs())
    assert job["progress"] == 100
    results = job["results"]
    assert results["target_retention"] == 1.2 and results["target_met"] is False
    assert results["search"]["status"] == "budget_trials" and len(results["trials"]) == 2
    trial_events = job_events(job_id, "trial")
    assert [event.data["trial"] for event in trial_events] == [1, 2]
    assert trial_events[0].data["parameters"] == results["trials"][0]["parameters"]
    summary = results["seed_summary"]
    assert [entry["seed"] for entry in summary["per_seed"]] == [0, 1]
    assert summary["kd_gain"] is not None and results["kd_gain_unit"] == "points"
