"""The Celery worker app, configured from Settings (broker, transport options, `training` queue).

Run one worker process per GPU, each pinned to its device and taking one job at a time:

    CUDA_VISIBLE_DEVICES=0 celery -A workers.celery_app worker -Q training -c 1 -n gpu0@%h
    CUDA_VISIBLE_DEVICES=1 celery -A workers.celery_app worker -Q training -c 1 -n gpu1@%h

WORKER_CONCURRENCY (default 1) sets `-c` when not given; raise it only for CPU-only workers. Messages are
acknowledged late and prefetched one at a time; a worker lost mid-job is *not* redelivered by the broker:
the scheduler re-queues the job once its heartbeat is stale, and the next attempt resumes from the last
checkpoint. The engine (torch) is imported once in the parent before the pool forks, so each job starts fast.

A worker offers `worker_devices()` devices to one job (WORKER_DEVICES, else its CUDA device count, else 1):
it says so in its heartbeat (the scheduler admits a job of world_size n only while some live worker offers
n) and consumes the queues of jobs of 1..n ranks (`training`, `training-2ranks`, ...), also under `-Q`.
"""

from __future__ import annotations

import logging
import os
import threading
from contextvars import ContextVar, Token
from typing import Any

from celery import Celery, signals
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from app.core.celery_client import QUEUE_TRAINING, celery_config, training_queue
from app.core.config import Settings, get_settings
from app.core.db import get_engine, session_scope
from app.core.logging import configure_logging, job_id_var, tenant_var
from app.models import Job, Tenant
from app.services import heartbeats

log = logging.getLogger(__name__)

celery_app = Celery("distillery", include=["workers.tasks"])
celery_app.conf.update(celery_config(get_settings()))
celery_app.conf.update(task_create_missing_queues=True, worker_send_task_events=False)
app = celery_app  # `celery -A workers.celery_app` finds `app` or `celery_app`

_service: dict[str, Any] = {}
# Longest wait between heartbeat retries while the database is unreachable.
_MAX_HEARTBEAT_BACKOFF_SECONDS = 30.0


def _beat_worker(sid: str, info: dict[str, Any], stop: threading.Event) -> None:
    """Beat every HEARTBEAT_INTERVAL; while the database is down, retry with backoff (doubling, ≤30 s)."""
    interval = get_settings().heartbeat_interval
    wait = interval
    while True:
        try:
            with session_scope() as session:
                heartbeats.beat(session, kind="worker", sid=sid, info=info)
            wait = interval
        except SQLAlchemyError as exc:
            wait = min(_MAX_HEARTBEAT_BACKOFF_SECONDS, max(interval, wait * 2))
            log.warning("worker heartbeat failed (retrying in %.1f s): %s", wait, exc.__class__.__name__)
        if stop.wait(wait):
            return


def worker_devices(settings: Settings | None = None) -> int:
    """Devices this worker offers one job: WORKER_DEVICES, else the visible CUDA devices, else 1 (CPU)."""
    settings = settings or get_settings()
    if settings.worker_devices is not None:
        return settings.worker_devices
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def worker_queues(devices: int) -> list[str]:
    """The queues a worker with `devices` devices consumes: jobs of 1..devices ranks."""
    return [training_queue(size) for size in range(1, devices + 1)]


@signals.celeryd_after_setup.connect
def _consume_queues_of_its_size(sender: Any = None, instance: Any = None, **_kwargs: Any) -> None:
    """Add the multi-rank queues this worker can serve (kept with `-Q training` too)."""
    if instance is None:
        return
    for name in worker_queues(worker_devices())[1:]:
        instance.app.amqp.queues.select_add(name)


def _seed_teachers() -> None:
    """Register the default teachers (idempotent) so jobs resolve them even before the API first started."""
    from app.services.teachers import seed_default_teachers

    try:
        with session_scope() as session:
            seed_default_teachers(session)
    except SQLAlchemyError as exc:  # not migrated yet, or the database is down: the API seeds them too
        log.warning("could not seed the default teachers: %s", exc.__class__.__name__)


@signals.worker_init.connect
def _preload_engine(**_kwargs: Any) -> None:
    """Import the engine (torch, transformers, every task adapter) once in the parent, before the pool forks
    its processes: each job then starts in well under a second instead of re-importing for ~10 s."""
    settings = get_settings()
    settings.ensure_dirs()
    _seed_teachers()
    import workers.distill.runner  # noqa: F401
    from workers.distill.registry import registered_tasks

    log.info("engine loaded; tasks: %s", ", ".join(registered_tasks()))


@signals.worker_ready.connect
def _start_service_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    """Record this worker in `service_heartbeats` (for /health) every HEARTBEAT_INTERVAL."""
    hostname = getattr(sender, "hostname", None) or f"pid{os.getpid()}"
    sid = heartbeats.service_id("worker", name=hostname)
    info = {
        "queue": QUEUE_TRAINING,
        "concurrency": getattr(getattr(sender, "controller", None), "concurrency", None)
        or celery_app.conf.worker_concurrency,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "devices": worker_devices(),  # the largest training_config.world_size it takes
        "queues": worker_queues(worker_devices()),
    }
    stop = threading.Event()
    thread = threading.Thread(
        target=_beat_worker, args=(sid, info, stop), name="service-heartbeat", daemon=True
    )
    _service.update(sid=sid, stop=stop, thread=thread)
    thread.start()


@signals.worker_shutdown.connect
def _stop_service_heartbeat(**_kwargs: Any) -> None:
    stop = _service.get("stop")
    if stop is None:
        return
    stop.set()
    try:
        with session_scope() as session:
            heartbeats.remove(session, sid=_service["sid"])
    except SQLAlchemyError as exc:
        log.warning("could not remove the worker heartbeat: %s", exc.__class__.__name__)


@signals.worker_process_init.connect
def _fresh_connections_after_fork(**_kwargs: Any) -> None:
    """A forked pool process must not reuse the parent's database connections."""
    get_engine().dispose(close=False)


@signals.setup_logging.connect
def _json_logging(loglevel: Any = None, **_kwargs: Any) -> None:
    """Celery leaves logging to us when this signal has a receiver: JSON lines (LOG_FORMAT) like the API."""
    settings = get_settings()
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or settings.log_level)
    configure_logging(fmt=settings.log_format, level=str(level))


_task_log_context: dict[str, list[tuple[ContextVar[str | None], Token[str | None]]]] = {}


def _tenant_name(job_id: str) -> str | None:
    try:
        with session_scope() as session:
            return session.scalar(
                select(Tenant.name).join(Job, Job.tenant_id == Tenant.id).where(Job.id == job_id)
            )
    except SQLAlchemyError as exc:
        log.warning("tenant of job %s unknown for logs: %s", job_id, exc.__class__.__name__)
        return None


@signals.task_prerun.connect
def _tag_task_logs(task_id: str | None = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    """Every log line of a run-job task carries its job_id and tenant (JSON logs)."""
    job_id = (kwargs or {}).get("job_id") or (args[0] if args else None)
    if not isinstance(job_id, str) or task_id is None:
        return
    tokens = [(job_id_var, job_id_var.set(job_id))]
    tenant = _tenant_name(job_id)
    if tenant is not None:
        tokens.append((tenant_var, tenant_var.set(tenant)))
    _task_log_context[task_id] = tokens


@signals.task_postrun.connect
def _untag_task_logs(task_id: str | None = None, **_: Any) -> None:
    for var, token in reversed(_task_log_context.pop(task_id or "", [])):
        var.reset(token)
