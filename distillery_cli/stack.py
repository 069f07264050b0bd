"""`distillery up`: migrate, seed teachers, then run and supervise API + scheduler + one Celery worker.

Works on the embedded default with no server: a SQLite file and Kombu's filesystem broker under DATA_DIR.
Each child's output is printed with a prefix (`api |`, `scheduler |`, `worker |`); Ctrl-C or SIGTERM stops
all of them; if one dies, the others are stopped and `up` exits non-zero.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import typer

from distillery_cli import config as cli_config

_REPO_ROOT = Path(__file__).resolve().parents[1]
_STOP_GRACE_SECONDS = 20.0


@dataclass
class Child:
    """One supervised process and the thread that copies its output with a prefix."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    pump: threading.Thread | None = field(default=None, repr=False)


def migrate() -> None:
    """`alembic upgrade head` on the configured database (what `make run` and compose's migrate do)."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(_REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(_REPO_ROOT / "migrations"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def seed_teachers() -> int:
    """Register the default teachers (idempotent)."""
    from app.core.db import session_scope
    from app.services.teachers import seed_default_teachers

    with session_scope() as session:
        return seed_default_teachers(session)


def local_api_key(data_dir: Path) -> tuple[str, bool]:
    """The local tenant's key in DATA_DIR/api_key (mode 0600), created on first start; (key, created)."""
    from app.core.db import session_scope
    from app.services.auth import ensure_local_key

    with session_scope() as session:
        return ensure_local_key(session, path=data_dir / "api_key")


def child_commands(host: str, port: int, concurrency: int) -> list[Child]:
    """The three processes of the stack, run with this interpreter."""
    python = sys.executable
    return [
        Child("api", [python, "-m", "uvicorn", "app.main:app", "--host", host, "--port", str(port)]),
        Child("scheduler", [python, "-m", "app.scheduler"]),
        Child(
            "worker",
            [
                python,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                "worker",
                "-Q",
                "training",
                "-c",
                str(concurrency),
                "-n",
                "distillery@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ],
        ),
    ]


def _pump(name: str, stream: IO[bytes], width: int) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip()
        sys.stdout.write(f"{name:<{width}} | {line}\n")
        sys.stdout.flush()
    stream.close()


def _start(child: Child, width: int, env: dict[str, str]) -> None:
    child.process = subprocess.Popen(
        child.argv,
        cwd=_REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # signals reach children only through us, in order
    )
    assert child.process.stdout is not None
    child.pump = threading.Thread(target=_pump, args=(child.name, child.process.stdout, width), daemon=True)
    child.pump.start()


def _stop_all(children: list[Child]) -> None:
    """SIGTERM every live child (API first, worker last), wait, then SIGKILL what is left."""
    for child in children:
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)  # the leader stops its own children (warm shutdown)
    deadline = time.monotonic() + _STOP_GRACE_SECONDS
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            typer.echo(f"{child.name} did not stop within {_STOP_GRACE_SECONDS:.0f} s; killing it", err=True)
            os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
        if child.pump is not None:
            child.pump.join(timeout=2)


def supervise(children: list[Child], env: dict[str, str]) -> int:
    """Start the children and wait; 0 after Ctrl-C/SIGTERM, 1 if a child died on its own."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    width = max(len(child.name) for child in children)
    died: Child | None = None
    try:
        for child in children:
            _start(child, width, env)
        while not stop.wait(0.5):
            died = next((c for c in children if c.process is not None and c.process.poll() is not None), None)
            if died is not None:
                break
    finally:
        _stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if died is not None:
        code = died.process.returncode if died.process is not None else None
        typer.echo(f"{died.name} exited with code {code}; stopped the stack", err=True)
        return 1
    return 0


def _reachable(host: str) -> str:
    """The address a local client uses for a server bound to `host` (a wildcard means this machine)."""
    if host in {"", "0.0.0.0", "::", "[::]"}:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def register(app: typer.Typer) -> None:
    """Add `up` to the CLI."""

    @app.command()
    def up(
        host: str | None = typer.Option(None, help="API host (default HOST or 127.0.0.1)."),
        port: int | None = typer.Option(None, help="API port (default PORT or 8000)."),
        concurrency: int | None = typer.Option(
            None, help="Worker processes' jobs at once (WORKER_CONCURRENCY)."
        ),
        write_config: bool = typer.Option(
            True, help="Save this stack's URL and key to the CLI's config file (as `distillery login`)."
        ),
    ) -> None:
        """Run the whole service here: migrate, then API + scheduler + a Celery worker (Ctrl-C stops)."""
        from app.core.config import get_settings

        settings = get_settings()
        settings.ensure_dirs()
        typer.echo(f"data dir: {settings.data_dir}")
        typer.echo(f"database: {'embedded SQLite' if not settings.database_url else 'DATABASE_URL'}")
        typer.echo(f"broker:   {'embedded filesystem' if settings.is_embedded_broker else 'BROKER_URL'}")
        migrate()
        seeded = seed_teachers()
        typer.echo(f"migrated; {seeded} teacher(s) newly registered")
        key, created = local_api_key(settings.data_dir)
        key_file = settings.data_dir / "api_key"
        if created:
            typer.echo(f"API key (new, saved to {key_file}; the CLI reads it from there): {key}")
        else:
            typer.echo(f"API key: {key[:11]}... (in {key_file})")
        host = host or settings.host
        port = port or settings.port
        api_url = f"http://{_reachable(host)}:{port}"
        typer.echo(f"API on {api_url}  (docs: /docs)")
        # Beside the key, so a CLI pointed at this DATA_DIR (or run from this folder) finds the port too.
        (settings.data_dir / "url").write_text(api_url + "\n", encoding="utf-8")
        if write_config:
            path = cli_config.write_config(url=api_url, api_key=key)
            typer.echo(f"CLI config: {path} (url and key; `distillery` finds this stack from any folder)")
        children = child_commands(host, port, concurrency or settings.worker_concurrency)
        # Children run from the repository root: pin DATA_DIR so a relative default means the same place.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DATA_DIR": str(settings.data_dir)}
        raise typer.Exit(supervise(children, env))
