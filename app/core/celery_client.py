"""A torch-free Celery client: sends `distillery.run_job` by name and wakes the scheduler.

The API and the scheduler use it to hand a job id to the workers after the admitting transaction has
committed; it never imports `workers/`. The same configuration (`celery_config`) builds the worker app, so
client and workers always agree on broker, transport options and queue.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Celery

from app.core.config import Settings, get_settings

log = logging.getLogger(__name__)

TASK_RUN_JOB = "distillery.run_job"
QUEUE_TRAINING = "training"
WAKE_CHANNEL = "distillery:wake"

# Retries when the broker is briefly unreachable; longer outages are covered by the scheduler's re-send.
_SEND_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.4, "interval_max": 1.0}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the client (API, scheduler) and the worker app."""
    return {
        "broker_url": settings.resolved_broker_url,
        "broker_transport_options": settings.broker_transport_options,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": QUEUE_TRAINING,
        "task_routes": {TASK_RUN_JOB: {"queue": QUEUE_TRAINING}},
        "task_serializer": "json",
        "accept_content": ["json"],
        # The database is the source of truth; Celery results are never read.
        "task_ignore_result": True,
        "result_backend": None,
        # Long jobs: a message is acknowledged when the task ends, one message at a time per process.
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        # Recovery after a lost worker is the scheduler's job (stale heartbeat → re-queue), not the broker's.
        "task_reject_on_worker_lost": False,
        "worker_concurrency": settings.worker_concurrency,
        "worker_hijack_root_logger": False,
    }


@lru_cache(maxsize=1)
def get_celery_client() -> Celery:
    """The process-wide Celery client configured from Settings."""
    client = Celery("distillery-client", set_as_current=False)
    client.conf.update(celery_config(get_settings()))
    return client


def training_queue(world_size: int) -> str:
    """The queue of jobs with `world_size` ranks: `training` for one, `training-<n>ranks` for more. A
    worker offering n devices consumes the queues of 1..n (`workers.celery_app`)."""
    return QUEUE_TRAINING if world_size <= 1 else f"{QUEUE_TRAINING}-{world_size}ranks"


def send_run_job(job_id: str, *, world_size: int = 1) -> None:
    """Send one `distillery.run_job` message for `job_id` to its training queue (after commit only)."""
    get_celery_client().send_task(
        TASK_RUN_JOB,
        args=[job_id],
        queue=training_queue(world_size),
        retry=True,
        retry_policy=_SEND_RETRY_POLICY,
        ignore_result=True,
    )


def wake_channel(settings: Settings) -> str:
    """The Redis pub/sub channel the scheduler listens on, under the run's key prefix."""
    return f"{settings.broker_key_prefix}{WAKE_CHANNEL}"


def wake_scheduler(settings: Settings | None = None) -> bool:
    """Ask the scheduler to tick now (Redis only; the embedded stack relies on its tick). True if sent."""
    settings = settings or get_settings()
    if settings.is_embedded_broker or not settings.resolved_broker_url.startswith(("redis://", "rediss://")):
        return False
    import redis

    client = redis.Redis.from_url(settings.resolved_broker_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.publish(wake_channel(settings), "wake")
    except redis.RedisError as exc:
        log.warning("could not wake the scheduler: %s", exc)
        return False
    finally:
        client.close()
    return True
