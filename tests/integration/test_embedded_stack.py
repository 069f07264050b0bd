"""`distillery up` on the embedded default (SQLite + filesystem broker, no server) runs a job end to end."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from integration_helpers import REPO_ROOT, base_env, free_port, tiny_spec, wait_for

pytestmark = pytest.mark.integration

ADMIN_KEY = "embedded-stack-test-admin-key"


def test_up_serves_the_embedded_stack_and_stops_cleanly(tmp_path: Path, digits_teacher: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    # The deterministic built-in teacher, built once for the suite, is shared (the engine tests building it).
    shutil.copytree(digits_teacher, data_dir / "teachers" / digits_teacher.name)
    env = base_env(
        DATA_DIR=str(data_dir),
        DATABASE_URL="",  # the embedded default: a SQLite file under DATA_DIR
        BROKER_URL="",  # Kombu's filesystem transport under DATA_DIR
        BROKER_KEY_PREFIX="",
        PORT=str(port),
        ADMIN_API_KEY=ADMIN_KEY,
        XDG_CONFIG_HOME=str(tmp_path / "config"),  # `up` writes the CLI's config there, not in ~/.config
    )
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "distillery_cli.main", "up"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

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
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        try:
            code = up.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
            raise AssertionError(f"up did not stop on SIGTERM\n{logs()}") from None
    assert code == 0, logs()
    with socket.socket() as sock:  # the API is gone with it
        assert sock.connect_ex(("127.0.0.1", port)) != 0
