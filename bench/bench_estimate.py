"""Estimate vs actual: POST /distillation/jobs/estimate's expected training seconds against the measured
`training_seconds` of the same job, for N finished jobs (ratio = actual / expected: median and spread).

Serves the real stack on PostgreSQL + Redis (DATABASE_URL / BROKER_URL name the servers; a private database
and key prefix are created and dropped): uvicorn, the scheduler process and one Celery worker (`-c 1`). One
warm-up job first teaches the service the digits teacher's size and a first throughput (before it the
estimate says "no estimate: unknown the parameter count"); then N digits jobs of varied epochs, batch size
and target compression run one after another, each estimated at create from the jobs finished before it.
Figures, not pass/fail.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres BROKER_URL=redis://127.0.0.1:6379/0 \
        .venv/bin/python bench/bench_estimate.py [--jobs 10]
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import TINY_JOB, bench_environment, free_port, issue_key, serve, uvicorn_argv
from bench_dispatch import background, wait_worker_ready


def _wait_done(client: Any, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/distillation/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            if job["status"] != "completed":
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job['error']}")
            return job
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for job {job_id}")


def run(jobs: int, env: dict[str, str], tmp: Path, seed: int) -> dict[str, Any]:
    import httpx

    base = json.loads(TINY_JOB.read_text())
    auth = {"Authorization": f"Bearer {issue_key()}"}
    port = free_port()
    worker_argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "training"]
    worker_argv += ["-c", "1", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"]
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        stack.enter_context(serve(uvicorn_argv("app.main:app", port), env, port, tmp / "api.log"))
        stack.enter_context(background([sys.executable, "-m", "app.scheduler"], env, tmp / "scheduler.log"))
        stack.enter_context(background(worker_argv, env, tmp / "worker.log"))
        wait_worker_ready()
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=60)
        )
        warmup = client.post("/distillation/jobs", json={**base, "auto_start": True}).json()
        print(f"warm-up job: estimate basis: {warmup['estimate']['basis']}", flush=True)
        _wait_done(client, warmup["job_id"])
        for index in range(jobs):
            spec = json.loads(json.dumps(base))
            spec["target_compression"] = rng.choice([0.05, 0.1, 0.25])
            spec["training_config"].update(epochs=rng.randint(2, 8), batch_size=rng.choice([16, 32, 64]))
            asked = client.post("/distillation/jobs/estimate", json=spec).json()
            created = client.post("/distillation/jobs", json={**spec, "auto_start": True}).json()
            done = _wait_done(client, created["job_id"])
            expected = created["estimate"]["expected_training_seconds"]
            actual = done["results"]["training_seconds"]
            assert asked["expected_training_seconds"] == expected, "the endpoint and create agree"
            row = {
                "job": index + 1,
                "epochs": spec["training_config"]["epochs"],
                "batch_size": spec["training_config"]["batch_size"],
                "target_compression": spec["target_compression"],
                "expected_s": expected,
                "actual_s": actual,
                "ratio": done["results"]["estimate"]["ratio"],
                "history_jobs": created["estimate"]["history_jobs"],
                "method": "fit" if created["estimate"]["basis"].startswith("fitted") else "FLOP/s",
            }
            rows.append(row)
            print(
                f"job {row['job']:2d}: epochs {row['epochs']}, batch {row['batch_size']:2d}, compression "
                f"{row['target_compression']:.2f}: expected {expected:6.2f} s, actual {actual:6.2f} s, "
                f"ratio {row['ratio']:.2f} ({row['method']} on {row['history_jobs']} jobs)",
                flush=True,
            )
    ratios = [float(r["ratio"]) for r in rows]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {
        "jobs": len(rows),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_q1": round(quartiles[0], 3),
        "ratio_q3": round(quartiles[2], 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "within_25_percent": sum(1 for r in ratios if 0.8 <= r <= 1.25),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "distillery-bench-data",
        help="DATA_DIR kept between runs (the built-in teacher is built there once)",
    )
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp,
        bench_environment(args.data_dir, OMP_NUM_THREADS="1") as bench,
    ):
        summary = run(args.jobs, bench.env, Path(tmp), args.seed)
    s = summary
    print(
        f"\nactual / expected training seconds over {s['jobs']} jobs: median {s['ratio_median']}, "
        f"IQR {s['ratio_q1']}-{s['ratio_q3']}, range {s['ratio_min']}-{s['ratio_max']}; "
        f"{s['within_25_percent']} within 0.8-1.25"
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


if __name__ == "__main__":
    main()
