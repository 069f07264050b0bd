"""API throughput with wrk: GET /distillation/jobs/{id} and POST /distillation/jobs vs a minimal FastAPI app.

Needs PostgreSQL and Redis (DATABASE_URL / BROKER_URL name the servers, as for the tests) and `wrk`
(`apt-get install -y wrk`). It creates its own database `distillery_bench_<id>` and Redis key prefix, serves
the real app with uvicorn (one process) and, beside it, a minimal in-memory FastAPI app taking the same
JobSpec body (the framework's floor), runs wrk at 8 and 50 connections for --duration seconds on each
endpoint, prints req/s, p50 and p99, and our rate as a ratio of the minimal app's. Figures, not pass/fail.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres BROKER_URL=redis://127.0.0.1:6379/0 \
        .venv/bin/python bench/bench_api.py [--duration 30] [--connections 8 50]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app.schemas.job_spec import JobSpec  # noqa: E402  (pydantic only; the minimal app's body type)

TINY_JOB = REPO_ROOT / "examples" / "tiny.json"


# --------------------------------------------------------------------------------------- minimal app
def build_minimal_app() -> Any:
    """The comparison point: the same JobSpec validation and JSON shapes, stored in a dict."""
    from datetime import UTC, datetime

    from fastapi import FastAPI, HTTPException

    app = FastAPI()
    store: dict[str, dict[str, Any]] = {}

    @app.post("/items", status_code=201)
    def create_item(spec: JobSpec) -> dict[str, Any]:
        item_id = str(uuid.uuid4())
        store[item_id] = {
            "job_id": item_id,
            "status": "pending",
            "spec": spec.model_dump(mode="json"),
            "created_at": datetime.now(UTC).isoformat(),
        }
        return store[item_id]

    @app.get("/items/{item_id}")
    def get_item(item_id: str) -> dict[str, Any]:
        if item_id not in store:
            raise HTTPException(404)
        return store[item_id]

    return app


# --------------------------------------------------------------------------------------- environment
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class BenchEnv:
    """A private database and key prefix on the given servers, and the env for child processes."""

    database_url: str
    broker_url: str
    key_prefix: str
    data_dir: Path
    env: dict[str, str]


@contextmanager
def bench_environment(data_dir: Path | None = None, **settings: str) -> Iterator[BenchEnv]:
    """Create `distillery_bench_<id>` on DATABASE_URL's server, migrate it, point this process at it; drop
    it (and the Redis keys) afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server_db = os.environ.get("DATABASE_URL", "")
    broker = os.environ.get("BROKER_URL", "")
    if not server_db.startswith("postgresql") or not broker.startswith("redis"):
        sys.exit("set DATABASE_URL (postgresql+psycopg://…) and BROKER_URL (redis://…) to the servers")
    run_id = uuid.uuid4().hex[:8]
    db_name = f"distillery_bench_{run_id}"
    admin = create_engine(make_url(server_db).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    database_url = make_url(server_db).set(database=db_name).render_as_string(hide_password=False)
    owned_dir = data_dir is None
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="distillery-bench-"))
    prefix = f"distillery-bench-{run_id}:"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BROKER_URL": broker,
        "BROKER_KEY_PREFIX": prefix,
        "DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
        **settings,
    }
    os.environ.update({k: env[k] for k in ("DATABASE_URL", "BROKER_URL", "BROKER_KEY_PREFIX", "DATA_DIR")})
    os.environ.update(settings)
    try:
        from distillery_cli.stack import migrate, seed_teachers

        migrate()
        seed_teachers()
        yield BenchEnv(database_url, broker, prefix, data_dir, env)
    finally:
        from app.core.db import get_engine

        get_engine().dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()
        import redis

        client = redis.Redis.from_url(broker)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
        if owned_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


def issue_key() -> str:
    """A tenant API key for the benchmark's requests."""
    from app.core.db import session_scope
    from app.services.auth import create_key

    with session_scope() as session:
        return create_key(session, tenant_name=f"bench-{uuid.uuid4().hex[:6]}", name="bench").key


@contextmanager
def serve(
    argv: list[str], env: dict[str, str], port: int, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process until its port answers; stop it afterwards."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{argv} exited: {log_path.read_text()[-2000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv} did not listen on {port}")
            time.sleep(0.2)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def uvicorn_argv(target: str, port: int, *, factory: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--no-access-log", "--log-level", "warning"]
    if factory:
        argv += ["--factory", "--app-dir", str(REPO_ROOT / "bench")]
    return argv


# --------------------------------------------------------------------------------------- wrk
@dataclass
class WrkResult:
    target: str
    endpoint: str
    connections: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value.strip())
    if match is None:
        raise ValueError(f"unexpected wrk latency {value!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> tuple[float, float, float, int, int]:
    """(req/s, p50 ms, p99 ms, requests, non-2xx + socket errors) from `wrk --latency` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return rps, p50, p99, requests, errors


def post_script(path: Path, body: dict[str, Any], headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
    lines.append('wrk.headers["Content-Type"] = "application/json"')
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(
    url: str, *, connections: int, duration: int, headers: dict[str, str], script: Path | None = None
) -> str:
    argv = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{duration}s", "--latency", "--timeout", "10s"]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=30, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 50])
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get update && apt-get install -y wrk")

    spec = json.loads(TINY_JOB.read_text())
    results: list[WrkResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp, bench_environment() as bench:
        key = issue_key()
        auth = {"Authorization": f"Bearer {key}"}
        ours_port, floor_port = free_port(), free_port()
        with (
            serve(uvicorn_argv("app.main:app", ours_port), bench.env, ours_port, Path(tmp) / "ours.log"),
            serve(
                uvicorn_argv("bench_api:build_minimal_app", floor_port, factory=True),
                bench.env,
                floor_port,
                Path(tmp) / "minimal.log",
            ),
        ):
            import httpx

            ours = f"http://127.0.0.1:{ours_port}"
            floor = f"http://127.0.0.1:{floor_port}"
            job_id = httpx.post(f"{ours}/distillation/jobs", json=spec, headers=auth).json()["job_id"]
            item_id = httpx.post(f"{floor}/items", json=spec).json()["job_id"]
            post_ours = post_script(Path(tmp) / "post_ours.lua", spec, auth)
            post_floor = post_script(Path(tmp) / "post_floor.lua", spec, {})
            cases = [
                ("ours", "GET /distillation/jobs/{id}", f"{ours}/distillation/jobs/{job_id}", auth, None),
                ("minimal", "GET /distillation/jobs/{id}", f"{floor}/items/{item_id}", {}, None),
                ("ours", "POST /distillation/jobs", f"{ours}/distillation/jobs", {}, post_ours),
                ("minimal", "POST /distillation/jobs", f"{floor}/items", {}, post_floor),
            ]
            for connections in args.connections:
                for target, endpoint, url, headers, script in cases:
                    output = run_wrk(
                        url, connections=connections, duration=args.duration, headers=headers, script=script
                    )
                    rps, p50, p99, requests, errors = parse_wrk(output)
                    result = WrkResult(target, endpoint, connections, rps, p50, p99, requests, errors)
                    results.append(result)
                    print(
                        f"{target:8} {endpoint:30} c={connections:<3} {rps:9.1f} req/s  p50 {p50:8.2f} ms  "
                        f"p99 {p99:8.2f} ms  errors {errors}",
                        flush=True,
                    )

    print("\nour rate / minimal app's rate:")
    summary = []
    for connections in args.connections:
        for endpoint in ("GET /distillation/jobs/{id}", "POST /distillation/jobs"):
            ours_r = next(
                r for r in results if (r.target, r.endpoint, r.connections) == ("ours", endpoint, connections)
            )
            floor_r = next(
                r
                for r in results
                if (r.target, r.endpoint, r.connections) == ("minimal", endpoint, connections)
            )
            ratio = ours_r.requests_per_second / floor_r.requests_per_second
            summary.append({"endpoint": endpoint, "connections": connections, "ratio": round(ratio, 3)})
            print(f"  {endpoint:30} c={connections:<3} {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"runs": [asdict(r) for r in results], "ratios": summary}, indent=2))


if __name__ == "__main__":
    main()
