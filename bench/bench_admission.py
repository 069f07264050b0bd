"""Admission cost against queue length: one scheduler tick's admission transaction at 1k, 10k, 100k queued.

Needs PostgreSQL and Redis (DATABASE_URL / BROKER_URL name the servers; a private database and key prefix
are created and dropped). For each queue length it fills the jobs table with SQL (`generate_series`),
ANALYZEs it, and times, --rounds times each:

- `admit`: `admit_queued_jobs` + commit (the tick's admission transaction) admitting `--free` jobs, with
  `--tenants` tenants owning the queue round-robin, none at its limit;
- `admit_full_ahead`: the same, but every queued job but the last belongs to one tenant already at its
  TENANT_MAX_RUNNING_JOBS limit, and the last one to another tenant (the worst case for paging: the full
  tenant is left out in the query, but the index walk still passes its rows);
- `tick`: a whole `run_tick` (recovery queries, re-dispatch, admission, sends to Redis, heartbeat).

After each timed round the admitted jobs are put back in the queue (untimed), so every round sees the same
queue. Prints the median and p90 in ms. Figures, not pass/fail.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres BROKER_URL=redis://127.0.0.1:6379/0 \
        .venv/bin/python bench/bench_admission.py [--sizes 1000 10000 100000] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import bench_environment

SPEC = {"teacher_model_name": "digits-cnn", "target_compression": 0.2}


def fill_queue(*, queued: int, tenants: int, full_tenant_ahead: bool, active: int) -> None:
    """Replace the jobs table's rows: `active` running jobs and `queued` queued ones, queued_at 1 ms apart."""
    from sqlalchemy import text

    from app.core.db import session_scope

    with session_scope() as session:
        session.execute(text("DELETE FROM job_events"))
        session.execute(text("DELETE FROM jobs"))
        insert = text(
            """
            INSERT INTO jobs (id, spec, teacher_model_name, status, attempt, progress, created_at, updated_at,
                              queued_at, tenant_id)
            SELECT gen_random_uuid()::text, CAST(:spec AS json), 'digits-cnn', :status, 0, 0.0, now(), now(),
                   now() - interval '1 day' + n * interval '1 millisecond',
                   CASE WHEN :full_ahead THEN (CASE WHEN n = :count THEN 'tenant-last' ELSE 'tenant-full' END)
                        ELSE 'tenant-' || (n % :tenants) END
            FROM generate_series(1, :count) AS n
            """
        )
        spec = json.dumps(SPEC)
        session.execute(
            insert,
            {
                "spec": spec,
                "status": "queued",
                "count": queued,
                "tenants": tenants,
                "full_ahead": full_tenant_ahead,
            },
        )
        # The running jobs: owned by the full tenant when it exists (it is at its limit), else spread.
        session.execute(
            insert,
            {
                "spec": spec,
                "status": "running",
                "count": active,
                "tenants": tenants,
                "full_ahead": full_tenant_ahead,
            },
        )
        if full_tenant_ahead:
            session.execute(text("UPDATE jobs SET tenant_id = 'tenant-full' WHERE status = 'running'"))
        session.execute(text("UPDATE jobs SET heartbeat_at = now() WHERE status = 'running'"))
    with session_scope() as session:
        session.execute(text("ANALYZE jobs"))


def requeue(job_ids: list[str]) -> None:
    """Put admitted jobs back (untimed) so the next round sees the same queue."""
    from sqlalchemy import text

    from app.core.db import session_scope

    if not job_ids:
        return
    with session_scope() as session:
        session.execute(
            text("UPDATE jobs SET status = 'queued', dispatched_at = NULL WHERE id = ANY(:ids)"),
            {"ids": job_ids},
        )
        session.execute(text("DELETE FROM job_events WHERE job_id = ANY(:ids)"), {"ids": job_ids})


def timed(rounds: int, step: Callable[[], list[str]], expect: int) -> list[float]:
    """Milliseconds per call of `step` (which returns the admitted ids), requeueing after each."""
    times: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        admitted = step()
        times.append((time.perf_counter() - start) * 1000)
        if len(admitted) != expect:
            raise RuntimeError(f"expected {expect} admitted, got {len(admitted)}")
        requeue(admitted)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--free", type=int, default=2, help="slots free at each tick")
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    active = 8
    settings_env = {
        "MAX_CONCURRENT_JOBS": str(active + args.free),
        "TENANT_MAX_RUNNING_JOBS": "2",
        "HEARTBEAT_TIMEOUT": "3600",
        "DISPATCH_TIMEOUT": "3600",
    }
    results: list[dict[str, Any]] = []
    with bench_environment(**settings_env):
        from app.core.config import Settings
        from app.core.db import session_scope
        from app.services.scheduler import admit_queued_jobs, run_tick

        settings = Settings()

        def admit_once() -> list[str]:
            with session_scope() as session:
                return admit_queued_jobs(session, settings)

        def tick_once() -> list[str]:
            return run_tick(settings).admitted

        for size in args.sizes:
            cases: list[tuple[str, bool, Callable[[], list[str]], int]] = [
                ("admit", False, admit_once, args.free),
                ("tick", False, tick_once, args.free),
                ("admit_full_ahead", True, admit_once, 1),
            ]
            for name, full_ahead, step, expect in cases:
                # Spread: `active` running jobs over tenants at 1 each (limit 2), so none is full.
                fill_queue(queued=size, tenants=args.tenants, full_tenant_ahead=full_ahead, active=active)
                step_times = timed(3, step, expect)  # warm-up: connections, prepared statements
                step_times = timed(args.rounds, step, expect)
                median = statistics.median(step_times)
                p90 = statistics.quantiles(step_times, n=10)[-1]
                results.append({"case": name, "queued": size, "median_ms": median, "p90_ms": p90})
                print(f"{name:17} queued={size:<7} median {median:7.2f} ms  p90 {p90:7.2f} ms", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
