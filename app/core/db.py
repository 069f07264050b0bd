"""Database engine and session factory, built once from Settings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import get_settings


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite gets WAL and a busy timeout so API, scheduler and workers can share it."""
    if is_sqlite(url):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # pysqlite's own transaction handling is turned off so that BEGIN IMMEDIATE (below) is ours.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Every transaction takes the write lock up front: read-then-write sequences (admission,
            # claims) are then serialised across processes, which is what SQLite can offer.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20, pool_recycle=1800)
    _ping_after_idle(engine, IDLE_PING_SECONDS)
    return engine


# A pooled connection idle longer than this is pinged before use (a server restart or an idle timeout may
# have closed it); one reused within it is not: under load that saves a round trip (BEGIN + SELECT 1) per
# checkout, and a disconnect on a busy connection still invalidates the whole pool at the first error.
IDLE_PING_SECONDS = 1.0


def _ping_after_idle(engine: Engine, idle_seconds: float) -> None:
    """`pool_pre_ping`, but only for connections that sat in the pool longer than `idle_seconds`."""

    @event.listens_for(engine, "checkin")
    def _stamp_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in_at = record.info.get("checked_in_at")
        if checked_in_at is None or time.monotonic() - checked_in_at < idle_seconds:
            return  # fresh from connect, or just returned by another request
        try:
            engine.dialect.do_ping(dbapi_connection)
            dbapi_connection.rollback()  # the ping's implicit transaction
        except engine.dialect.loaded_dbapi.Error as exc:
            if engine.dialect.is_disconnect(exc, dbapi_connection, None):
                # The pool discards this connection and checks out (or opens) another.
                raise DisconnectionError(f"stale pooled connection: {exc}") from exc
            raise


def begin_autocommit_read(session: Session) -> None:
    """Run this session's next statements without BEGIN/ROLLBACK round trips (PostgreSQL; single reads).

    Only for request paths that read with one statement: each statement is its own snapshot. SQLite keeps
    its transactions (its BEGIN IMMEDIATE is local and cheap). Call before the session's first query.
    """
    if session.in_transaction() or session.get_bind().dialect.name == "sqlite":
        return
    session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


# Connections of the API process's asyncio read engine.
ASYNC_READ_POOL_SIZE = 10


def make_async_read_engine(url: str) -> AsyncEngine | None:
    """PostgreSQL: an asyncio engine (psycopg 3's async mode) for the API's hot single-statement reads.

    They then run on the event loop: no worker-thread hop and no GIL hand-off per request, which is what
    the thread pool costs a read that takes a fraction of a millisecond. Its connections are AUTOCOMMIT
    (each read is one statement, so no BEGIN/ROLLBACK round trips); never write through it. None on SQLite:
    the embedded default keeps its sync engine (a local file read is cheap, and no aiosqlite to install).
    Built and disposed by the app's lifespan, on the loop that uses it.
    """
    if is_sqlite(url):
        return None
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    # A fixed pool, no overflow: one event loop gains nothing from more connections than it can keep busy,
    # and overflow connections opened and closed under a burst (50 clients) cost more than the wait.
    engine = create_async_engine(
        parsed,
        pool_size=ASYNC_READ_POOL_SIZE,
        max_overflow=0,
        pool_timeout=30,
        pool_recycle=1800,
        isolation_level="AUTOCOMMIT",
    )
    _ping_after_idle(engine.sync_engine, IDLE_PING_SECONDS)
    return engine


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url)


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error (scheduler and worker code)."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
