"""A real uvicorn subprocess serving the API on the run's test database (for streams and the CLI)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# Open event streams would otherwise hold a graceful shutdown until their jobs end.
GRACE = ["--timeout-graceful-shutdown", "1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_server(
    env: dict[str, str] | None = None, *, port: int | None = None, startup_timeout: float = 30.0
) -> Iterator[str]:
    """Start `uvicorn app.main:app` on `port` (default: a free one) with the test environment (+ `env`)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    # A file, not a pipe: a chatty server never blocks on a full pipe.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *GRACE,
            ],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    output = log.read().decode(errors="replace")
                    raise RuntimeError(f"uvicorn exited with {process.returncode}:\n{output}")
                try:
                    if httpx.get(f"{url}/openapi.json", timeout=2.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"uvicorn did not answer on {url} within {startup_timeout} s")
                time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
