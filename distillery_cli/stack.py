"""`distillery up`: migrate, seed teachers, then run and supervise API + scheduler + one Celery worker.

Works on the embedded default with no server: a SQLite file and Kombu's filesystem broker under DATA_DIR.
Each child's output is printed with a prefix (`api |`, `scheduler |`, `worker |`).

- A child that exits on its own is restarted after a backoff (1 s, doubling up to 30 s), and `up` says so;
  after MAX_FAST_CRASHES crashes in a row, each within FAST_CRASH_SECONDS of its start, `up` stops the stack
  and exits 1 naming the child (a port in use, a broken setting: restarting will not help).
- Ctrl-C or SIGTERM stops all of them: SIGTERM to each, the API first. An idle worker stops in about a
  second (see distillery_cli/embedded_worker.py); one still running a job after `--stop-grace` seconds is
  killed, and its job is re-queued from its last checkpoint by the scheduler's stale-heartbeat check.
- Children die with `up` even when it is killed with SIGKILL: each runs under distillery_cli/guard.py,
  which arms PR_SET_PDEATHSIG (Linux) before exec.
"""

from __future__ import annotations

import contextlib
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
# The API and scheduler stop in well under a second; this bounds a stuck one before SIGKILL.
_STOP_GRACE_SECONDS = 10.0
# Restart policy: a crash within FAST_CRASH_SECONDS of the start counts towards giving up.
FAST_CRASH_SECONDS = 30.0
MAX_FAST_CRASHES = 5
FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0


@dataclass
class Child:
    """One supervised process, the thread that copies its output with a prefix, and its restart state."""

    name: str
    argv: list[str]
    # The signal the kernel sends this child when `up` dies (the worker's SIGKILL skips a warm shutdown
    # that would wait for a running job; its job is re-queued from the database).
    death_signal: str = "SIGTERM"
    process: subprocess.Popen[bytes] | None = None
    pump: threading.Thread | None = field(default=None, repr=False)
    started_at: float = 0.0
    fast_crashes: int = 0
    restart_at: float | None = None


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a crashed child and when to give up."""

    first_delay: float = FIRST_RESTART_DELAY
    max_delay: float = MAX_RESTART_DELAY
    fast_crash_seconds: float = FAST_CRASH_SECONDS
    max_fast_crashes: int = MAX_FAST_CRASHES

    def delay(self, crashes: int) -> float:
        return min(self.max_delay, self.first_delay * 2 ** max(0, crashes - 1))


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
    """The three processes of the stack, run with this interpreter.

    One job at a time (the default) runs in the worker process itself (`--pool solo`): a prefork pool
    process sleeps a fixed second before it exits, which was most of an idle stop. A crash of the solo
    worker is a crash of the child, which `up` restarts.
    """
    python = sys.executable
    pool = ["--pool", "solo"] if concurrency == 1 else ["--pool", "prefork", "-c", str(concurrency)]
    worker = [python, "-m", "distillery_cli.embedded_worker", "-Q", "training", *pool, "-n", "distillery@%h"]
    return [
        Child("api", [python, "-m", "uvicorn", "app.main:app", "--host", host, "--port", str(port)]),
        Child("scheduler", [python, "-m", "app.scheduler"]),
        Child(
            "worker",
            [*worker, "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
            death_signal="SIGKILL",
        ),
    ]


def _pump(name: str, stream: IO[bytes], width: int) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip()
        sys.stdout.write(f"{name:<{width}} | {line}\n")
        sys.stdout.flush()
    stream.close()


def _start(child: Child, width: int, env: dict[str, str]) -> None:
    """Start `child` under the guard (dies with us), in a session of its own: signals reach it only
    through us, in order, and a Ctrl-C in the terminal does not hit every child at once."""
    guarded = [
        sys.executable,
        "-m",
        "distillery_cli.guard",
        child.death_signal,
        str(os.getpid()),
        *child.argv,
    ]
    child.process = subprocess.Popen(
        guarded,
        cwd=_REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    child.started_at = time.monotonic()
    assert child.process.stdout is not None
    child.pump = threading.Thread(target=_pump, args=(child.name, child.process.stdout, width), daemon=True)
    child.pump.start()


def _kill_group(child: Child) -> None:
    assert child.process is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.process.pid, signal.SIGKILL)  # its own session: pool processes included
    child.process.wait()


def _stop_all(children: list[Child], *, worker_grace: float) -> None:
    """SIGTERM every live child (API first), wait, then SIGKILL what is left; say how long each took."""
    started = time.monotonic()
    live = [c for c in children if c.process is not None and c.process.poll() is None]
    for child in live:
        assert child.process is not None
        child.process.send_signal(signal.SIGTERM)
    took: list[str] = []
    for child in live:
        assert child.process is not None
        grace = worker_grace if child.name == "worker" else _STOP_GRACE_SECONDS
        try:
            child.process.wait(timeout=max(0.1, started + grace - time.monotonic()))
        except subprocess.TimeoutExpired:
            if child.name == "worker":
                typer.echo(
                    f"worker still busy after {grace:.0f} s; killing it (its job is re-queued from the last "
                    "checkpoint once its heartbeat is stale)",
                    err=True,
                )
            else:
                typer.echo(f"{child.name} did not stop within {grace:.0f} s; killing it", err=True)
            _kill_group(child)
        took.append(f"{child.name} {time.monotonic() - started:.1f} s")
        if child.pump is not None:
            child.pump.join(timeout=2)
    if took:
        typer.echo(f"stopped: {', '.join(took)}")


def _check_children(children: list[Child], policy: RestartPolicy, now: float) -> Child | None:
    """Schedule restarts of children that exited; the child to give up on, if one crashed too often."""
    for child in children:
        if child.restart_at is not None or child.process is None:
            continue
        code = child.process.poll()
        if code is None:
            continue
        if child.pump is not None:
            child.pump.join(timeout=1)  # its last lines first
        ran = now - child.started_at
        child.fast_crashes = child.fast_crashes + 1 if ran < policy.fast_crash_seconds else 1
        if child.fast_crashes > policy.max_fast_crashes:
            return child
        delay = policy.delay(child.fast_crashes)
        typer.echo(
            f"{child.name} exited with code {code} after {ran:.1f} s; restarting it in {delay:.0f} s "
            f"(crash {child.fast_crashes} of {policy.max_fast_crashes} allowed in a row)",
            err=True,
        )
        child.restart_at = now + delay
    return None


def supervise(
    children: list[Child],
    env: dict[str, str],
    *,
    policy: RestartPolicy | None = None,
    worker_grace: float = 10.0,
) -> int:
    """Start the children and keep them running; 0 after Ctrl-C/SIGTERM, 1 when one kept crashing.

    Children are started and restarted from this (the main) thread only: the kernel's parent-death
    signal follows the thread that forked the child.
    """
    policy = policy or RestartPolicy()
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    width = max(len(child.name) for child in children)
    gave_up: Child | None = None
    try:
        for child in children:
            _start(child, width, env)
        while not stop.wait(0.2):
            now = time.monotonic()
            gave_up = _check_children(children, policy, now)
            if gave_up is not None:
                break
            for child in children:
                if child.restart_at is not None and now >= child.restart_at and not stop.is_set():
                    child.restart_at = None
                    typer.echo(f"restarting {child.name}", err=True)
                    _start(child, width, env)
    finally:
        _stop_all(children, worker_grace=worker_grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if gave_up is not None:
        code = gave_up.process.returncode if gave_up.process is not None else None
        typer.echo(
            f"{gave_up.name} exited {gave_up.fast_crashes} times in a row, each within "
            f"{policy.fast_crash_seconds:.0f} s of starting (last exit code {code}); stopped the stack. "
            f"Its output above says why.",
            err=True,
        )
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
        stop_grace: float = typer.Option(
            10.0, help="Seconds a worker running a job gets to finish it at Ctrl-C before it is killed."
        ),
        max_restarts: int = typer.Option(
            MAX_FAST_CRASHES, help="Crashes in a row (each soon after its start) before `up` gives up."
        ),
        restart_delay: float = typer.Option(
            FIRST_RESTART_DELAY, help="Seconds before the first restart of a crashed child (then doubling)."
        ),
        write_config: bool = typer.Option(
            True, help="Save this stack's URL and key to the CLI's config file (as `distillery login`)."
        ),
        files: Path | None = typer.Option(
            None,
            "--files",
            help="A folder of your own that `file` datasets and local teachers/students may read "
            "(sets ALLOWED_FILE_ROOT for the stack; it must not overlap DATA_DIR).",
        ),
    ) -> None:
        """Run the whole service here: migrate, then API + scheduler + a Celery worker (Ctrl-C stops)."""
        from pydantic import ValidationError

        from app.core.config import get_settings

        if files is not None:
            os.environ["ALLOWED_FILE_ROOT"] = str(files.expanduser().resolve())
            get_settings.cache_clear()
        try:
            settings = get_settings()
        except ValidationError as exc:
            for error in exc.errors():
                typer.echo(f"invalid settings: {error['msg']}", err=True)
            raise typer.Exit(2) from exc
        settings.ensure_dirs()
        typer.echo(f"data dir: {settings.data_dir}")
        typer.echo(f"database: {'embedded SQLite' if not settings.database_url else 'DATABASE_URL'}")
        typer.echo(f"broker:   {'embedded filesystem' if settings.is_embedded_broker else 'BROKER_URL'}")
        root = settings.allowed_file_root
        off = "off (uploads only; --files DIR allows a folder)"
        typer.echo(f"files:    {root if root is not None else off}")
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
        policy = RestartPolicy(first_delay=restart_delay, max_fast_crashes=max_restarts)
        raise typer.Exit(supervise(children, env, policy=policy, worker_grace=stop_grace))
