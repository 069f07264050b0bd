"""Restarts: the API and Redis restarted during a job lose nothing; a database outage makes the scheduler
and workers retry with backoff, without crashing, and they carry on once it is back.

These tests start and kill their OWN redis-server and PostgreSQL (initdb into a temp dir) on free ports,
never the machine's shared servers.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from integration_helpers import (
    REPO_ROOT,
    Proc,
    Stack,
    base_env,
    free_port,
    job_events,
    job_row,
    tiny_spec,
    wait_for,
    wait_for_status,
)
from reliability_helpers import wait_for_checkpoint
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import OperationalError

pytestmark = pytest.mark.integration


def _start_redis(stack: Stack, port: int) -> Proc:
    """A private, non-persistent redis-server on `port`; waits until it answers PING."""
    import redis

    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = stack.spawn(f"redis-{port}", argv, base_env())
    client = redis.Redis(port=port, socket_connect_timeout=0.5)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(f"redis-server on {port}\n{proc.log_tail()}", answers, timeout=15)
    client.close()
    return proc


def _start_api(stack: Stack, env: dict[str, str]) -> str:
    """`uvicorn app.main:app` in its own process; returns its base URL once it serves."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = stack.spawn("api", argv, base_env(**env))
    url = f"http://127.0.0.1:{port}"

    def serves() -> bool:
        if not proc.alive():
            raise AssertionError(f"the API exited\n{proc.log_tail()}")
        try:
            return httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(f"the API on {port}", serves, timeout=60, interval=0.2)
    return url


def test_api_and_redis_restarts_during_a_job_lose_nothing(stack: Stack, auth_headers: dict[str, str]) -> None:
    redis_port = free_port()
    redis_proc = _start_redis(stack, redis_port)
    env = {"BROKER_URL": f"redis://127.0.0.1:{redis_port}/0", "BROKER_KEY_PREFIX": ""}
    stack.start_scheduler(**env)
    stack.start_worker(**env)
    url = _start_api(stack, env)
    with httpx.Client(base_url=url, headers=auth_headers, timeout=30) as client:
        response = client.post(
            "/distillation/jobs", json={**tiny_spec(epochs=20, batch_size=16), "auto_start": True}
        )
        assert response.status_code == 201, response.text
        job_id = response.json()["job_id"]
    wait_for_checkpoint(job_id, 1)

    api_proc = next(p for p in stack.procs if p.name == "api")
    api_proc.kill()
    redis_proc.kill()
    before = {e.id for e in job_events(job_id)}
    progress_at_outage = job_row(job_id).progress
    _start_redis(stack, redis_port)  # same port, empty: the broker lost everything it held
    url = _start_api(stack, env)

    job = wait_for_status(job_id, {"completed", "failed"}, timeout=120, stack=stack)
    assert job.status == "completed", job.error
    assert job.attempt == 1, "the in-flight job finished on its first attempt, nothing re-ran"
    assert before <= {e.id for e in job_events(job_id)}, "events stored before the restarts survive"
    epochs = sorted(e.data["epoch"] for e in job_events(job_id, "metric"))
    assert len(epochs) == len(set(epochs)) == 20, epochs
    with httpx.Client(base_url=url, headers=auth_headers, timeout=30) as client:
        served = client.get(f"/distillation/jobs/{job_id}").json()
        assert served["status"] == "completed" and served["progress"] == 100 > progress_at_outage
        assert served["results"]["final_student_accuracy"] > 0
        # The worker reconnected to the restarted broker: a new job goes through it end to end.
        response = client.post("/distillation/jobs", json={**tiny_spec(epochs=1), "auto_start": True})
        assert response.status_code == 201, response.text
        after_id = response.json()["job_id"]
    assert wait_for_status(after_id, {"completed", "failed"}, timeout=90, stack=stack).status == "completed"


@pytest.fixture()
def own_postgres(stack: Stack) -> Iterator[dict[str, Any]]:
    """A private PostgreSQL cluster (initdb in a temp dir, run as the `postgres` user), migrated to head."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    bin_dir = Path(bins[-1])
    data = Path(tempfile.mkdtemp(prefix="distillery-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(
        [
            *as_postgres,
            str(bin_dir / "initdb"),
            "-D",
            str(data / "db"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    argv = [*as_postgres, str(bin_dir / "postgres"), "-D", str(data / "db"), "-p", str(port), "-k", str(data)]
    argv += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
    server_url = f"postgresql+psycopg://postgres@127.0.0.1:{port}"

    def start() -> Proc:
        proc = stack.spawn(f"postgres-{port}", argv, base_env())

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"postgres exited\n{proc.log_tail()}")
            engine = create_engine(f"{server_url}/postgres", connect_args={"connect_timeout": 1})
            try:
                with engine.connect():
                    return True
            except OperationalError:  # not accepting connections yet
                return False
            finally:
                engine.dispose()

        wait_for(f"postgres on {port}", ready, timeout=30, interval=0.2)
        return proc

    info: dict[str, Any] = {"start": start, "proc": start(), "url": f"{server_url}/distillery"}
    admin = create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("CREATE DATABASE distillery"))
    admin.dispose()
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO_ROOT,
        env=base_env(DATABASE_URL=info["url"]),
        check=True,
        capture_output=True,
    )
    try:
        yield info
    finally:
        stack.close()
        shutil.rmtree(data, ignore_errors=True)


def test_database_outage_scheduler_and_worker_back_off_and_recover(
    stack: Stack, own_postgres: dict[str, Any]
) -> None:
    from app.models import ServiceHeartbeat

    env = base_env(DATABASE_URL=own_postgres["url"], HEARTBEAT_INTERVAL="0.5")
    scheduler = stack.spawn("scheduler", [sys.executable, "-m", "app.scheduler"], env)
    worker_argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "training"]
    worker_argv += ["-c", "1", "-n", f"outage-{os.getpid()}@%h", "--without-gossip", "--without-mingle"]
    worker = stack.spawn("worker", worker_argv, env)
    engine = create_engine(own_postgres["url"])

    def beats_since(moment: datetime) -> set[str]:
        with engine.connect() as conn:
            rows = conn.execute(select(ServiceHeartbeat.kind, ServiceHeartbeat.last_seen_at)).all()
        return {kind for kind, seen in rows if seen > moment}

    wait_for(
        f"scheduler and worker to beat\n{stack.logs()}",
        lambda: beats_since(datetime(2000, 1, 1, tzinfo=UTC)) == {"scheduler", "worker"},
        timeout=90,
        interval=0.2,
    )
    engine.dispose()
    own_postgres["proc"].kill()  # the database goes away (SIGKILL of the whole server)

    def backoffs(proc: Proc, pattern: str) -> list[float]:
        return [float(m) for m in re.findall(pattern, proc.log_path.read_text(errors="replace"))]

    scheduler_pattern = r"database error in tick \(retrying in (\d+(?:\.\d+)?) s\)"
    worker_pattern = r"worker heartbeat failed \(retrying in (\d+(?:\.\d+)?) s\)"
    wait_for(
        f"the scheduler to back off twice\n{scheduler.log_tail()}",
        lambda: len(backoffs(scheduler, scheduler_pattern)) >= 3,
        timeout=30,
    )
    wait_for(
        f"the worker to back off\n{worker.log_tail()}",
        lambda: len(backoffs(worker, worker_pattern)) >= 3,
        timeout=30,
    )
    assert scheduler.alive() and worker.alive(), "no crash (loop) while the database is down"
    delays = backoffs(scheduler, scheduler_pattern)
    assert delays[:3] == [1.0, 2.0, 4.0], delays
    worker_delays = backoffs(worker, worker_pattern)
    assert worker_delays[:3] == sorted(worker_delays[:3]) and worker_delays[2] > worker_delays[0], (
        worker_delays
    )

    restarted_at = datetime.now(UTC)
    own_postgres["start"]()
    engine = create_engine(own_postgres["url"])
    wait_for(
        f"scheduler and worker to beat again\n{stack.logs()}",
        lambda: beats_since(restarted_at) == {"scheduler", "worker"},
        timeout=60,
        interval=0.2,
    )
    engine.dispose()
    assert scheduler.alive() and worker.alive()
