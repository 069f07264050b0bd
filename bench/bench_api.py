"""API throughput and latency with wrk: our app vs an async in-memory app with the same routes, as ratios.

Needs PostgreSQL and Redis (DATABASE_URL / BROKER_URL name the servers, as for the tests) and `wrk`
(`apt-get install -y wrk`). Each app tree under test (this one, and with --before PATH an older checkout,
e.g. `git worktree add /tmp/perf-before main`) gets its own database `distillery_bench_<id>`, migrated by
that tree's own migrations, a tenant API key (auth on, as in production), and a second tenant with 10,000
stored jobs for the list pages. Each is served by one uvicorn process (`app.main:app`); beside them, one
uvicorn process serves `build_memory_app`: the same routes, request and response models and bearer check,
async handlers, a dict for storage (nothing durable: the ceiling).

The wrk runs (--duration s each, default 15) are interleaved: every round runs every case on every target
in turn, so drift in the machine's load hits all of them alike; figures are medians over --rounds rounds.
Cases: GET /distillation/jobs/{id} and POST /distillation/jobs at 8 and 50 connections (ours, before,
memory), and the first list page of 50 of the 10,000 jobs, unfiltered and filtered by status and teacher,
at 8 connections (ours, before). It prints each run, then medians, the ratios to the in-memory app (goals:
GET >= 0.4x, POST >= 0.2x) and the list p99 (goal <= 30 ms). Figures, not pass/fail.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres BROKER_URL=redis://127.0.0.1:6379/0 \
        .venv/bin/python bench/bench_api.py [--before /tmp/perf-before] [--rounds 3] [--duration 15] [--quick]

Full run: 10 wrk runs per round x 15 s x 3 rounds = 7.5 min of load plus about 20 s of setup; with --before,
16 runs per round = 12 min. --quick: 1 round of 5 s runs (under a minute; 1.3 min with --before), for
direction only. Each run also reports the server process's CPU time per request (from /proc), which a busy
machine distorts far less than req/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Query, Response

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# pydantic only (no database): the in-memory app's request and response models are ours.
from app.schemas.jobs import JobCreate, JobRead, JobSummary  # noqa: E402
from app.schemas.page import Page  # noqa: E402

TINY_JOB = REPO_ROOT / "examples" / "tiny.json"
LIST_JOBS = 10_000
LIST_TEACHERS = ("digits-cnn", "distilbert-sst2", "gpt2")
LIST_STATUSES = ("completed", "failed", "cancelled", "queued", "pending", "running")
MEMORY_KEY_ENV = "BENCH_MEMORY_API_KEY"


# --------------------------------------------------------------------------------------- in-memory app
_UNSET_AT_CREATE = (
    "phase",
    "estimated_completion",
    "eta_seconds",
    "queued_at",
    "dispatched_at",
    "started_at",
    "finished_at",
    "heartbeat_at",
    "metrics",
    "results",
    "error",
)


def build_memory_app() -> Any:
    """The ceiling: our routes with the same request/response models and a bearer check, async, in a dict."""
    app = FastAPI()
    keys = {os.environ.get(MEMORY_KEY_ENV, "memory-key"): "tenant"}
    store: dict[str, dict[str, Any]] = {}
    newest_first: list[dict[str, Any]] = []

    def tenant_of(authorization: str | None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        tenant = keys.get(token) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise HTTPException(401)
        return tenant

    @app.post("/distillation/jobs", status_code=201, response_model=JobRead)
    async def create_job(
        request: JobCreate, response: Response, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        tenant = tenant_of(authorization)
        now = datetime.now(UTC)
        spec = request.spec()
        job = {
            "job_id": str(uuid.uuid4()),
            "tenant": tenant,
            "status": "queued" if request.auto_start else "pending",
            "progress": 0.0,
            "created_at": now,
            "updated_at": now,
            "attempt": 0,
            "teacher_model_name": spec.teacher_model_name,
            "spec": spec.model_dump(mode="json"),
        }
        job |= dict.fromkeys(_UNSET_AT_CREATE)
        store[job["job_id"]] = job
        newest_first.insert(0, job)
        response.headers["Location"] = f"/distillation/jobs/{job['job_id']}"
        return job

    @app.get("/distillation/jobs/{job_id}", response_model=JobRead)
    async def get_job(job_id: str, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        tenant = tenant_of(authorization)
        job = store.get(job_id)
        if job is None or job["tenant"] != tenant:
            raise HTTPException(404)
        return job

    @app.get("/distillation/jobs", response_model=Page[JobSummary])
    async def list_jobs(
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        status: Annotated[list[str] | None, Query()] = None,
        teacher: str | None = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        tenant = tenant_of(authorization)
        page = []
        for job in newest_first:
            if job["tenant"] != tenant or (status and job["status"] not in status):
                continue
            if teacher and job["teacher_model_name"] != teacher:
                continue
            page.append(job)
            if len(page) > limit:
                break
        return {"data": page[:limit], "has_more": len(page) > limit, "next_cursor": None}

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
    argv: list[str], env: dict[str, str], port: int, log_path: Path, cwd: Path = REPO_ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process until its port answers; stop it afterwards."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
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
    # CPU seconds (user + system) the server process spent during the run, per request: far less
    # sensitive than req/s to what else the machine runs (the database server's CPU is not in it).
    server_cpu_us_per_request: float = 0.0


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


# --------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """One server under test: a tree serving `app.main:app` on its own database, or the in-memory app."""

    name: str
    root: Path | None  # None: the in-memory app
    port: int
    api_key: str = ""
    list_key: str = ""
    database_url: str = ""
    job_id: str = ""
    pid: int = 0


_SETUP = """
import json
from distillery_cli.stack import migrate, seed_teachers
from app.core.db import session_scope
from app.services.auth import create_key
migrate()
seed_teachers()
with session_scope() as session:
    api = create_key(session, tenant_name="bench-api", name="bench")
with session_scope() as session:
    listing = create_key(session, tenant_name="bench-list", name="bench")
print(json.dumps({"api_key": api.key, "list_key": listing.key, "list_tenant": listing.tenant.id}))
"""

_FILL_LIST = """
INSERT INTO jobs (id, spec, teacher_model_name, status, attempt, progress, created_at, updated_at, queued_at,
                  started_at, finished_at, tenant_id)
SELECT gen_random_uuid()::text, CAST(:spec AS json),
       (CAST(:teachers AS text[]))[1 + n % 3], (CAST(:statuses AS text[]))[1 + n % 6], 1,
       CASE WHEN n % 6 = 0 THEN 100.0 ELSE 0.0 END,
       now() - (:count - n) * interval '1 second', now(), now() - (:count - n) * interval '1 second',
       now() - (:count - n) * interval '1 second', now(), :tenant
FROM generate_series(1, :count) AS n
"""


def tree_env(root: Path, base: dict[str, str], database_url: str, data_dir: Path) -> dict[str, str]:
    """The environment for processes of the tree at `root`: its code first on the path, its database."""
    return {**base, "PYTHONPATH": str(root), "DATABASE_URL": database_url, "DATA_DIR": str(data_dir)}


def prepare_tree(target: Target, *, server_db: str, env: dict[str, str], data_dir: Path) -> None:
    """Create the tree's database, migrate and seed it with the tree's code, issue keys, store the jobs."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    assert target.root is not None
    db_name = f"distillery_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(make_url(server_db).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    admin.dispose()
    target.database_url = make_url(server_db).set(database=db_name).render_as_string(hide_password=False)
    done = subprocess.run(
        [sys.executable, "-c", _SETUP],
        cwd=target.root,
        env=tree_env(target.root, env, target.database_url, data_dir),
        check=True,
        capture_output=True,
        text=True,
    )
    setup = json.loads(done.stdout.strip().splitlines()[-1])
    target.api_key, target.list_key = setup["api_key"], setup["list_key"]
    engine = create_engine(target.database_url)
    with engine.begin() as conn:
        conn.execute(
            text(_FILL_LIST),
            {
                "spec": TINY_JOB.read_text(),
                "teachers": list(LIST_TEACHERS),
                "statuses": list(LIST_STATUSES),
                "count": LIST_JOBS,
                "tenant": setup["list_tenant"],
            },
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
    engine.dispose()


def drop_database(server_db: str, database_url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(make_url(server_db).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(database_url).database}" WITH (FORCE)'))
    admin.dispose()


@dataclass(frozen=True)
class Case:
    endpoint: str
    connections: int
    targets: tuple[str, ...]


def cases(connections: list[int], with_before: bool) -> list[Case]:
    apps = ("ours", "before") if with_before else ("ours",)
    out = []
    for c in connections:
        out.append(Case("GET /distillation/jobs/{id}", c, (*apps, "memory")))
        out.append(Case("POST /distillation/jobs", c, (*apps, "memory")))
    list_connections = min(connections, key=lambda c: abs(c - 8))
    out.append(Case("GET /distillation/jobs?limit=50", list_connections, apps))
    out.append(
        Case("GET /distillation/jobs?limit=50&status=completed&teacher=digits-cnn", list_connections, apps)
    )
    return out


def _kind(case: Case) -> str:
    if case.endpoint.startswith("POST"):
        return "POST"
    return "LIST" if "?" in case.endpoint else "GET"


def wrk_request(
    case: Case, target: Target, base: str, tmp: Path, spec: dict[str, Any]
) -> tuple[str, dict[str, str], Path | None]:
    """(url, headers, script) for one case on one target."""
    auth = {"Authorization": f"Bearer {target.api_key}"}
    if case.endpoint.startswith("GET /distillation/jobs/"):
        return f"{base}/distillation/jobs/{target.job_id}", auth, None
    if case.endpoint.startswith("POST"):
        return f"{base}/distillation/jobs", {}, post_script(tmp / f"post_{target.name}.lua", spec, auth)
    query = case.endpoint.split("?", 1)[1]
    return f"{base}/distillation/jobs?{query}", {"Authorization": f"Bearer {target.list_key}"}, None


def run_case(
    case: Case,
    target: Target,
    tmp: Path,
    spec: dict[str, Any],
    duration: int,
    profile: tuple[int, Path] | None,
) -> WrkResult:
    """One wrk run of `case` on `target`; with `profile` (pid, file), py-spy records that pid meanwhile."""
    url, headers, script = wrk_request(case, target, f"http://127.0.0.1:{target.port}", tmp, spec)
    profiler = None
    if profile is not None:
        pid, out = profile
        out.parent.mkdir(parents=True, exist_ok=True)
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        argv = [py_spy, "record", "-p", str(pid), "-d", str(duration), "-r", "200", "-f", "raw"]
        argv += ["-o", str(out), "--nonblocking"]
        profiler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu_before = process_cpu_seconds(target.pid)
    output = run_wrk(url, connections=case.connections, duration=duration, headers=headers, script=script)
    cpu = process_cpu_seconds(target.pid) - cpu_before
    if profiler is not None:
        profiler.wait(timeout=60)
    rps, p50, p99, requests, errors = parse_wrk(output)
    cpu_us = cpu / max(requests, 1) * 1e6
    return WrkResult(target.name, case.endpoint, case.connections, rps, p50, p99, requests, errors, cpu_us)


def median_of(results: list[WrkResult], target: str, case: Case) -> dict[str, float] | None:
    runs = [
        r
        for r in results
        if (r.target, r.endpoint, r.connections) == (target, case.endpoint, case.connections)
    ]
    if not runs:
        return None
    return {
        "requests_per_second": statistics.median(r.requests_per_second for r in runs),
        "p50_ms": statistics.median(r.p50_ms for r in runs),
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        "server_cpu_us_per_request": statistics.median(r.server_cpu_us_per_request for r in runs),
        "errors": sum(r.errors for r in runs),
        "rounds": len(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 50])
    parser.add_argument("--before", type=Path, help="an older checkout to serve and measure beside ours")
    parser.add_argument("--quick", action="store_true", help="1 round of 5 s runs: direction only")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy ours and the in-memory server in round 1: raw stacks into this dir",
    )
    parser.add_argument(
        "--only", nargs="+", choices=["GET", "POST", "LIST"], help="run only these cases (while iterating)"
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 5
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get update && apt-get install -y wrk")
    server_db = os.environ.get("DATABASE_URL", "")
    broker = os.environ.get("BROKER_URL", "")
    if not server_db.startswith("postgresql") or not broker.startswith("redis"):
        sys.exit("set DATABASE_URL (postgresql+psycopg://…) and BROKER_URL (redis://…) to the servers")

    spec = json.loads(TINY_JOB.read_text())
    plan = cases(args.connections, args.before is not None)
    if args.only:
        plan = [c for c in plan if _kind(c) in args.only]
    runs_per_round = sum(len(c.targets) for c in plan)
    print(
        f"{runs_per_round} wrk runs per round x {args.rounds} rounds x {args.duration} s = "
        f"{runs_per_round * args.rounds * args.duration / 60:.1f} min of load; load average now "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    memory = Target("memory", None, free_port(), api_key=f"dk_memory_{uuid.uuid4().hex}")
    targets = {"ours": Target("ours", REPO_ROOT, free_port()), "memory": memory}
    if args.before is not None:
        targets["before"] = Target("before", args.before.resolve(), free_port())
    run_id = uuid.uuid4().hex[:8]
    base_env = {**os.environ, "BROKER_URL": broker, "BROKER_KEY_PREFIX": f"distillery-bench-{run_id}:"}
    base_env["PYTHONUNBUFFERED"] = "1"
    results: list[WrkResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        pids: dict[str, int] = {}
        try:
            for target in targets.values():
                data_dir = tmp / f"data-{target.name}"
                data_dir.mkdir()
                if target.root is None:
                    env = {**base_env, MEMORY_KEY_ENV: target.api_key, "PYTHONPATH": str(REPO_ROOT)}
                    argv = uvicorn_argv("bench_api:build_memory_app", target.port, factory=True)
                    cwd = REPO_ROOT
                else:
                    prepare_tree(target, server_db=server_db, env=base_env, data_dir=data_dir)
                    env = tree_env(target.root, base_env, target.database_url, data_dir)
                    argv = uvicorn_argv("app.main:app", target.port)
                    cwd = target.root
                process = stack.enter_context(serve(argv, env, target.port, tmp / f"{target.name}.log", cwd))
                pids[target.name] = target.pid = process.pid
            import httpx

            for target in targets.values():
                created = httpx.post(
                    f"http://127.0.0.1:{target.port}/distillation/jobs",
                    json=spec,
                    headers={"Authorization": f"Bearer {target.api_key}"},
                )
                if created.status_code != 201:
                    raise RuntimeError(f"{target.name}: POST answered {created.status_code} {created.text}")
                target.job_id = created.json()["job_id"]
            if targets["memory"].list_key == "":
                targets["memory"].list_key = targets["memory"].api_key
            for round_index in range(args.rounds):
                for case in plan:
                    for name in case.targets:
                        profile = None
                        if args.profile and round_index == 0 and name in ("ours", "memory"):
                            slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{case.endpoint}_c{case.connections}")
                            profile = (pids[name], args.profile / f"{name}_{slug}.txt")
                        result = run_case(case, targets[name], tmp, spec, args.duration, profile)
                        results.append(result)
                        print(
                            f"round {round_index + 1} {name:7} {case.endpoint[:40]:40} "
                            f"c={case.connections:<3} {result.requests_per_second:9.1f} req/s  "
                            f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
                            f"cpu {result.server_cpu_us_per_request:6.0f} us/req  errors {result.errors}",
                            flush=True,
                        )
        finally:
            stack.close()
            for target in targets.values():
                if target.database_url:
                    drop_database(server_db, target.database_url)
            import redis

            client = redis.Redis.from_url(broker)
            for key in client.scan_iter(match=f"{base_env['BROKER_KEY_PREFIX']}*", count=1000):
                client.delete(key)
            client.close()

    summary = report(plan, results, with_before=args.before is not None)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.out:
        args.out.write_text(json.dumps({"runs": [asdict(r) for r in results], "summary": summary}, indent=2))


def report(plan: list[Case], results: list[WrkResult], *, with_before: bool) -> list[dict[str, Any]]:
    """Print medians, ratios to the in-memory app and the goals; return them as records."""
    goals = {"GET": 0.4, "POST": 0.2}
    summary: list[dict[str, Any]] = []
    print(
        "\nmedians (req/s, p99, server CPU per request) and ratios to the in-memory app in the same run "
        "(req/s ours / memory; cpu: memory's CPU per request / ours):"
    )
    for case in plan:
        row: dict[str, Any] = {"endpoint": case.endpoint, "connections": case.connections}
        for name in case.targets:
            row[name] = median_of(results, name, case)
        memory = row.get("memory")
        line = f"  {case.endpoint[:60]:60} c={case.connections:<3}"
        for name in ("ours", "before", "memory"):
            if row.get(name):
                figures = row[name]
                line += f" {name} {figures['requests_per_second']:7.0f}/s p99 {figures['p99_ms']:5.1f} ms"
                line += f" cpu {figures['server_cpu_us_per_request']:4.0f} us"
        if memory:
            method = case.endpoint.split()[0] if case.endpoint.startswith("POST") else "GET"
            for name in ("ours", "before"):
                if row.get(name):
                    ratio = row[name]["requests_per_second"] / memory["requests_per_second"]
                    row[f"{name}_ratio"] = round(ratio, 3)
                    cpu_ratio = memory["server_cpu_us_per_request"] / row[name]["server_cpu_us_per_request"]
                    row[f"{name}_cpu_ratio"] = round(cpu_ratio, 3)
                    line += f"  {name}/memory {ratio:.3f}x (cpu {cpu_ratio:.3f}x)"
            goal = goals[method]
            row["goal_ratio"] = goal
            line += f"  (goal >= {goal}x: {'met' if row['ours_ratio'] >= goal else 'NOT met'})"
        else:
            row["goal_p99_ms"] = 30.0
            line += f"  (goal p99 <= 30 ms: {'met' if row['ours']['p99_ms'] <= 30.0 else 'NOT met'})"
        print(line)
        summary.append(row)
    return summary


if __name__ == "__main__":
    main()
