"""The API's access lines are batched (DeferredLog): a moment late, never lost, each with its own fields."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from app.core.logging import DeferredLog, configure_logging, log_context
from tests.live_server import free_port

ROOT = Path(__file__).resolve().parents[1]


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_records_reach_the_handler_together_a_moment_later_with_their_own_time_and_fields() -> None:
    stream = io.StringIO()
    handler = configure_logging(fmt="json", level="INFO", stream=stream)
    deferred = DeferredLog(logging.getLogger("distillery.test-access"), batch_seconds=0.05)

    async def requests() -> tuple[float, float, list[dict[str, object]]]:
        with log_context(job_id="job-a"):  # the first request's context schedules the flush
            deferred.add("GET %s", ("/a",), {"job_id": "job-a", "request_id": "r-1", "status": 200})
        first_added = time.time()
        deferred.add("GET %s", ("/b",), {"request_id": "r-2", "status": 404})  # a request of no job
        before_flush = _lines(stream)
        deadline = time.monotonic() + 10
        while not stream.getvalue() and time.monotonic() < deadline:  # the loop's timer writes them
            await asyncio.sleep(0.005)
        return first_added, time.time(), before_flush

    try:
        first_added, written_by, before_flush = asyncio.run(requests())
    finally:
        logging.getLogger().removeHandler(handler)
    assert before_flush == []  # nothing handled on the request path
    a, b = _lines(stream)
    assert (a["message"], b["message"]) == ("GET /a", "GET /b")
    assert a["job_id"] == "job-a" and a["request_id"] == "r-1" and a["status"] == 200
    # The record of the second request takes nothing from the context the flush was scheduled in.
    assert "job_id" not in b and b["request_id"] == "r-2"
    # Written a batch delay later, each keeps the time it was added (`ts`: milliseconds, truncated).
    assert written_by - first_added >= 0.05
    stamped = datetime.fromisoformat(str(a["ts"])).timestamp()
    assert 0 <= first_added - stamped < 0.03 and str(a["ts"]) <= str(b["ts"])


def test_without_a_running_loop_a_record_is_handled_at_once() -> None:
    stream = io.StringIO()
    handler = configure_logging(fmt="json", level="INFO", stream=stream)
    try:
        deferred = DeferredLog(logging.getLogger("distillery.test-access"), batch_seconds=0.05)
        deferred.add("sync %s", ("call",), {})
        assert [line["message"] for line in _lines(stream)] == ["sync call"]
    finally:
        logging.getLogger().removeHandler(handler)


def test_a_loop_that_stopped_with_records_due_does_not_keep_them() -> None:
    """A test client's portal loop can end before the flush: the next record, on another loop, writes both."""
    stream = io.StringIO()
    handler = configure_logging(fmt="json", level="INFO", stream=stream)
    deferred = DeferredLog(logging.getLogger("distillery.test-access"), batch_seconds=0.05)

    async def one(path: str) -> None:
        deferred.add("GET %s", (path,), {})

    try:
        asyncio.run(one("/first"))  # its loop closes before the flush is due
        assert _lines(stream) == []
        asyncio.run(one("/second"))
        assert [line["message"] for line in _lines(stream)] == ["GET /first", "GET /second"]
    finally:
        logging.getLogger().removeHandler(handler)


def test_a_server_stopped_right_after_its_requests_still_writes_their_lines() -> None:
    port = free_port()
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            # Lines due 10 s after their requests: only the shutdown can write them in time.
            env={**os.environ, "LOG_FORMAT": "json", "ACCESS_LOG_BATCH_SECONDS": "10"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"{url}/docs", timeout=1)
                    break
                except httpx.TransportError:
                    assert server.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
                    time.sleep(0.1)
            with httpx.Client(base_url=url) as client:
                statuses = [client.get("/distillation/teachers").status_code for _ in range(3)]
            server.send_signal(signal.SIGTERM)  # within the flush delay of the last request
            # A graceful shutdown; uvicorn then exits by the signal it caught.
            assert server.wait(timeout=30) in (0, -signal.SIGTERM)
        finally:
            if server.poll() is None:
                server.kill()
        log.seek(0)
        output = log.read().decode(errors="replace")
    assert statuses == [401, 401, 401]
    access = [
        line
        for line in (json.loads(raw) for raw in output.splitlines() if raw.startswith("{"))
        if line.get("logger") == "distillery.http" and line.get("route") == "/distillation/teachers"
    ]
    assert [line["status"] for line in access] == [401, 401, 401], output[-2000:]
