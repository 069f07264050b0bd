"""`EngineConfig`: the settings the engine reads, given by its callers (never from os.environ)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.core.config import Settings


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings for one `run_job` call; defaults are the service's defaults."""

    # teacher_cache=auto caches the teacher's outputs over the train split when they fit in this many bytes.
    teacher_cache_max_bytes: int = 2 * 2**30
    # Minimum seconds between epoch checkpoints (0: every epoch; the last epoch and a stop always write).
    checkpoint_min_interval_s: float = 0.0
    # The reusable teacher-signal cache (LM top-k logits): its DATA_DIR (None: off), its size bound over
    # every owner (LRU eviction), and the owner of the caches this job creates and may reuse (its tenant).
    signal_cache_dir: Path | None = None
    signal_cache_max_bytes: int = 20 * 2**30
    signal_cache_owner: str = "local"
    # A multi-process job's collective timeout (and stop grace): below HEARTBEAT_TIMEOUT's default, so a
    # hung rank fails the job before the scheduler thinks the worker is gone.
    distributed_timeout_s: float = 45.0
    # Kept checkpoints per job (student weights): `last`, `best`, and the most recent epochs up to this many.
    checkpoint_keep: int = 3
    # How long the delivered student's files wait for `may_write()` (the lease renewed) before the run stops:
    # HEARTBEAT_TIMEOUT, past which the scheduler has re-queued a job whose worker stopped renewing.
    write_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.checkpoint_keep < 2:
            raise ValueError("checkpoint_keep must be >= 2 (last and best)")
        if self.teacher_cache_max_bytes < 0:
            raise ValueError("teacher_cache_max_bytes must be >= 0")
        if self.checkpoint_min_interval_s < 0:
            raise ValueError("checkpoint_min_interval_s must be >= 0")
        if self.distributed_timeout_s <= 0:
            raise ValueError("distributed_timeout_s must be > 0")
        if self.write_wait_s < 0:
            raise ValueError("write_wait_s must be >= 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        """The engine's share of the app Settings (TEACHER_CACHE_MAX_BYTES, CHECKPOINT_MIN_INTERVAL_S,
        CHECKPOINT_KEEP, DISTRIBUTED_TIMEOUT_S, TEACHER_SIGNAL_CACHE_MAX_BYTES, HEARTBEAT_TIMEOUT); the cache
        owner is the job's, set by the caller."""
        return cls(
            teacher_cache_max_bytes=settings.teacher_cache_max_bytes,
            checkpoint_min_interval_s=settings.checkpoint_min_interval_s,
            distributed_timeout_s=settings.distributed_timeout_s,
            checkpoint_keep=settings.checkpoint_keep,
            write_wait_s=settings.heartbeat_timeout,
            signal_cache_dir=settings.data_dir if settings.teacher_signal_cache_max_bytes > 0 else None,
            signal_cache_max_bytes=settings.teacher_signal_cache_max_bytes,
        )
