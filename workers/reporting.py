"""EngineCallbacks writing a job's progress, metrics and events to the database, throttled, under its lease.

A background thread refreshes the job's heartbeat every HEARTBEAT_INTERVAL so the scheduler can tell a live
job from one whose worker died; `should_stop()` answers True once the job is `cancelling` or `pausing`, or
the lease was taken away (re-queued after a stale heartbeat, or claimed by another worker).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.core.config import Settings
from app.core.db import session_scope
from app.services import checkpoints, lifecycle
from app.services.lifecycle import Claim
from workers.distill.contract import Progress

log = logging.getLogger(__name__)

# should_stop() reads the database at most this often; the engine calls it every few steps.
STOP_CHECK_CACHE_SECONDS = 0.5
# Progress events (the history) are rarer than progress writes (the latest state).
PROGRESS_EVENT_MIN_SECONDS = 5.0
# may_write() holds while the lease's last renewal is younger than this share of HEARTBEAT_TIMEOUT. The
# scheduler re-queues a job only once its heartbeat is older than the whole timeout, so a write begun inside
# the window has the rest of it (30 s by default) before another worker can own the job's folder.
WRITE_WINDOW_SHARE = 0.5
# A stale lease is renewed by may_write() itself at most this often (the heartbeat thread may be stuck).
RENEW_RETRY_SECONDS = 1.0


class JobReporter:
    """Reports one claimed job's progress to the database; use as a context manager around the engine."""

    def __init__(self, claim: Claim, settings: Settings) -> None:
        self.claim = claim
        self._settings = settings
        self._lock = threading.Lock()
        self._latest: Progress | None = None
        self._latest_written = True
        self._written_phase: str | None = None
        self._percent_floor = 0.0  # the job's progress only moves forward within this attempt
        self._last_write = 0.0
        self._last_progress_event = 0.0
        self._epoch_metrics: dict[str, Any] = {}
        self._stop_cache: tuple[float, bool] = (0.0, False)
        self._lease_lost = threading.Event()
        self._closing = threading.Event()
        # When a guarded write last renewed the lease (monotonic, taken before it): the claim just did.
        self._renewed_at = time.monotonic()
        self._renew_tried_at = 0.0
        self._thread = threading.Thread(
            target=self._beat_forever, name=f"heartbeat-{claim.job_id[:8]}", daemon=True
        )

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> JobReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush the last progress report and stop the heartbeat thread."""
        self._flush()
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._settings.heartbeat_interval + 5)

    @property
    def lease_lost(self) -> bool:
        return self._lease_lost.is_set()

    def _renewed(self, since: float) -> None:
        """A guarded write sent at `since` (monotonic) held the lease: heartbeat_at is at least that new."""
        self._renewed_at = max(self._renewed_at, since)

    def _beat_forever(self) -> None:
        while not self._closing.wait(self._settings.heartbeat_interval):
            try:
                with session_scope() as session:
                    sent = time.monotonic()
                    alive = lifecycle.heartbeat(
                        session, job_id=self.claim.job_id, lease_token=self.claim.lease_token
                    )
                    if alive:
                        self._renewed(sent)
                    if (
                        not alive
                        and not lifecycle.read_lease(
                            session, job_id=self.claim.job_id, lease_token=self.claim.lease_token
                        ).held
                    ):
                        log.warning("job %s: lease lost; stopping at the next check", self.claim.job_id)
                        self._lease_lost.set()
                        return
            except SQLAlchemyError as exc:
                log.warning(
                    "job %s: heartbeat failed (retrying): %s", self.claim.job_id, exc.__class__.__name__
                )

    # -- EngineCallbacks ---------------------------------------------------------------------------------
    def on_progress(self, progress: Progress) -> None:
        """Keep the latest report; write it when the phase changed or PROGRESS_MIN_INTERVAL has passed."""
        with self._lock:
            self._latest = progress
            self._latest_written = False
            now = time.monotonic()
            due = now - self._last_write >= self._settings.progress_min_interval
            if progress.phase != self._written_phase or due:
                self._write_latest(now)

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        """Store the event while the lease holds; a metric event also becomes the job's latest metrics."""
        if kind == "metric":
            with self._lock:
                self._epoch_metrics = {k: v for k, v in data.items() if isinstance(v, int | float | str)}
        if kind == "phase":
            self._flush()
        if self._lease_lost.is_set():
            return
        if kind == "checkpoint" and ("kept" in data or "removed" in data):
            self._record_checkpoint(data)
            return
        try:
            sent = time.monotonic()
            with session_scope() as session:
                held = lifecycle.record_event_if_held(
                    session,
                    job_id=self.claim.job_id,
                    lease_token=self.claim.lease_token,
                    kind=kind[:16],
                    message=message,
                    data=_jsonable(data),
                    attempt=self.claim.attempt,
                )
            if not held:
                log.warning("job %s: lease lost; %s event not stored", self.claim.job_id, kind)
                self._lease_lost.set()
            else:
                self._renewed(sent)
        except SQLAlchemyError as exc:
            log.warning(
                "job %s: could not store a %s event: %s", self.claim.job_id, kind, exc.__class__.__name__
            )

    def _record_checkpoint(self, data: dict[str, Any]) -> None:
        """A kept checkpoint written or dropped: its row in `job_checkpoints` (no event: one per epoch)."""
        try:
            with session_scope() as session:
                if "kept" in data:
                    held = checkpoints.record_kept(
                        session,
                        job_id=self.claim.job_id,
                        lease_token=self.claim.lease_token,
                        data=_jsonable(data),
                    )
                else:
                    held = checkpoints.record_removed(
                        session,
                        job_id=self.claim.job_id,
                        lease_token=self.claim.lease_token,
                        name=str(data["removed"]),
                    )
            if not held:
                self._lease_lost.set()
        except SQLAlchemyError as exc:
            log.warning(
                "job %s: could not record a checkpoint: %s", self.claim.job_id, exc.__class__.__name__
            )

    def may_write(self) -> bool:
        """True while this worker may write the job's files: its lease was renewed (a guarded write held)
        within WRITE_WINDOW_SHARE of HEARTBEAT_TIMEOUT, so no other worker can have taken the job over.

        Past the window (the database out of reach, or the heartbeat thread stuck) it renews the lease
        itself, at most every RENEW_RETRY_SECONDS, and answers False until that succeeds."""
        if self._lease_lost.is_set():
            return False
        now = time.monotonic()
        if now - self._renewed_at < self._settings.heartbeat_timeout * WRITE_WINDOW_SHARE:
            return True
        if now - self._renew_tried_at < RENEW_RETRY_SECONDS:
            return False
        self._renew_tried_at = now
        try:
            with session_scope() as session:
                held = lifecycle.heartbeat(
                    session, job_id=self.claim.job_id, lease_token=self.claim.lease_token
                )
        except SQLAlchemyError as exc:
            log.warning(
                "job %s: lease renewal before a write failed: %s", self.claim.job_id, exc.__class__.__name__
            )
            return False
        if held:
            self._renewed(now)
        return held  # False: lost, or the job no longer live (should_stop tells which)

    def should_stop(self) -> bool:
        """True when the job is being cancelled or paused, or this worker's lease is gone (cached ~0.5 s)."""
        if self._lease_lost.is_set():
            return True
        checked_at, answer = self._stop_cache
        now = time.monotonic()
        if now - checked_at < STOP_CHECK_CACHE_SECONDS:
            return answer
        try:
            with session_scope() as session:
                state = lifecycle.read_lease(
                    session, job_id=self.claim.job_id, lease_token=self.claim.lease_token
                )
        except SQLAlchemyError as exc:
            log.warning(
                "job %s: stop check failed (continuing): %s", self.claim.job_id, exc.__class__.__name__
            )
            return answer
        if not state.held:
            self._lease_lost.set()
        self._stop_cache = (now, state.should_stop)
        return state.should_stop

    # -- writes ------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        with self._lock:
            if not self._latest_written:
                self._write_latest(time.monotonic())

    def _write_latest(self, now: float) -> None:
        progress = self._latest
        if progress is None:
            return
        metrics: dict[str, Any] = {**self._epoch_metrics, **progress.metrics}
        for key in ("stage", "epoch", "step", "total_steps"):
            value = getattr(progress, key)
            if value is not None:
                metrics[key] = value
        percent = max(self._percent_floor, round(100.0 * max(0.0, min(1.0, progress.fraction)), 2))
        phase_changed = progress.phase != self._written_phase
        want_event = phase_changed or now - self._last_progress_event >= max(
            PROGRESS_EVENT_MIN_SECONDS, self._settings.progress_min_interval
        )
        try:
            sent = time.monotonic()
            with session_scope() as session:
                held = lifecycle.update_progress(
                    session,
                    job_id=self.claim.job_id,
                    lease_token=self.claim.lease_token,
                    progress=percent,
                    phase=progress.phase,
                    eta_seconds=progress.eta_seconds,
                    metrics=_jsonable(metrics),
                )
                if held and want_event:
                    lifecycle.record_event(
                        session,
                        job_id=self.claim.job_id,
                        kind="progress",
                        message=f"{progress.phase} {percent:.1f}%",
                        data=_jsonable(
                            {
                                "progress": percent,
                                "eta_seconds": progress.eta_seconds,
                                **metrics,
                                "phase": progress.phase,
                            }
                        ),
                        attempt=self.claim.attempt,
                    )
        except SQLAlchemyError as exc:
            log.warning("job %s: progress write failed: %s", self.claim.job_id, exc.__class__.__name__)
            return
        self._last_write = now
        self._percent_floor = percent
        self._latest_written = True
        self._written_phase = progress.phase
        if want_event:
            self._last_progress_event = now
        if not held:
            self._lease_lost.set()
        else:
            self._renewed(sent)


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (numbers from numpy/torch become floats, unknown objects strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            return str(value)
    return str(value)
