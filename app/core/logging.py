"""Structured logs: one JSON object per line carrying the job id and tenant of the work in progress.

The job id and tenant live in context variables, so every log call inside `log_context(job_id=...)` (an API
request about a job, a worker running it, the scheduler admitting it) is tagged without passing them along.
API, scheduler and workers call `configure_logging()` once at start.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import json
import logging
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

job_id_var: ContextVar[str | None] = ContextVar("distillery_job_id", default=None)
tenant_var: ContextVar[str | None] = ContextVar("distillery_tenant", default=None)
request_id_var: ContextVar[str | None] = ContextVar("distillery_request_id", default=None)
# Per HTTP request, a dict the middleware creates: a dependency running in a worker thread (a copy of the
# context) cannot set a context variable the request's later code sees, but it can fill in this dict.
_request_fields: ContextVar[dict[str, str] | None] = ContextVar("distillery_request_fields", default=None)

# Attributes every LogRecord has; anything else passed via `extra=` is copied into the JSON object.
_RECORD_FIELDS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime", "taskName"}
)

_CONTEXT_FIELDS = frozenset({"job_id", "tenant", "request_id"})
# Extras other libraries attach that a JSON reader does not want (uvicorn's ANSI-coloured copy).
_DROPPED_FIELDS = frozenset({"color_message"})


def current_fields() -> dict[str, str]:
    """The job id, tenant and request id of the work in progress (those that are set)."""
    fields = dict(_request_fields.get() or {})
    for name, var in (("job_id", job_id_var), ("tenant", tenant_var), ("request_id", request_id_var)):
        value = var.get()
        if value is not None:
            fields[name] = value
    return fields


class ContextFilter(logging.Filter):
    """Copies the context onto each record (`record.job_id`, `record.tenant`, `record.request_id`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = current_fields()
        for name in _CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, fields.get(name))
        return True


_SKIPPED_FIELDS = _RECORD_FIELDS | _CONTEXT_FIELDS | _DROPPED_FIELDS
_JSON = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "job_id", "tenant", ...extra}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields: dict[str, str] | None = None  # the context's, when the record lacks them (no ContextFilter)
        for name in ("job_id", "tenant", "request_id"):
            value = getattr(record, name, None)
            if value is None:
                fields = current_fields() if fields is None else fields
                value = fields.get(name)
            if value is not None:
                payload[name] = value
        for key, value in record.__dict__.items():
            if key not in _SKIPPED_FIELDS and key not in payload:
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return _JSON.encode(payload)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the job id and tenant appended when set (for a developer's terminal)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = [
            f"{name}={value}"
            for name in ("job_id", "tenant")
            if (value := getattr(record, name, None)) is not None
        ]
        return f"{line} [{' '.join(tags)}]" if tags else line


_HANDLER_NAME = "distillery"


def configure_logging(*, fmt: str = "json", level: str = "INFO", stream: Any = None) -> logging.Handler:
    """Route the root logger (and uvicorn's, celery's) through one handler in `fmt`; idempotent."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn and celery install their own handlers; let their records reach ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker"):
        named = logging.getLogger(name)
        named.handlers = []
        named.propagate = True
    # The API's middleware logs each request with its route, status and duration; uvicorn's line repeats it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    return handler


class DeferredLog:
    """Records of a hot path, handed to the logging system in batches a moment later, not one per call.

    The API's access line (one per request) costs about 25 µs when records are handled back to back, but
    three times that when each is handled alone between requests, each time with cold caches. So `add` only
    appends the record's fields; a loop callback `batch_seconds` later (or the MAX_PENDING-th record) makes
    the records and handles them together, each with the time, job id, tenant and request id it had when
    added. Lines thus reach the handlers up to `batch_seconds` late, in order. `flush()` runs at the app's
    shutdown and at interpreter exit; a process killed outright loses at most the last `batch_seconds` of
    lines. With `batch_seconds` 0, or no running loop (a sync caller), `add` handles the record at once.
    """

    MAX_PENDING = 512

    def __init__(self, logger: logging.Logger, *, batch_seconds: float) -> None:
        self.logger = logger
        self.batch_seconds = batch_seconds
        self._pending: list[tuple[float, str, tuple[Any, ...], dict[str, Any]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        _deferred_logs.add(self)

    def add(self, msg: str, args: tuple[Any, ...], extra: dict[str, Any]) -> None:
        """An INFO record `msg % args` with `extra`, which must hold its job_id, tenant and request_id."""
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self._pending.append((time.time(), msg, args, extra))
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._timer is not None and self._timer_loop is loop:
            if len(self._pending) >= self.MAX_PENDING:
                self.flush()
        elif loop is None or self._timer is not None or self.batch_seconds <= 0:
            # No loop to wait on, no wait wanted, or the loop that was to flush has stopped (a test client's
            # portal): now.
            self.flush()
        else:
            self._timer_loop = loop
            # An empty context: the records carry their own fields; none may come from whoever scheduled.
            self._timer = loop.call_later(self.batch_seconds, self.flush, context=contextvars.Context())

    def flush(self) -> None:
        """Handle every pending record now, oldest first."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_loop = None
        pending, self._pending = self._pending, []
        logger = self.logger
        for created, msg, args, extra in pending:
            record = logger.makeRecord(logger.name, logging.INFO, "", 0, msg, args, None, extra=extra)
            record.created = created
            record.msecs = int(created * 1000) % 1000
            logger.handle(record)


_deferred_logs: weakref.WeakSet[DeferredLog] = weakref.WeakSet()


@atexit.register
def _flush_deferred_logs() -> None:
    for deferred in list(_deferred_logs):
        deferred.flush()


@contextmanager
def request_scope(**fields: str) -> Iterator[dict[str, str]]:
    """Per-request log fields (the middleware opens one); `bind()` inside the request fills it in."""
    token = _request_fields.set(dict(fields))
    try:
        holder = _request_fields.get()
        assert holder is not None
        yield holder
    finally:
        _request_fields.reset(token)


def bind(*, job_id: str | None = None, tenant: str | None = None) -> None:
    """Tag the rest of the current request (or, outside a request, the current context) with these."""
    holder = _request_fields.get()
    for name, value, var in (("job_id", job_id, job_id_var), ("tenant", tenant, tenant_var)):
        if value is None:
            continue
        if holder is not None:
            holder[name] = value
        else:
            var.set(value)


@contextmanager
def log_context(*, job_id: str | None = None, tenant: str | None = None) -> Iterator[None]:
    """Tag every log record emitted inside the block with `job_id` and/or `tenant`."""
    tokens = []
    if job_id is not None:
        tokens.append((job_id_var, job_id_var.set(job_id)))
    if tenant is not None:
        tokens.append((tenant_var, tenant_var.set(tenant)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
