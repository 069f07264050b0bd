"""The engine's contract with its callers (Celery task, CLI runner, tests, benchmarks). No torch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from app.core.paths import PathKind, PathRefused, resolve_path
from app.schemas.teachers import TeacherSource


@dataclass(frozen=True)
class Progress:
    """One progress report. `fraction` covers the whole job (0..1), across phases and stages."""

    # "teacher", "teacher_finetune", "cache", "baseline", "distill", "compress", "evaluate", "export"
    phase: str
    fraction: float
    stage: int | None = None  # 1-based progressive stage
    epoch: int | None = None  # 1-based epoch within the stage
    step: int | None = None  # optimizer steps done within the epoch
    total_steps: int | None = None  # steps per epoch
    metrics: dict[str, float] = field(default_factory=dict)
    eta_seconds: float | None = None


class EngineCallbacks(Protocol):
    """What the engine calls while it works. Every method must return quickly."""

    def on_progress(self, progress: Progress) -> None:
        """Progress within a phase; the caller throttles writes."""

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        """A notable moment: phase start/end, epoch metrics (kind 'metric'), checkpoint written."""

    def should_stop(self) -> bool:
        """True when the job was cancelled or its lease lost; checked every few steps and between phases."""

    def may_write(self) -> bool:
        """True while the run may write its job's files (checkpoints, kept weights, artifacts) now.

        A worker answers from its lease: renewed recently enough that no other worker can have taken the job
        over yet (`workers.reporting.JobReporter.may_write`). False: the engine skips an epoch's checkpoint
        and waits (a bounded time) before the delivered student's files, so a worker cut off from the
        database never overwrites what the job's next attempt wrote."""


class NullCallbacks:
    """Callbacks that do nothing (tests and benchmarks)."""

    def on_progress(self, progress: Progress) -> None:
        return None

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        return None

    def should_stop(self) -> bool:
        return False

    def may_write(self) -> bool:
        return True


class EngineError(Exception):
    """A failure the job reports as `error: {code, message}`; the message tells a person what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def resolve_local_path(
    text: str, file_root: Path | None, *, kind: PathKind, what: str, missing_code: str
) -> Path:
    """The engine's side of the one path helper (`app.core.paths`): PathRefused becomes an EngineError.

    `missing_code` is the job's error code when nothing is there (dataset_invalid, teacher_not_found); a path
    outside `file_root` is `path_outside_root`, a malformed one `path_invalid`.
    """
    try:
        return resolve_path(text, root=file_root, kind=kind, what=what)
    except PathRefused as exc:
        raise EngineError(missing_code if exc.code == "path_not_found" else exc.code, exc.message) from exc


class JobStopped(Exception):
    """Raised when `should_stop()` answered True; the last checkpoint is kept."""


# Seconds between should_stop / progress calls inside an epoch (a cancel lands well within ~1 s).
CHECK_INTERVAL_S = 0.2


class StopChecker:
    """Rate-limited should_stop: at most every CHECK_INTERVAL_S, and always when forced."""

    def __init__(self, callbacks: EngineCallbacks) -> None:
        self.callbacks = callbacks
        self.last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self.last >= CHECK_INTERVAL_S

    def check(self, where: str) -> None:
        self.last = time.monotonic()
        if self.callbacks.should_stop():
            raise JobStopped(f"stopped {where}")


# How often `await_write` asks again while the job's files may not be written.
WRITE_POLL_S = 0.25


def await_write(callbacks: EngineCallbacks, what: str, *, timeout_s: float) -> None:
    """Return once `callbacks.may_write()`; JobStopped if the job is stopped, or the answer stays False for
    `timeout_s` (a worker that cannot renew its lease that long must assume another took the job over)."""
    if callbacks.may_write():
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callbacks.should_stop():
            raise JobStopped(f"stopped before writing {what}")
        time.sleep(WRITE_POLL_S)
        if callbacks.may_write():
            return
    raise JobStopped(f"stopped before writing {what}: the job's lease was not renewed for {timeout_s:.0f} s")


@dataclass(frozen=True)
class JobPaths:
    """Where one job keeps its files. `work_dir/checkpoints` and `work_dir/artifacts`."""

    work_dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def artifacts(self) -> Path:
        return self.work_dir / "artifacts"


@dataclass(frozen=True)
class NamedStudent:
    """A student the client named (`JobSpec.student` other than 'derived'), resolved to where it lives.

    The caller resolves it (the worker looks a 'registry' name up in the database; `runner.named_student`
    does it for the CLI and tests), so the engine never reads the registry itself.
    - kind 'registry' | 'hub' | 'local': `source` says where the model is (`TeacherSource`: a local
      directory or file, a hub id, or a built-in name); `overrides` is empty.
    - kind 'config': `source` is None; `overrides` are config fields changed on the teacher's architecture.
    """

    kind: Literal["registry", "hub", "local", "config"]
    name: str  # as the client named it (registry name, hub id, path, or "config"), for messages and results
    source: TeacherSource | None = None
    overrides: dict[str, bool | int | float | str] = field(default_factory=dict)


# Artifact file names, shared by the engine, the worker and the API.
ARTIFACT_WEIGHTS = "student.safetensors"
ARTIFACT_CONFIG = "student_config.json"
ARTIFACT_RESULTS = "results.json"
ARTIFACT_EXPORT = "student.pt2"
