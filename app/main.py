"""The FastAPI application: routers, problem+json error handlers, and a lifespan that seeds teachers."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from app.api.routes import admin, calculator, dashboard, datasets, health, jobs, metrics, teachers, webhooks
from app.api.routes import teacher_caches as teacher_caches_routes
from app.core import cpu_pool
from app.core.config import Settings, get_settings
from app.core.db import get_engine, get_sessionmaker, make_async_db
from app.core.logging import DeferredLog, configure_logging
from app.errors import install_exception_handlers
from app.services.datasets import remove_stale_parts
from app.services.metrics import HttpMetricsMiddleware, build_registry
from app.services.metrics import log as http_log
from app.services.teachers import seed_default_teachers

logger = logging.getLogger("distillery.api")

TAGS_METADATA = [
    {"name": "jobs", "description": "Create, start, watch, cancel and delete distillation jobs."},
    {"name": "teachers", "description": "The registry of teacher models jobs can name."},
    {"name": "datasets", "description": "Upload CSV/JSONL datasets for jobs."},
    {"name": "teacher-caches", "description": "Reusable top-k teacher logits of your datasets (LM jobs)."},
    {"name": "calculator", "description": "The seed's back-of-the-envelope distillation calculator."},
    {"name": "health", "description": "Liveness of the database, broker, scheduler and workers."},
    {"name": "metrics", "description": "Prometheus metrics for the operations team."},
    {"name": "admin", "description": "Issue and revoke tenant API keys (needs ADMIN_API_KEY)."},
    {"name": "webhooks", "description": "Signed notifications when your jobs end or pause."},
]


DOCS_ASSETS_URL = "/docs-assets"


def _seed_teachers_if_migrated() -> None:
    """Seed the default teachers when the schema exists; migrations are `distillery up`'s job, not ours."""
    try:
        if not inspect(get_engine()).has_table("teachers"):
            logger.warning("the database has no tables yet; run `alembic upgrade head` (distillery up does)")
            return
        with get_sessionmaker()() as session:
            added = seed_default_teachers(session)
        if added:
            logger.info("seeded %d default teachers", added)
    except OperationalError as exc:
        # The API still starts; /health answers 503 until the database is back.
        logger.error("database unavailable at startup, teachers not seeded: %s", exc)


_startup_frozen = False


def _freeze_startup_objects() -> None:
    """Once per process, at the first startup: everything built so far (modules, models, schemas: ~150k
    objects) lives as long as the process, so take it out of the cyclic collector's scans. Otherwise each
    full collection walks all of it (~130 ms on a small machine, the event loop stalled meanwhile: the
    p99 of the API's hot reads) while requests allocate and free their own few objects."""
    global _startup_frozen
    if not _startup_frozen:
        _startup_frozen = True
        gc.collect()
        gc.freeze()


def create_app(settings: Settings | None = None, *, wake_scheduler: bool = True) -> FastAPI:
    """Build the API. `settings` defaults to the process-wide ones; tests pass their own limits."""
    app_settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(fmt=app_settings.log_format, level=app_settings.log_level)
        app_settings.ensure_dirs()
        remove_stale_parts(app_settings)
        _seed_teachers_if_migrated()
        # The hot paths' async pool lives on this loop (PostgreSQL only; see app.core.db.AsyncDb).
        async_db = make_async_db(app_settings.resolved_database_url)
        if async_db is not None:
            await async_db.open()
        app.state.async_db = async_db
        _freeze_startup_objects()
        try:
            yield
        finally:
            app.state.async_db = None
            if async_db is not None:
                await async_db.close()
            await run_in_threadpool(cpu_pool.shutdown)  # the upload checks' processes, if any started
            app.state.access_log.flush()  # the last requests' lines, before the process goes

    # /docs (Swagger UI) and /redoc load their scripts and styles from the fastapi-offline package, served
    # here under DOCS_ASSETS_URL: no CDN, so the manual works on a machine without internet.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS_URL,
        # Swagger UI would otherwise send the spec to an online validator for its badge.
        swagger_ui_parameters={"validatorUrl": None},
        title="Distillery",
        summary="Knowledge distillation as a service",
        description="Create a job naming a teacher, a target compression, a method and data; workers train "
        "a student for real and report measured results. Every error is RFC 9457 problem+json.",
        version="0.1.0",
        openapi_tags=TAGS_METADATA,
        lifespan=lifespan,
    )
    app.state.settings = app_settings
    app.state.wake_scheduler = wake_scheduler
    app.state.async_db = None  # until the lifespan starts
    install_exception_handlers(app)
    # One registry per app (tests build several); the database figures are read at scrape time.
    registry, http_latency = build_registry(lambda: get_sessionmaker()())
    app.state.metrics_registry = registry
    # The access lines, batched a moment after their requests (see DeferredLog); flushed at shutdown.
    access_log = DeferredLog(http_log, batch_seconds=app_settings.access_log_batch_seconds)
    app.state.access_log = access_log
    app.add_middleware(HttpMetricsMiddleware, histogram=http_latency, access_log=access_log)
    for router in (
        jobs.router,
        teachers.router,
        datasets.router,
        calculator.router,
        health.router,
        admin.router,
        webhooks.router,
        teacher_caches_routes.router,
    ):
        # Their routes refuse query parameters an operation does not take (deps.CheckedQueryRoute).
        app.include_router(router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    return app


app = create_app()
