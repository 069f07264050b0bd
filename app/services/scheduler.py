"""Admission under the concurrency limits, re-dispatch of unclaimed jobs, re-queue of stale ones.

Placeholder signatures; the scheduler owner fills them in.
"""

from __future__ import annotations

from app.core.config import Settings


def admit_and_dispatch(settings: Settings | None = None) -> list[str]:
    """Admit queued jobs (queued_at order) while fewer than MAX_CONCURRENT_JOBS are active, commit,
    then send one Celery task per admitted job. Returns the admitted job ids. Safe to call from any
    process at any time (API after a start, worker after a job's end, the scheduler's tick)."""
    raise NotImplementedError
