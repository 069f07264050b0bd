"""Helpers for the reliability tests: pool processes, stored claims, event times."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from integration_helpers import job_events, job_row, wait_for


def pool_pid(job_id: str) -> int:
    """The pid of the pool process running `job_id` (the claim stores `<node>/<pid>`)."""
    worker = job_row(job_id).worker
    assert worker and "/" in worker, worker
    return int(worker.rsplit("/", 1)[1])


def parent_pid(pid: int) -> int:
    """The parent of `pid`, read from /proc (field 4 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def kill_pool_process(job_id: str, worker_pid: int) -> int:
    """SIGKILL only the pool process holding `job_id` (its worker parent `worker_pid` stays up)."""
    pid = pool_pid(job_id)
    assert pid != worker_pid and parent_pid(pid) == worker_pid, (pid, worker_pid)
    os.kill(pid, signal.SIGKILL)
    wait_for(f"pool process {pid} to exit", lambda: not _running(pid), timeout=10, interval=0.05)
    return pid


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def checkpointed_epochs(job_id: str) -> int | None:
    """Epochs done in the job's stored checkpoint (None without one), read as the engine's resume reads it."""
    from app.core.config import get_settings
    from workers.distill.checkpoint import load_checkpoint
    from workers.distill.runner import CHECKPOINT_FILE

    saved = load_checkpoint(get_settings().jobs_dir / job_id / "checkpoints" / CHECKPOINT_FILE)
    if saved is None or not saved.get("run"):
        return None
    return int(saved["run"]["epoch"])


def wait_for_checkpoint(job_id: str, attempt: int, *, min_epochs: int = 0, timeout: float = 120) -> None:
    """Until `attempt` stored a metric event and a checkpoint of at least `min_epochs` epochs exists."""

    def probe() -> bool:
        job = job_row(job_id)
        if job.status != "running" or job.attempt != attempt:
            return False
        if not [e for e in job_events(job_id, "metric") if e.attempt == attempt]:
            return False
        done = checkpointed_epochs(job_id)
        return done is not None and done >= min_epochs

    wait_for(f"job {job_id} attempt {attempt} to checkpoint", probe, timeout=timeout, interval=0.1)


def claims(job_id: str) -> list[Any]:
    return job_events(job_id, "claim")
