"""A two-rank job through the real stack: it waits (with its reason) while only one-device workers live,
then a two-device worker takes it from its size's queue and runs it on two rank processes to completion."""

from __future__ import annotations

from typing import Any

from integration_helpers import Stack, job_events, tiny_spec, wait_for


def _job(api: Any, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = api.get(f"/distillation/jobs/{job_id}").json()
    return body


def _submit(api: Any, **training: Any) -> str:
    created = api.post("/distillation/jobs", json=tiny_spec(**training) | {"auto_start": True})
    assert created.status_code == 201, created.text
    return str(created.json()["job_id"])


def test_two_rank_job_waits_for_a_two_device_worker_then_runs_on_two_ranks(stack: Stack, api: Any) -> None:
    stack.start_worker(WORKER_DEVICES="1")
    stack.start_scheduler()
    big = _submit(api, world_size=2)
    small = _submit(api)  # queued after it: passes it

    try:
        done = wait_for(
            "the one-rank job to finish",
            lambda: (job := _job(api, small))["status"] in {"completed", "failed"} and job,
            timeout=120,
        )
        assert done["status"] == "completed", done["error"]
        waiting = _job(api, big)
        assert waiting["status"] == "queued"  # admission ran many times meanwhile; never dispatched
        assert "2 devices" in waiting["queue_reason"] and "largest offers 1" in waiting["queue_reason"]
        assert [e.data["world_size"] for e in job_events(big, "queue")] == [2]

        stack.start_worker(WORKER_DEVICES="2")
        finished = wait_for(
            "the two-rank job to finish",
            lambda: (job := _job(api, big))["status"] in {"completed", "failed"} and job,
            timeout=180,
        )
    except AssertionError:
        print(stack.logs())
        raise
    assert finished["status"] == "completed", (finished["error"], stack.logs())
    assert finished["queue_reason"] is None
    assert [h["epoch"] for h in finished["results"]["training_history"]] == [1, 2]
    (claim,) = job_events(big, "claim")
    assert claim.data["worker"].startswith(stack.procs[-1].name)  # the two-device worker took it
    assert len(job_events(big, "metric")) == 2  # rank 0 alone reported
