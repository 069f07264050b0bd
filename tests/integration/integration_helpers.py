"""Integration helpers: start real Celery worker and scheduler processes on the suite's database and broker.

Processes inherit the test environment set by tests/conftest.py (DATABASE_URL, BROKER_URL, BROKER_KEY_PREFIX,
DATA_DIR), run in their own process group, and are killed and reaped when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_JOB = Path(os.environ.get("DISTILLERY_TINY_JOB") or REPO_ROOT / "examples" / "tiny.json")

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], *, timeout: float, interval: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def tiny_spec(**training: Any) -> dict[str, Any]:
    """examples/tiny.json, with training_config fields overridden."""
    spec: dict[str, Any] = json.loads(TINY_JOB.read_text())
    spec.setdefault("training_config", {}).update(training)
    return spec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**overrides: str) -> dict[str, str]:
    """The test process's environment for a child, with modest CPU threads and fast heartbeats."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TICK_SECONDS": "0.5",
        "HEARTBEAT_INTERVAL": "0.5",
        "PROGRESS_MIN_INTERVAL": "0.2",
    }
    env.update(overrides)
    return env


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group (the worker and its pool processes) and reap it."""
        with contextlib.suppress(ProcessLookupError):  # also reaches pool processes whose parent died
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the leader (a worker then stops its pool itself), SIGKILL after `grace` seconds."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # leftovers in the group (orphaned pool processes)
            os.killpg(self.process.pid, signal.SIGKILL)


@dataclass
class Stack:
    """Starts worker and scheduler processes for one test and cleans them up."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)
    counter: int = 0
    shared: list[Proc] = field(default_factory=list)  # started elsewhere (module scope): logged, not stopped

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        self.counter += 1
        log_path = self.log_dir / f"{self.counter:02d}-{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    def start_worker(self, *, concurrency: int = 1, wait: bool = True, **env: str) -> Proc:
        """A real `celery worker` on the training queue; waits until it reported itself alive."""
        node = f"w{self.counter + 1}-{os.getpid()}-{time.monotonic_ns() % 10**8}"
        argv = [
            sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "training",
            "-c", str(concurrency), "-n", f"{node}@%h", "--without-gossip", "--without-mingle",
            "--loglevel", "INFO",
        ]  # fmt: skip
        proc = self.spawn(node, argv, base_env(**env))
        if wait:
            wait_for(
                f"worker {node} to start\n{proc.log_tail()}",
                lambda: worker_alive(node) or _raise_if_dead(proc),
                timeout=90,
                interval=0.2,
            )
        return proc

    def start_scheduler(self, **env: str) -> Proc:
        """`python -m app.scheduler`; waits until its first tick wrote its heartbeat."""
        proc = self.spawn("scheduler", [sys.executable, "-m", "app.scheduler"], base_env(**env))
        wait_for(
            f"the scheduler to tick\n{proc.log_tail()}",
            lambda: scheduler_alive(proc.process.pid) or _raise_if_dead(proc),
            timeout=30,
            interval=0.1,
        )
        return proc

    def close(self) -> None:
        """Kill what the test started (the `up` test covers a graceful stop; here it only costs time)."""
        for proc in reversed(self.procs):
            proc.kill()

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.log_tail(80)}" for p in [*self.shared, *self.procs])


def _raise_if_dead(proc: Proc) -> None:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited with {proc.process.returncode}\n{proc.log_tail()}")


def worker_alive(node: str) -> bool:
    from app.core.db import session_scope
    from app.models import ServiceHeartbeat

    with session_scope() as session:
        ids = session.scalars(select(ServiceHeartbeat.id).where(ServiceHeartbeat.kind == "worker")).all()
    return any(sid.startswith(f"worker:{node}@") for sid in ids)


def scheduler_alive(pid: int) -> bool:
    from app.core.db import session_scope
    from app.models import ServiceHeartbeat

    with session_scope() as session:
        rows = session.scalars(select(ServiceHeartbeat).where(ServiceHeartbeat.kind == "scheduler")).all()
    return any(row.pid == pid for row in rows)


def job_row(job_id: str) -> Any:
    from app.core.db import session_scope
    from app.models import Job

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def job_events(job_id: str, kind: str | None = None) -> list[Any]:
    from app.core.db import session_scope
    from app.models import JobEvent

    with session_scope() as session:
        stmt = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        if kind is not None:
            stmt = stmt.where(JobEvent.kind == kind)
        rows = list(session.scalars(stmt))
        for row in rows:
            session.expunge(row)
        return rows


def wait_for_status(job_id: str, statuses: set[str], *, timeout: float, stack: Stack | None = None) -> Any:
    """Poll the stored job until its status is one of `statuses`."""

    def probe() -> Any:
        job = job_row(job_id)
        return job if job.status in statuses else None

    try:
        return wait_for(f"job {job_id} to reach {sorted(statuses)}", probe, timeout=timeout, interval=0.1)
    except AssertionError as exc:
        job = job_row(job_id)
        logs = stack.logs() if stack is not None else ""
        raise AssertionError(f"{exc}; it is {job.status} (error {job.error})\n{logs}") from None
