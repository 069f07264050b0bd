"""Prometheus metrics: job figures read from the database at scrape time, HTTP latency observed in-process.

Why read the database at scrape time: jobs change state in the scheduler and worker processes, not in the
API. Counting from the stored rows gives every API replica the same, complete answer, with no
multi-process registry and nothing lost when a process restarts. The admission-wait and duration histograms
are built from the stored timestamps (`dispatched_at - queued_at`, `finished_at - started_at`) of every job
still in the database: cumulative, as Prometheus expects, until jobs are deleted (seen as a counter reset).
"""

from __future__ import annotations

import bisect
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.logging import DeferredLog, current_fields, request_scope
from app.models import TERMINAL_STATUSES, Job, JobStatus, ServiceHeartbeat, utcnow

log = logging.getLogger("distillery.http")

ADMISSION_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
JOB_DURATION_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _histogram(
    name: str,
    doc: str,
    buckets: tuple[float, ...],
    samples: dict[tuple[str, ...], list[float]],
    labels: list[str],
) -> HistogramMetricFamily:
    """A histogram family from raw observations per label set (cumulative buckets, +Inf, sum)."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for label_values, values in sorted(samples.items()):
        values.sort()
        cumulative = [(str(bound), float(bisect.bisect_right(values, bound))) for bound in buckets]
        cumulative.append(("+Inf", float(len(values))))
        family.add_metric(list(label_values), cumulative, sum_value=float(sum(values)))
    return family


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


class DatabaseCollector(Collector):
    """Jobs by status, queue depth, admission wait, job duration and heartbeat ages, read per scrape."""

    def __init__(self, session_factory: Callable[[], Session]) -> None:
        self._session_factory = session_factory

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: registering must not touch the database

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("distillery_database_up", "1 when the last scrape could read the database")
        session = self._session_factory()
        try:
            metrics = list(self._read(session))
            session.rollback()
        except SQLAlchemyError as exc:
            logging.getLogger("distillery.metrics").error(
                "metrics scrape could not read the database: %s", exc
            )
            up.add_metric([], 0.0)
            yield up
            return
        finally:
            session.close()
        up.add_metric([], 1.0)
        yield up
        yield from metrics

    def _read(self, session: Session) -> Iterator[Metric]:
        now = utcnow()
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        jobs = GaugeMetricFamily("distillery_jobs", "Jobs in the database by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], float(counts.get(status.value, 0)))
        yield jobs
        yield GaugeMetricFamily(
            "distillery_queue_depth",
            "Jobs queued and waiting for admission",
            value=float(counts.get(JobStatus.queued.value, 0)),
        )
        oldest = session.scalar(select(func.min(Job.queued_at)).where(Job.status == JobStatus.queued))
        yield GaugeMetricFamily(
            "distillery_oldest_queued_seconds",
            "How long the longest-waiting queued job has waited (0 when none)",
            value=_seconds(oldest, now) or 0.0,
        )

        waits: dict[tuple[str, ...], list[float]] = {(): []}
        rows = session.execute(select(Job.queued_at, Job.dispatched_at).where(Job.dispatched_at.is_not(None)))
        for queued_at, dispatched_at in rows:
            wait = _seconds(queued_at, dispatched_at)
            if wait is not None:
                waits[()].append(wait)
        yield _histogram(
            "distillery_admission_wait_seconds",
            "Seconds from queued to dispatched (admitted by the scheduler), per job",
            ADMISSION_WAIT_BUCKETS,
            waits,
            [],
        )

        durations: dict[tuple[str, ...], list[float]] = {(s.value,): [] for s in TERMINAL_STATUSES}
        finished = session.execute(
            select(Job.status, Job.started_at, Job.finished_at).where(
                Job.status.in_(TERMINAL_STATUSES), Job.finished_at.is_not(None)
            )
        )
        for final_status, started_at, finished_at in finished:
            duration = _seconds(started_at, finished_at)
            if duration is not None:
                durations.setdefault((str(final_status),), []).append(duration)
        yield _histogram(
            "distillery_job_duration_seconds",
            "Seconds from a worker's first claim to the job's end, by final status",
            JOB_DURATION_BUCKETS,
            durations,
            ["status"],
        )

        beats = GaugeMetricFamily(
            "distillery_service_heartbeat_age_seconds",
            "Seconds since each scheduler and worker process last wrote its heartbeat",
            labels=["kind", "service"],
        )
        for kind, sid, last_seen in session.execute(
            select(ServiceHeartbeat.kind, ServiceHeartbeat.id, ServiceHeartbeat.last_seen_at).order_by(
                ServiceHeartbeat.id
            )
        ):
            beats.add_metric([kind, sid], _seconds(last_seen, now) or 0.0)
        yield beats

        job_beats = GaugeMetricFamily(
            "distillery_running_job_heartbeat_age_seconds",
            "Seconds since each running job's worker last beat (re-queued past HEARTBEAT_TIMEOUT)",
            labels=["job_id"],
        )
        for job_id, heartbeat_at in session.execute(
            select(Job.id, Job.heartbeat_at).where(Job.status == JobStatus.running)
        ):
            job_beats.add_metric([job_id], _seconds(heartbeat_at, now) or 0.0)
        yield job_beats


def build_registry(session_factory: Callable[[], Session]) -> tuple[CollectorRegistry, Histogram]:
    """A registry for one app: the database collector, process metrics, and the HTTP latency histogram."""
    from prometheus_client import PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session_factory))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    http_latency = Histogram(
        "distillery_http_request_duration_seconds",
        "Seconds from request to the end of the response, by route template, method and status",
        labelnames=["method", "route", "status"],
        buckets=HTTP_BUCKETS,
        registry=registry,
    )
    return registry, http_latency


_JOB_PATH = re.compile(r"^/(?:distillation/jobs|jobs)/([0-9A-Za-z-]{1,64})(?:/|$)")


class HttpMetricsMiddleware:
    """ASGI middleware: latency per route template (never the raw path), a JSON access log line, and the
    request's log context (request id, job id from the path). Event streams are left out of the latency
    histogram: their duration is the job's, not the server's."""

    def __init__(self, app: ASGIApp, *, histogram: Histogram, access_log: DeferredLog) -> None:
        self.app = app
        self.histogram = histogram
        self.access_log = access_log
        self._sequence = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._sequence += 1
        started = time.perf_counter()
        response: dict[str, Any] = {"status": 500, "stream": False}
        fields: dict[str, str] = {"request_id": f"{int(time.time() * 1000):x}-{self._sequence:x}"}
        match = _JOB_PATH.match(scope.get("path", ""))
        if match:
            fields["job_id"] = match.group(1)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = int(message["status"])
                for key, value in message.get("headers", []):
                    if key.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        response["stream"] = True
            await send(message)

        with request_scope(**fields):
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                elapsed = time.perf_counter() - started
                route = scope.get("route")
                # path_format: the template without convertors ("{job_id}", not "{job_id:job_id}").
                template = getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"
                method = scope.get("method", "GET")
                if not response["stream"]:
                    self.histogram.labels(method, template, str(response["status"])).observe(elapsed)
                self.access_log.add(
                    "%s %s %s %.1f ms",
                    (method, template, response["status"], elapsed * 1000),
                    {
                        "method": method,
                        "route": template,
                        "path": scope.get("path"),
                        "status": response["status"],
                        "duration_ms": round(elapsed * 1000, 2),
                    }
                    | current_fields(),
                )
