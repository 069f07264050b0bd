"""The scheduler process (`python -m app.scheduler`): ticks every TICK_SECONDS around services/scheduler.

It is woken early through the Redis pub/sub channel `{BROKER_KEY_PREFIX}distillery:wake` when a worker ends a
job; on the embedded stack it relies on its tick (the API and workers also admit jobs themselves after a
start or a job's end, so latency stays low either way). Database or broker errors are logged and retried
with exponential backoff instead of crashing; SIGTERM/SIGINT end the loop after the current tick.
A second thread sends webhook deliveries (app.services.webhooks). No torch is imported here.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.core.celery_client import wake_channel
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.logging import configure_logging
from app.services import heartbeats
from app.services.scheduler import run_tick
from app.services.webhooks import WebhookSender

log = logging.getLogger("distillery.scheduler")

_MAX_BACKOFF_SECONDS = 30.0


class WakeListener:
    """Blocks until the tick is due, a wake message arrives, or the process is told to stop."""

    def __init__(self, settings: Settings, stop: threading.Event) -> None:
        self._settings = settings
        self._stop = stop
        self._pubsub: Any = None
        self._client: Any = None

    def _connect(self) -> None:
        url = self._settings.resolved_broker_url
        if self._settings.is_embedded_broker or not url.startswith(("redis://", "rediss://")):
            return
        import redis

        try:
            self._client = redis.Redis.from_url(url, socket_connect_timeout=2, health_check_interval=30)
            self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(wake_channel(self._settings))
        except redis.RedisError as exc:
            log.warning("wake channel unavailable (ticking only): %s", exc)
            self.close()

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds`; True if woken by a message."""
        if self._pubsub is None:
            self._connect()
        if self._pubsub is None:
            self._stop.wait(seconds)
            return False
        import redis

        deadline = time.monotonic() + seconds
        try:
            while not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Short slices so SIGTERM is honoured promptly.
                message = self._pubsub.get_message(timeout=min(remaining, 0.5))
                if message is not None and message.get("type") == "message":
                    return True
        except (redis.RedisError, OSError) as exc:
            log.warning("wake channel lost (reconnecting on next wait): %s", exc)
            self.close()
            self._stop.wait(max(0.0, deadline - time.monotonic()))
        return False

    def close(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except OSError as exc:
                log.debug("closing pubsub: %s", exc)
        if self._client is not None:
            self._client.close()
        self._pubsub = None
        self._client = None


def serve(settings: Settings | None = None, *, stop: threading.Event | None = None) -> None:
    """Run the scheduler loop until `stop` is set (SIGTERM/SIGINT set it when run as a process)."""
    settings = settings or get_settings()
    stop = stop or threading.Event()
    sid = heartbeats.service_id("scheduler")
    listener = WakeListener(settings, stop)
    sender = WebhookSender(settings, stop)  # webhook deliveries, beside the tick (HTTP never delays it)
    sender.start()
    backoff = 0.0
    log.info(
        "scheduler %s: limit %d, tick %.1fs, dispatch timeout %.0fs, heartbeat timeout %.0fs",
        sid,
        settings.max_concurrent_jobs,
        settings.tick_seconds,
        settings.dispatch_timeout,
        settings.heartbeat_timeout,
    )
    try:
        while not stop.is_set():
            try:
                report = run_tick(settings, scheduler_id=sid)
            except SQLAlchemyError as exc:
                backoff = min(_MAX_BACKOFF_SECONDS, max(1.0, backoff * 2))
                log.error("database error in tick (retrying in %.0f s): %s", backoff, exc.__class__.__name__)
                log.debug("tick failure", exc_info=exc)
                stop.wait(backoff)
                continue
            backoff = 0.0
            for what in ("admitted", "redispatched", "requeued", "failed", "cancelled", "paused"):
                ids = getattr(report, what)
                if ids:
                    log.info("%s: %s", what, ", ".join(ids))
            listener.wait(settings.tick_seconds)
    finally:
        listener.close()
        sender.join(timeout=settings.webhook_timeout_seconds + 5)
        try:
            with session_scope() as session:
                heartbeats.remove(session, sid=sid)
        except SQLAlchemyError as exc:
            log.warning("could not remove the scheduler heartbeat: %s", exc.__class__.__name__)
        log.info("scheduler %s stopped", sid)


def main() -> None:
    settings = get_settings()
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    serve(settings, stop=stop)


if __name__ == "__main__":
    main()
