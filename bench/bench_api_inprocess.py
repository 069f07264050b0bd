"""CPU per request of our app vs the in-memory app, driven in-process (ASGI calls, no sockets, no wrk).

A companion to bench_api.py that a busy machine distorts much less: each request is one ASGI call on one
event loop, timed with `time.process_time()` (this process's CPU only; the database server's is not in it),
so the figure is the app's own work per request. Needs PostgreSQL (DATABASE_URL names the server; a private
database is created and dropped). Cases: GET /distillation/jobs/{id}, POST /distillation/jobs (a pending
digits job), the first list page of 50 of 10,000 jobs; for ours also "without the access log line" (the
`distillery.http` logger off), which isolates the JSON access log's share. Prints µs per request and
memory's µs / ours (the CPU ratio). Sockets and HTTP parsing are left out (both servers pay them under wrk),
and requests run one at a time, so every database wait costs a whole event-loop turn that concurrent load
shares out: ours reads higher here than in bench_api.py's CPU column. Use it for shares, not the ratio goals.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres BROKER_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/bench_api_inprocess.py [--requests 3000]   # about 1 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import (
    _FILL_LIST,
    LIST_JOBS,
    LIST_STATUSES,
    LIST_TEACHERS,
    MEMORY_KEY_ENV,
    TINY_JOB,
    bench_environment,
    build_memory_app,
)

Message = dict[str, Any]


def http_scope(method: str, path: str, key: str, query: str = "") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {key}".encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


async def call(app: Any, scope: dict[str, Any], body: bytes = b"") -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def cpu_per_request(app: Any, scope: dict[str, Any], requests: int, body: bytes = b"") -> float:
    """CPU µs per request after a warm-up; raises unless the responses are 2xx."""
    for _ in range(200):
        await call(app, scope, body)
    start = time.process_time()
    for _ in range(requests):
        sent = await call(app, scope, body)
    elapsed = time.process_time() - start
    if not 200 <= sent[0]["status"] < 300:
        raise RuntimeError(f"{scope['method']} {scope['path']} answered {sent[0]['status']}: {sent[1]}")
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    with bench_environment():
        from sqlalchemy import text

        from app.core.db import get_engine, session_scope
        from app.main import create_app
        from app.services.auth import create_key

        with session_scope() as session:
            api_key = create_key(session, tenant_name="bench-api", name="bench").key
        with session_scope() as session:
            listing = create_key(session, tenant_name="bench-list", name="bench")
            list_key, list_tenant = listing.key, listing.tenant.id
        with get_engine().begin() as conn:
            conn.execute(
                text(_FILL_LIST),
                {
                    "spec": TINY_JOB.read_text(),
                    "teachers": list(LIST_TEACHERS),
                    "statuses": list(LIST_STATUSES),
                    "count": LIST_JOBS,
                    "tenant": list_tenant,
                },
            )
        os.environ[MEMORY_KEY_ENV] = api_key
        body = TINY_JOB.read_bytes()
        asyncio.run(measure(create_app(), build_memory_app(), api_key, list_key, body, args.requests))


async def measure(ours: Any, memory: Any, key: str, list_key: str, body: bytes, requests: int) -> None:
    async with ours.router.lifespan_context(ours):
        devnull = open(os.devnull, "w")  # noqa: SIM115  (the log lines are formatted, then dropped)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(devnull)
        created = await call(ours, http_scope("POST", "/distillation/jobs", key), body)
        job_id = json.loads(created[1]["body"])["job_id"]
        created = await call(memory, http_scope("POST", "/distillation/jobs", key), body)
        memory_id = json.loads(created[1]["body"])["job_id"]
        cases = [
            (
                "GET /distillation/jobs/{id}",
                "GET",
                f"/distillation/jobs/{job_id}",
                f"/distillation/jobs/{memory_id}",
            ),
            ("POST /distillation/jobs", "POST", "/distillation/jobs", "/distillation/jobs"),
        ]
        access_log = logging.getLogger("distillery.http")
        print(f"CPU µs per request, {requests} requests each (load average {os.getloadavg()[0]:.2f}):")
        for name, method, path, memory_path in cases:
            payload = body if method == "POST" else b""
            ours_us = await cpu_per_request(ours, http_scope(method, path, key), requests, payload)
            access_log.disabled = True
            quiet_us = await cpu_per_request(ours, http_scope(method, path, key), requests, payload)
            access_log.disabled = False
            memory_us = await cpu_per_request(memory, http_scope(method, memory_path, key), requests, payload)
            print(
                f"  {name:30} ours {ours_us:6.0f}  (without the access log line {quiet_us:6.0f})  "
                f"memory {memory_us:5.0f}  memory/ours {memory_us / ours_us:.3f}x"
            )
        list_scope = http_scope("GET", "/distillation/jobs", list_key, "limit=50")
        list_us = await cpu_per_request(ours, list_scope, max(requests // 5, 100))
        print(f"  {'GET /distillation/jobs?limit=50':30} ours {list_us:6.0f}  (10,000 jobs stored)")
        devnull.close()


if __name__ == "__main__":
    main()
