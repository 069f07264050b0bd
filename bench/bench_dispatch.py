"""Dispatch latency: from a job's start (POST .../start) to `running` (a worker's claim), median and p99.

Serves the real stack on PostgreSQL + Redis (DATABASE_URL / BROKER_URL name the servers; a private database
and key prefix are created and dropped): uvicorn, the scheduler process and one Celery worker (`-c 1`). Jobs
(examples/tiny.json, 1 epoch) are started one at a time, each once the previous one has finished, so the
figure is the idle-system path: API commit → admit → send → worker claim. The latency is measured from the
stored timestamps (`queued_at`, written by the API's start, → `started_at`, written by the worker's claim;
both clocks are this machine's). With --embedded the same runs on SQLite + the filesystem broker.
Figures, not pass/fail.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres BROKER_URL=redis://127.0.0.1:6379/0 \
        .venv/bin/python bench/bench_dispatch.py [--jobs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import (
    REPO_ROOT,
    TINY_JOB,
    bench_environment,
    free_port,
    issue_key,
    serve,
    uvicorn_argv,
)


@contextmanager
def background(argv: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process (scheduler, worker) stopped with SIGTERM at the end."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_worker_ready(timeout: float = 120) -> None:
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import ServiceHeartbeat

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            if session.scalars(select(ServiceHeartbeat.id).where(ServiceHeartbeat.kind == "worker")).first():
                return
        time.sleep(0.2)
    raise RuntimeError("the worker did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run(jobs: int, env: dict[str, str], tmp: Path) -> dict[str, Any]:
    import httpx

    from app.core.db import session_scope
    from app.models import Job

    spec = json.loads(TINY_JOB.read_text())
    spec["training_config"]["epochs"] = 1
    auth = {"Authorization": f"Bearer {issue_key()}"}
    port = free_port()
    worker_argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "training"]
    worker_argv += ["-c", "1", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"]
    with ExitStack() as stack:
        stack.enter_context(serve(uvicorn_argv("app.main:app", port), env, port, tmp / "api.log"))
        stack.enter_context(background([sys.executable, "-m", "app.scheduler"], env, tmp / "scheduler.log"))
        stack.enter_context(background(worker_argv, env, tmp / "worker.log"))
        wait_worker_ready()
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=30)
        )
        latencies_ms: list[float] = []
        for index in range(jobs + 1):  # the first job warms the teacher and the worker up; not counted
            job_id = client.post("/distillation/jobs", json=spec).json()["job_id"]
            response = client.post(f"/distillation/jobs/{job_id}/start")
            response.raise_for_status()
            deadline = time.monotonic() + 600
            while True:
                status = client.get(f"/distillation/jobs/{job_id}").json()["status"]
                if status in {"completed", "failed", "cancelled"}:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job_id} did not finish")
                time.sleep(0.05)
            with session_scope() as session:
                job = session.get(Job, job_id)
                assert job is not None and job.queued_at and job.started_at
                latency = (job.started_at - job.queued_at).total_seconds() * 1000
            if status != "completed":
                raise RuntimeError(f"job {job_id} ended {status}")
            if index > 0:
                latencies_ms.append(latency)
                print(f"job {index:3d}: start -> running {latency:7.1f} ms", flush=True)
    return {
        "jobs": len(latencies_ms),
        "median_ms": round(statistics.median(latencies_ms), 1),
        "p99_ms": round(percentile(latencies_ms, 0.99), 1),
        "min_ms": round(min(latencies_ms), 1),
        "max_ms": round(max(latencies_ms), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--embedded", action="store_true", help="SQLite + filesystem broker instead")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "distillery-bench-data",
        help="DATA_DIR kept between runs (the built-in teacher is built there once)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        if args.embedded:
            data_dir = args.data_dir / "embedded"
            os.environ.update(
                DATABASE_URL="",
                BROKER_URL="",
                BROKER_KEY_PREFIX="",
                DATA_DIR=str(data_dir),
                OMP_NUM_THREADS="1",
            )
            from distillery_cli.stack import migrate, seed_teachers

            migrate()
            seed_teachers()
            summary = run(args.jobs, {**os.environ, "PYTHONUNBUFFERED": "1"}, Path(tmp))
            backend = "SQLite + filesystem broker"
        else:
            with bench_environment(args.data_dir, OMP_NUM_THREADS="1") as bench:
                summary = run(args.jobs, bench.env, Path(tmp))
            backend = "PostgreSQL + Redis"
    print(
        f"\n{backend}: start -> running over {summary['jobs']} jobs: median {summary['median_ms']} ms, "
        f"p99 {summary['p99_ms']} ms (min {summary['min_ms']}, max {summary['max_ms']})"
    )
    print(json.dumps({"backend": backend, **summary}))


if __name__ == "__main__":
    main()
