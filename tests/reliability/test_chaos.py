"""Chaos: 10 tiny jobs on 2 workers, one worker SIGKILLed three times at random points (restarted each time):
every job completes with intact results, and no job is ever held by two workers at once.

"Held at once", precisely: attempt k of a job holds it from its stored claim (`claim` event, `at`) until the
stored event that ends attempt k (the `state` event leaving running: re-queued after a stale heartbeat,
completed, failed). A killed worker stops holding at its kill, which is inside that interval, so if the
intervals of consecutive attempts never overlap (end_k <= claim_{k+1}) and attempt k writes no event after
end_k, no two live workers ever held the same job.
"""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from integration_helpers import Stack, job_events, job_row, tiny_spec, wait_for, wait_for_status
from sqlalchemy import select

pytestmark = pytest.mark.integration

JOBS = 10
KILLS = 3
# Events the scheduler/API write (they carry the job's current attempt number); the rest come from a holder.
_SCHEDULER_KINDS = ("state", "dispatch", "claim")
# Long enough that the victim, restarted three times (a few seconds each), still finds jobs left to claim: at
# 16 epochs a quiet machine's steady worker finished all ten (~1.4 s each) before the third restart.
SPEC = tiny_spec(epochs=64, batch_size=16)


def _held_by(node: str) -> str | None:
    from app.core.db import session_scope
    from app.models import Job

    with session_scope() as session:
        return session.scalar(
            select(Job.id).where(Job.status == "running", Job.worker.startswith(f"{node}@")).limit(1)
        )


def test_ten_jobs_survive_three_kills_of_one_worker(stack: Stack, api: Any) -> None:
    from app.core.db import session_scope
    from app.models import Artifact

    rng = random.Random(1234)
    stack.start_scheduler(HEARTBEAT_TIMEOUT="3", MAX_ATTEMPTS="6")
    victim, steady = stack.start_worker(wait=False), stack.start_worker()
    job_ids = []
    for _ in range(JOBS):
        response = api.post("/distillation/jobs", json={**SPEC, "auto_start": True})
        assert response.status_code == 201, response.text
        job_ids.append(response.json()["job_id"])

    kills: list[dict[str, Any]] = []
    for _ in range(KILLS):
        node = victim.name
        wait_for(
            f"{node} to hold a job\n{stack.logs()}", lambda n=node: _held_by(n), timeout=120, interval=0.05
        )
        time.sleep(rng.uniform(0.2, 2.0))  # a random point in the job (the randomness, not synchronisation)
        held = _held_by(node)
        killed_at = datetime.now(UTC)
        victim.kill()
        kills.append({"worker": node, "job": held, "at": killed_at})
        victim = stack.start_worker(wait=False)

    for job_id in job_ids:
        wait_for_status(job_id, {"completed", "failed"}, timeout=180, stack=stack)
    assert steady.alive()

    attempts: dict[str, int] = {}
    for job_id in job_ids:
        job = job_row(job_id)
        assert job.status == "completed", (job_id, job.status, job.error)
        attempts[job_id] = job.attempt
        _assert_results_intact(job_id, job.results)
        with session_scope() as session:
            names = set(session.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
            stored = session.scalar(
                select(Artifact.path).where(Artifact.job_id == job_id, Artifact.name == "results.json")
            )
        assert {"results.json", "student.pt2"} <= names, names
        assert (
            stored is not None
            and json.loads(Path(stored).read_text())["compression_ratio"] == job.results["compression_ratio"]
        )
        _assert_never_held_twice(job_id)

    recoveries = []
    for kill in kills:
        if kill["job"] is None:
            continue
        later = [c for c in job_events(kill["job"], "claim") if _at(c) > kill["at"]]
        assert later, f"job {kill['job']} held by the killed {kill['worker']} was never re-claimed"
        assert not later[0].data["worker"].startswith(f"{kill['worker']}@")
        recoveries.append((_at(later[0]) - kill["at"]).total_seconds())
    assert len(recoveries) == KILLS, kills
    print(
        "\nCHAOS "
        + json.dumps(
            {
                "jobs_completed": sum(job_row(j).status == "completed" for j in job_ids),
                "jobs": JOBS,
                "kills": KILLS,
                "attempts_total": sum(attempts.values()),
                "attempts_per_job": sorted(attempts.values()),
                "recover_seconds": [round(r, 2) for r in recoveries],
            }
        )
    )


def _at(claim: Any) -> datetime:
    return datetime.fromisoformat(claim.data["at"])


def _assert_results_intact(job_id: str, results: dict[str, Any] | None) -> None:
    assert results is not None, job_id
    assert 0.5 < results["teacher_accuracy"] <= 1.0
    assert 0.0 < results["final_student_accuracy"] <= 1.0
    assert 0.0 < results["compression_ratio"] < 0.2
    assert results["compressed_parameters"] < results["original_parameters"]
    epochs = sorted(h["epoch"] for h in results["training_history"])
    assert epochs == sorted(set(epochs)) and len(epochs) == SPEC["training_config"]["epochs"], epochs


def _assert_never_held_twice(job_id: str) -> None:
    events = job_events(job_id)
    claims = [e for e in events if e.kind == "claim"]
    assert [c.data["attempt"] for c in claims] == list(range(1, len(claims) + 1))
    for claim in claims:
        attempt = claim.attempt
        ends = [
            e
            for e in events
            if e.kind == "state" and e.attempt == attempt and e.data.get("from") in ("running", "cancelling")
        ]
        assert len(ends) == 1, (job_id, attempt, [(e.message, e.data) for e in ends])
        end = ends[0].created_at
        assert _at(claim) <= end
        written = [e for e in events if e.attempt == attempt and e.kind not in _SCHEDULER_KINDS]
        assert all(e.created_at <= end for e in written), (job_id, attempt)
        following = [c for c in claims if c.attempt == attempt + 1]
        if following:
            assert end <= _at(following[0]), (job_id, attempt, end, _at(following[0]))
            assert ends[0].data["to"] == "queued" and ends[0].data["reason"] == "heartbeat_stale"
        else:
            assert ends[0].data["to"] == "completed"
