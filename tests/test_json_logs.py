"""JSON logs outside the API: the scheduler process and Celery tasks tag their lines (job_id, tenant)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from app.core.config import Settings, get_settings
from app.core.logging import configure_logging, job_id_var, tenant_var
from tests.sse_helpers import create_job, tenant_of

ROOT = Path(__file__).resolve().parents[1]


def test_a_celery_task_logs_with_its_job_id_and_tenant(
    clean_database: str, auth_headers: dict[str, str]
) -> None:
    from workers.celery_app import _tag_task_logs, _untag_task_logs

    settings = Settings(**get_settings().model_dump())
    job_id = create_job(settings, tenant_of(auth_headers))
    stream = io.StringIO()
    handler = configure_logging(fmt="json", level="INFO", stream=stream)
    log = logging.getLogger("workers.tasks")
    try:
        _tag_task_logs(task_id="task-1", args=(job_id,), kwargs={})  # what Celery's task_prerun sends
        log.info("claimed")
        _untag_task_logs(task_id="task-1")  # task_postrun
        log.info("idle")
    finally:
        logging.getLogger().removeHandler(handler)
    tagged, untagged = (json.loads(line) for line in stream.getvalue().splitlines())
    assert tagged["job_id"] == job_id and tagged["tenant"].startswith("tenant-")
    assert "job_id" not in untagged and "tenant" not in untagged
    assert job_id_var.get() is None and tenant_var.get() is None


def test_the_scheduler_process_writes_json_lines(migrated_database: str) -> None:
    env = {**os.environ, "TICK_SECONDS": "0.2", "LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [sys.executable, "-m", "app.scheduler"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and "scheduler" not in line:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
    finally:
        process.terminate()
        process.wait(timeout=15)
        if process.stdout is not None:
            process.stdout.close()
    record = json.loads(line)
    assert record["logger"] == "distillery.scheduler" and record["level"] == "INFO"
