"""`distillery submit --watch` and `distillery watch` against a real uvicorn server: live events, the
results table, exit codes by outcome, and a resume with Last-Event-ID after the server restarts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.models import Job
from app.services import lifecycle
from tests.live_server import ROOT, free_port, live_server
from tests.sse_helpers import complete, create_job, report_epoch, start_and_claim, tenant_of

SERVER_ENV = {"SSE_POLL_SECONDS": "0.05", "SSE_KEEPALIVE_SECONDS": "1"}
DEADLINE = 60.0


class Cli:
    """A `distillery` process whose output is collected line by line as it comes."""

    def __init__(self, args: list[str], url: str, api_key: str) -> None:
        env = {
            **os.environ,
            "DISTILLERY_URL": url,
            "DISTILLERY_API_KEY": api_key,
            "COLUMNS": "80",
            "NO_COLOR": "1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "distillery_cli.main", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output)
            if match:
                return match
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the CLI output:\n{self.output}")

    def finish(self) -> int:
        code = self.process.wait(timeout=DEADLINE)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture()
def settings(clean_database: str) -> Settings:
    return Settings(**(get_settings().model_dump() | {"max_concurrent_jobs": 100}))


@pytest.fixture(scope="module")
def server(migrated_database: str) -> Iterator[str]:
    with live_server(SERVER_ENV) as url:
        yield url


def _key(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def _wait_status(job_id: str, status: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is not None and job.status == status:
                return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {status}")


def test_submit_watch_follows_the_job_live_and_prints_the_results(
    server: str, settings: Settings, auth_headers: dict[str, str]
) -> None:
    cli = Cli(
        ["submit", str(ROOT / "examples" / "tiny.json"), "--watch", "--verbose"], server, _key(auth_headers)
    )
    try:
        job_id = cli.wait_for(r"job ([0-9a-f-]{36}) queued").group(1)
        _wait_status(job_id, "dispatched")  # the API's start woke admission; no worker runs here
        with session_scope() as session:
            claim = lifecycle.claim_job(session, job_id=job_id, worker="test-worker")
        assert claim is not None
        report_epoch(claim, 1, 2, accuracy=0.81, loss=0.9)
        cli.wait_for(r"stage 1 epoch 1: .*val 0\.81")  # printed while the job still runs
        report_epoch(claim, 2, 2, accuracy=0.93, loss=0.4)
        complete(claim, 2)
        assert cli.finish() == 0, cli.output
    finally:
        cli.kill()
    out = cli.output
    assert "dispatched -> running" in out and "running -> completed" in out
    assert out.index("stage 1 epoch 1") < out.index("stage 1 epoch 2") < out.index("Distillation results")
    assert re.search(r"Test accuracy[\s│]+98\.06%[\s│]+95\.83%", out)  # teacher vs delivered student
    assert re.search(r"█+ 100% completed ETA 0:00", out)  # the display's last frame
    assert f"job {job_id} completed" in out
    assert max(len(line) for line in cli.lines) <= 80, out


def test_watch_exits_3_when_the_job_fails(
    server: str, settings: Settings, auth_headers: dict[str, str]
) -> None:
    job_id = create_job(settings, tenant_of(auth_headers))
    claim = start_and_claim(settings, job_id)
    cli = Cli(["watch", job_id], server, _key(auth_headers))
    try:
        cli.wait_for("dispatched -> running")
        report_epoch(claim, 1, 2, accuracy=0.81, loss=0.9)
        report_epoch(claim, 2, 2, accuracy=0.85, loss=0.7)
        with session_scope() as session:
            lifecycle.fail_job(
                session,
                job_id=job_id,
                lease_token=claim.lease_token,
                attempt=claim.attempt,
                code="nan_loss",
                message="the loss became NaN in epoch 1",
            )
        assert cli.finish() == 3, cli.output
    finally:
        cli.kill()
    out = cli.output
    assert "job failed (nan_loss): the loss became NaN in epoch 1" in out
    # Without --verbose: no line per epoch, one line for the stage.
    assert "epoch 1:" not in out and "epoch 2:" not in out
    assert re.search(r"distill stage 1: 2 epochs, last loss 0\.7 .*val 0\.85", out), out


def test_watch_resumes_after_the_server_restarts_without_repeating_events(
    migrated_database: str, settings: Settings, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    job_id = create_job(settings, tenant_of(auth_headers))
    claim = start_and_claim(settings, job_id)
    report_epoch(claim, 1, 3, accuracy=0.7, loss=1.0)
    port = free_port()
    cli: Cli | None = None
    try:
        with live_server(SERVER_ENV, port=port) as url:
            cli = Cli(["watch", "--verbose", job_id], url, _key(auth_headers))
            cli.wait_for(r"stage 1 epoch 1:")
        # The server is gone; the CLI retries until the new one answers, then resumes after its last event.
        report_epoch(claim, 2, 3, accuracy=0.8, loss=0.6)
        with live_server(SERVER_ENV, port=port):
            cli.wait_for(r"stage 1 epoch 2:")
            report_epoch(claim, 3, 3, accuracy=0.9, loss=0.3)
            complete(claim, 3)
            assert cli.finish() == 0, cli.output
    finally:
        if cli is not None:
            cli.kill()
    out = cli.output
    assert "event stream dropped" in out and "polling" not in out
    for epoch in (1, 2, 3):
        assert out.count(f"stage 1 epoch {epoch}:") == 1, out
    assert out.count("dispatched -> running") == 1
    assert "Distillation results" in out
