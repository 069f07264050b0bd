"""`distillery up` on the embedded default (SQLite + filesystem broker, no server) runs a job end to end."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from integration_helpers import REPO_ROOT, base_env, free_port, tiny_spec, wait_for

pytestmark = pytest.mark.integration

ADMIN_KEY = "embedded-stack-test-admin-key"


def embedded_env(tmp_path: Path, port: int) -> dict[str, str]:
    """`distillery up` on the embedded default in tmp_path, its CLI config there too (not ~/.config)."""
    return base_env(
        DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL="",  # the embedded default: a SQLite file under DATA_DIR
        BROKER_URL="",  # Kombu's filesystem transport under DATA_DIR
        BROKER_KEY_PREFIX="",
        PORT=str(port),
        ADMIN_API_KEY=ADMIN_KEY,
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )


def start_up(tmp_path: Path, port: int, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "distillery_cli.main", "up", *args],
            cwd=REPO_ROOT,
            env=embedded_env(tmp_path, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return up, log_path


def descendants(pid: int) -> dict[int, str]:
    """Live (non-zombie) descendants of `pid` from /proc: {pid: command line}."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        parents[int(entry.name)] = int(fields[1])
        commands[int(entry.name)] = command
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def alive(pids: Iterable[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            left.append(pid)
    return left


def reap(pids: Iterable[int]) -> None:
    for pid in alive(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_up_serves_the_embedded_stack_and_stops_cleanly(tmp_path: Path, digits_teacher: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    # The deterministic built-in teacher, built once for the suite, is shared (the engine tests building it).
    shutil.copytree(digits_teacher, data_dir / "teachers" / digits_teacher.name)
    up, log_path = start_up(tmp_path, port)

    def logs() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:

            def healthy() -> dict[str, Any] | None:
                if up.poll() is not None:
                    raise AssertionError(f"up exited with {up.returncode}\n{logs()}")
                try:
                    response = client.get("/health")
                except httpx.TransportError:
                    return None
                return response.json() if response.status_code == 200 else None

            wait_for("the API to answer /health", healthy, timeout=90, interval=0.25)
            issued = client.post(
                "/admin/keys",
                json={"tenant": "embedded", "name": "test"},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            assert issued.status_code == 201, issued.text
            client.headers["Authorization"] = f"Bearer {issued.json()['key']}"

            created = client.post("/distillation/jobs", json={**tiny_spec(), "auto_start": True})
            assert created.status_code == 201, created.text
            job_id = created.json()["job_id"]

            def finished() -> dict[str, Any] | None:
                body: dict[str, Any] = client.get(f"/distillation/jobs/{job_id}").json()
                return body if body["status"] in {"completed", "failed", "cancelled"} else None

            try:
                job = wait_for("the job to finish", finished, timeout=180, interval=0.2)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{logs()}") from None
            assert job["status"] == "completed", (job["error"], logs())
            assert job["attempt"] == 1

            artifacts = {a["name"]: a for a in client.get(f"/distillation/jobs/{job_id}/artifacts").json()}
            weights = client.get(f"/distillation/jobs/{job_id}/artifacts/student.safetensors")
            assert weights.status_code == 200
            assert hashlib.sha256(weights.content).hexdigest() == artifacts["student.safetensors"]["sha256"]

        # The stack recorded its URL beside its key, and in the CLI's config file (any folder finds it).
        assert (data_dir / "url").read_text().strip() == base
        config_text = (tmp_path / "config" / "distillery" / "config.toml").read_text()
        assert f'url = "{base}"' in config_text
        assert (data_dir / "api_key").read_text().strip() in config_text
        # Everything lives under DATA_DIR: the SQLite file, the broker folders, the job's files.
        assert (data_dir / "distillery.db").is_file()
        assert (data_dir / "broker").is_dir()
        assert (data_dir / "jobs" / job_id / "artifacts" / "student.safetensors").is_file()
    finally:
        children = descendants(up.pid)
        stop_started = time.monotonic()
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        try:
            code = up.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
            raise AssertionError(f"up did not stop on SIGTERM\n{logs()}") from None
        finally:
            reap(children)
    stop_seconds = time.monotonic() - stop_started
    assert code == 0, logs()
    assert "stopped: api" in logs() and "killing" not in logs()  # an idle worker stops on its own
    # No Python warnings between up's lines (Celery's about broker retries at start-up included); the
    # one about running as root is the machine's business, not ours.
    text = log_path.read_text(errors="replace")
    warnings = [line for line in text.splitlines() if re.search(r"\w+Warning: ", line)]
    assert all("SecurityWarning" in line and os.geteuid() == 0 for line in warnings), warnings
    assert "broker_connection_retry" not in text
    print(f"idle stop on SIGTERM: {stop_seconds:.2f} s")
    with socket.socket() as sock:  # the API is gone with it
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_up_restarts_a_crashed_child_and_its_children_die_with_it(tmp_path: Path) -> None:
    port = free_port()
    up, log_path = start_up(tmp_path, port, "--restart-delay", "0.5")
    children: dict[int, str] = {}

    def logs() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    def scheduler_pid() -> int | None:
        if up.poll() is not None:
            raise AssertionError(f"up exited with {up.returncode}\n{logs()}")
        return next((pid for pid, cmd in descendants(up.pid).items() if "app.scheduler" in cmd), None)

    try:

        def ready() -> bool:
            scheduler_pid()  # fails at once if `up` exited
            return "ready." in logs()

        wait_for("the worker to be ready", ready, timeout=90)
        first = wait_for("the scheduler", scheduler_pid, timeout=30)
        os.kill(first, signal.SIGKILL)  # a crash
        second = wait_for("a new scheduler", lambda: (pid := scheduler_pid()) != first and pid, timeout=30)
        assert second != first
        assert "scheduler exited with code -9" in logs() and "restarting scheduler" in logs(), logs()

        children = descendants(up.pid)
        for program in ("-m uvicorn", "-m app.scheduler", "-m distillery_cli.embedded_worker"):
            assert any(program in cmd for cmd in children.values()), children
        os.kill(up.pid, signal.SIGKILL)  # as the OOM killer would
        up.wait()
        wait_for("the children to end", lambda: not alive(children), timeout=10, interval=0.1)
        with socket.socket() as sock:  # and the port is free again
            assert sock.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        reap(children)


def test_up_gives_up_on_a_child_that_keeps_crashing(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the API's port is in use: uvicorn exits at once, every time
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up, log_path = start_up(tmp_path, port, "--max-restarts", "2", "--restart-delay", "0.2")
        try:
            code = up.wait(timeout=120)
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
    out = log_path.read_text(errors="replace")
    assert code == 1, out
    assert len(re.findall(r"api exited with code \d+ after", out)) == 2 and "restarting api" in out
    assert "api exited 3 times in a row" in out and "stopped the stack" in out


@pytest.mark.slow  # two stack starts and real training: about a minute on an idle 2-core machine
def test_a_busy_worker_is_killed_at_stop_and_its_job_requeued_on_the_next_start(
    tmp_path: Path, digits_teacher: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    shutil.copytree(digits_teacher, data_dir / "teachers" / digits_teacher.name)
    stale = {"HEARTBEAT_TIMEOUT": "3", "DISPATCH_TIMEOUT": "5"}
    base = f"http://127.0.0.1:{port}"

    def start(log_name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = tmp_path / log_name
        with log_path.open("wb") as log:
            up = subprocess.Popen(
                [sys.executable, "-m", "distillery_cli.main", "up", "--stop-grace", "1"],
                cwd=REPO_ROOT,
                env=embedded_env(tmp_path, port) | stale,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return up, log_path

    def job_when(client: httpx.Client, job_id: str, ok: Any) -> dict[str, Any] | None:
        try:
            body: dict[str, Any] = client.get(f"/distillation/jobs/{job_id}").json()
        except httpx.TransportError:
            return None
        return body if ok(body) else None

    up, log_path = start("up1.log")
    children = descendants(up.pid)
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            wait_for("the API", lambda: job_when(client, "x", lambda b: True) is not None, timeout=90)
            client.headers["Authorization"] = f"Bearer {(data_dir / 'api_key').read_text().strip()}"
            created = client.post("/distillation/jobs", json={**tiny_spec(epochs=200), "auto_start": True})
            assert created.status_code == 201, created.text
            job_id = created.json()["job_id"]
            wait_for(
                "an epoch of the job",
                lambda: job_when(client, job_id, lambda b: (b["metrics"] or {}).get("epoch", 0) >= 2),
                timeout=120,
                interval=0.2,
            )
        children = descendants(up.pid)
        stop_started = time.monotonic()
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0
        took = time.monotonic() - stop_started
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        reap(children)
    first_log = log_path.read_text(errors="replace")
    assert "worker still busy after 1 s; killing it" in first_log, first_log[-3000:]
    assert took < 10, took

    # The next start finds the job `running` with a stale heartbeat: the scheduler re-queues it.
    up, log_path = start("up2.log")
    children = descendants(up.pid)
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            client.headers["Authorization"] = f"Bearer {(data_dir / 'api_key').read_text().strip()}"
            resumed = wait_for(
                "the job's second attempt",
                lambda: job_when(client, job_id, lambda b: b["attempt"] == 2 and b["status"] == "running"),
                timeout=120,
                interval=0.3,
            )
            assert resumed["status"] == "running"
            assert client.post(f"/distillation/jobs/{job_id}/cancel").status_code in (200, 202)
            wait_for(
                "the job to be cancelled",
                lambda: job_when(client, job_id, lambda b: b["status"] == "cancelled"),
                timeout=60,
                interval=0.2,
            )
        children = descendants(up.pid)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=30)
        reap(children)
