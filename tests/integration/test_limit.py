"""The concurrency limit with spare worker capacity: six jobs, capacity 4, MAX_CONCURRENT_JOBS=2."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from integration_helpers import Stack, job_events, job_row, tiny_spec, wait_for_status

pytestmark = pytest.mark.integration


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (an end before a start at the same instant)."""
    points = [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals]
    open_now = best = 0
    for _, delta in sorted(points, key=lambda p: (p[0], p[1])):
        open_now += delta
        best = max(best, open_now)
    return best


def test_six_jobs_run_two_at_a_time_in_queued_order(stack: Stack, api: Any) -> None:
    from app.core.config import get_settings

    assert get_settings().max_concurrent_jobs == 2  # the default; the API admits under it too
    stack.start_scheduler(MAX_CONCURRENT_JOBS="2")
    stack.start_worker(concurrency=4)  # capacity 4: only the limit keeps it at 2

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
