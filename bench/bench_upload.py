"""Upload validation: time at 1k, 10k and 100k columns, and the API's GET latency while one validates.

Part 1 times `datasets.check_file` (the schema check an upload gets) on a JSONL and a CSV file of --rows rows
of N columns, limits raised so the whole file is checked; beside it, the column bookkeeping of the previous
check (a list searched once per key: quadratic) at 1k and 10k columns. Part 2 serves the real app with
uvicorn (one process, embedded SQLite and broker in a temp DATA_DIR), uploads a --wide-columns x --wide-rows
JSONL file, and meanwhile measures GET /distillation/teachers latency from another connection, against the
same GET with the API idle; part 3 measures GETs with wrk while curl uploads a narrow CSV of --long-rows rows
(both clients in processes of their own). Figures, not pass/fail.

    .venv/bin/python bench/bench_upload.py [--rows 20] [--wide-columns 100000] [--wide-rows 20]
        [--long-rows 5000000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app.services.datasets import UploadLimits, check_file  # noqa: E402  (no torch)


def wide_jsonl(columns: int, rows: int) -> bytes:
    record = {"text": "a review", "label": 1} | {f"c{i}": i for i in range(columns - 2)}
    return (json.dumps(record) + "\n").encode() * rows


def wide_csv(columns: int, rows: int) -> bytes:
    header = ",".join(["text", "label", *(f"c{i}" for i in range(columns - 2))])
    row = ",".join(["a review", "1", *("0" for _ in range(columns - 2))])
    return (header + "\n" + (row + "\n") * rows).encode()


def old_column_union(path: Path) -> None:
    """The previous check's bookkeeping: `if key not in columns: columns.append(key)` per key and line."""
    columns: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            for key in json.loads(line):
                if key not in columns:
                    columns.append(key)


def best_of(repeats: int, action: object) -> float:
    assert callable(action)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return min(timings)


def validation_times(rows: int, folder: Path) -> None:
    limits = UploadLimits(max_columns=1_000_000, max_line_bytes=1 << 30)
    print(f"\n## validation time, {rows} rows of N columns (best of 3, seconds)\n")
    print("| columns | JSONL size | JSONL check | CSV check | previous bookkeeping, 1 row only |")
    print("|---:|---:|---:|---:|---:|")
    for columns in (1_000, 10_000, 100_000):
        jsonl = folder / f"w{columns}.jsonl"
        jsonl.write_bytes(wide_jsonl(columns, rows))
        csv_path = folder / f"w{columns}.csv"
        csv_path.write_bytes(wide_csv(columns, rows))
        t_jsonl = best_of(3, lambda p=jsonl: check_file(p, "jsonl", limits))
        t_csv = best_of(3, lambda p=csv_path: check_file(p, "csv", limits))
        one_row = folder / f"w{columns}-1.jsonl"
        one_row.write_bytes(wide_jsonl(columns, 1))
        old = f"{best_of(1, lambda p=one_row: old_column_union(p)):.3f}" if columns <= 10_000 else "(minutes)"
        size = jsonl.stat().st_size / 1e6
        print(f"| {columns:,} | {size:.1f} MB | {t_jsonl:.3f} | {t_csv:.3f} | {old} |")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served_app(env: dict[str, str]) -> Iterator[str]:
    """Migrate a fresh embedded database and serve `app.main:app` with uvicorn; yields the base URL."""
    Path(env["DATA_DIR"]).mkdir(parents=True, exist_ok=True)
    migrate = [sys.executable, "-m", "alembic", "upgrade", "head"]
    done = subprocess.run(migrate, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"alembic upgrade failed:\n{done.stderr[-2000:]}")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import httpx

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


def get_latencies(url: str, headers: dict[str, str], stop: threading.Event, out: list[float]) -> None:
    import httpx

    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get("/distillation/teachers").raise_for_status()
            out.append((time.perf_counter() - started) * 1000)


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"{len(values)} | {statistics.median(values):.1f} | {p99:.1f} | {max(values):.1f}"


def local_key(env: dict[str, str]) -> str:
    """The served app's local API key (created in its DATA_DIR)."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from app.core.config import get_settings\n"
            "from app.core.db import session_scope\n"
            "from app.services.auth import ensure_local_key\n"
            "with session_scope() as db:\n"
            "    print(ensure_local_key(db, path=get_settings().data_dir / 'api_key')[0])",
        ],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def latency_during_long_upload(rows: int, folder: Path) -> None:
    """GET latency from wrk (its own process, one connection) while curl uploads a narrow CSV of `rows` rows
    (long to check: one Python iteration per row); neither client shares the API's or this script's GIL."""
    csv_path = folder / "long.csv"
    csv_path.write_bytes(b"text,label\n" + b"a fairly ordinary review of a product,1\n" * rows)
    env = {
        **os.environ,
        "DATA_DIR": str(folder / "data-long"),
        "DATABASE_URL": "",
        "BROKER_URL": "",
        "ALLOWED_FILE_ROOT": "",
        "MAX_UPLOAD_BYTES": str(csv_path.stat().st_size + (1 << 20)),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO_ROOT),
    }
    with served_app(env) as url:
        auth = f"Authorization: Bearer {local_key(env)}"
        wrk = subprocess.Popen(
            ["wrk", "-c1", "-t1", "-d600s", "--latency", "-H", auth, f"{url}/distillation/teachers"],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        started = time.perf_counter()
        curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", auth, "-F", f"file=@{csv_path}"]
        upload = subprocess.run(
            [*curl, f"{url}/distillation/datasets"],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds = time.perf_counter() - started
        wrk.send_signal(signal.SIGINT)  # wrk prints its figures when interrupted
        report, _ = wrk.communicate(timeout=30)
    size = csv_path.stat().st_size / 1e6
    print(f"\n## GET latency (wrk, 1 connection) while curl uploads a {rows:,}-row CSV ({size:.1f} MB)\n")
    print(
        f"upload (receive + check + store): {seconds:.2f} s, answered {upload.stdout}; GETs from 0.5 s before"
    )
    for line in report.splitlines():
        if line.strip().startswith(("Latency", "50%", "90%", "99%", "Requests/sec")) or "requests in" in line:
            print(f"    {line.strip()}")


def latency_during_upload(columns: int, rows: int, folder: Path) -> None:
    import httpx

    data_dir = folder / "data"
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": "",
        "BROKER_URL": "",
        "ALLOWED_FILE_ROOT": "",
        "MAX_UPLOAD_COLUMNS": str(columns + 10),
        "MAX_UPLOAD_LINE_BYTES": str(64 << 20),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO_ROOT),
    }
    body = wide_jsonl(columns, rows)
    env["MAX_UPLOAD_BYTES"] = str(max(50 << 20, len(body) + (1 << 20)))
    with served_app(env) as url:
        headers = {"Authorization": f"Bearer {local_key(env)}"}
        idle: list[float] = []
        stop = threading.Event()
        timer = threading.Timer(3.0, stop.set)
        timer.start()
        get_latencies(url, headers, stop, idle)
        during: list[float] = []
        stop = threading.Event()
        reader = threading.Thread(target=get_latencies, args=(url, headers, stop, during))
        reader.start()
        started = time.perf_counter()
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            response = client.post("/distillation/datasets", files={"file": ("wide.jsonl", body)})
        upload_seconds = time.perf_counter() - started
        stop.set()
        reader.join()
        assert response.status_code == 201, response.text
    size = len(body) / 1e6
    print(f"\n## GET latency while a {columns:,}-column x {rows}-row JSONL ({size:.1f} MB) uploads\n")
    print(f"upload (receive + validate + store): {upload_seconds:.2f} s, answered {response.status_code}\n")
    print("| API | GETs | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    print(f"| idle | {summary(idle)} |")
    print(f"| during the upload | {summary(during)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--wide-columns", type=int, default=100_000)
    parser.add_argument("--wide-rows", type=int, default=20)
    parser.add_argument(
        "--long-rows", type=int, default=5_000_000, help="rows of the long-to-check CSV (0: skip)"
    )
    args = parser.parse_args()
    print(f"uptime: {os.popen('uptime').read().strip()}")
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as folder:
        validation_times(args.rows, Path(folder))
        latency_during_upload(args.wide_columns, args.wide_rows, Path(folder))
        if args.long_rows:
            latency_during_long_upload(args.long_rows, Path(folder))
    print(f"\nuptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
