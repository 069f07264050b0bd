"""Cancel latency: from the cancel request (POST .../cancel) to status `cancelled` stored, median and p95.

Serves the real stack on PostgreSQL + Redis (DATABASE_URL / BROKER_URL name the servers; a private database
and key prefix are created and dropped): uvicorn, the scheduler process and one Celery worker (`-c 1`). Each
run starts a long job (examples/tiny.json, 40 epochs, batch 16), waits until it trains (a first metric event
stored), cancels it and measures from the wall clock just before the request to the job's stored
`finished_at` (written with the `cancelled` status; both clocks are this machine's). Target: ≤2 s.
Figures, not pass/fail.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres BROKER_URL=redis://127.0.0.1:6379/0 \
        .venv/bin/python bench/bench_cancel.py [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import TINY_JOB, bench_environment, free_port, issue_key, serve, uvicorn_argv
from bench_dispatch import background, percentile, wait_worker_ready


def _wait(what: str, probe: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def run(runs: int, env: dict[str, str], tmp: Path) -> dict[str, Any]:
    import httpx
    from sqlalchemy import func, select

    from app.core.db import session_scope
    from app.models import Job, JobEvent

    spec = json.loads(TINY_JOB.read_text())
    spec["training_config"].update(epochs=40, batch_size=16)
    auth = {"Authorization": f"Bearer {issue_key()}"}
    port = free_port()
    worker_argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "training"]
    worker_argv += ["-c", "1", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"]
    rng = random.Random(0)

    def metric_events(job_id: str) -> int:
        with session_scope() as session:
            stmt = select(func.count()).select_from(JobEvent)
            return int(session.scalar(stmt.where(JobEvent.job_id == job_id, JobEvent.kind == "metric")) or 0)

    def finished_at(job_id: str) -> datetime | None:
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if job.status in {"completed", "failed"}:
                raise RuntimeError(f"job {job_id} ended {job.status} before its cancel took effect")
            return job.finished_at if job.status == "cancelled" else None

    with ExitStack() as stack:
        stack.enter_context(serve(uvicorn_argv("app.main:app", port), env, port, tmp / "api.log"))
        stack.enter_context(background([sys.executable, "-m", "app.scheduler"], env, tmp / "scheduler.log"))
        stack.enter_context(background(worker_argv, env, tmp / "worker.log"))
        wait_worker_ready()
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=30)
        )
        latencies_ms: list[float] = []
        for index in range(runs):
            job_id = client.post("/distillation/jobs", json={**spec, "auto_start": True}).json()["job_id"]
            _wait(f"job {job_id} to train", lambda j=job_id: metric_events(j) >= 1)
            time.sleep(rng.uniform(0.0, 0.5))  # a random point within an epoch, not right after a check
            requested = datetime.now(UTC)
            response = client.post(f"/distillation/jobs/{job_id}/cancel")
            if response.status_code != 202:
                raise RuntimeError(f"cancel answered {response.status_code}: {response.text}")
            stored = _wait(f"job {job_id} to be cancelled", lambda j=job_id: finished_at(j), timeout=60)
            latency = (stored - requested).total_seconds() * 1000
            latencies_ms.append(latency)
            print(f"run {index + 1:3d}: cancel -> cancelled {latency:7.1f} ms", flush=True)
    return {
        "runs": len(latencies_ms),
        "median_ms": round(statistics.median(latencies_ms), 1),
        "p95_ms": round(percentile(latencies_ms, 0.95), 1),
        "min_ms": round(min(latencies_ms), 1),
        "max_ms": round(max(latencies_ms), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "distillery-bench-data",
        help="DATA_DIR kept between runs (the built-in teacher is built there once)",
    )
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-cancel-") as tmp,
        bench_environment(args.data_dir, OMP_NUM_THREADS="1") as bench,
    ):
        summary = run(args.runs, bench.env, Path(tmp))
    print(
        f"\ncancel -> cancelled over {summary['runs']} runs: median {summary['median_ms']} ms, "
        f"p95 {summary['p95_ms']} ms (min {summary['min_ms']}, max {summary['max_ms']}; target <= 2000 ms)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
