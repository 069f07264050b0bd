"""Database engine and session factory, built once from Settings."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
import pydantic_core
from psycopg.rows import namedtuple_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import ClauseElement, Engine, create_engine, event
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.core.batching import KeyedBatcher
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


# The API process's async pool: connections, and how long a request waits for one before a 503.
ASYNC_DB_POOL_SIZE = 10
ASYNC_DB_WAIT_SECONDS = 3.0


def compile_for_psycopg(statement: ClauseElement) -> str:
    """A SQLAlchemy Core statement as psycopg SQL text (`%(name)s` parameters), compiled once at import.

    The hot reads keep their schema in the models (one source of truth) but skip SQLAlchemy's per-call
    execution machinery (compile-cache lookup, result metadata, greenlet hop), which costs about twice the
    driver's own work for a one-row read.
    """
    return compile_for_psycopg_with_constants(statement)[0]


def compile_for_psycopg_with_constants(statement: ClauseElement) -> tuple[str, dict[str, Any]]:
    """`compile_for_psycopg`, and the values of the binds the statement fixed itself (e.g. JSON keys)."""
    compiled = statement.compile(dialect=psycopg_dialect.dialect())
    return str(compiled), {name: value for name, value in compiled.params.items() if value is not None}


class AsyncDb:
    """PostgreSQL: a psycopg 3 async connection pool (psycopg_pool) for the API's hot one-statement work.

    The polled job read, the key lookup and the create of a pending job (one data-modifying statement) run
    on the event loop: no worker-thread hop and no GIL hand-off per request, which is what the thread pool
    costs work that takes a fraction of a millisecond. Connections are autocommit (each call is one
    statement, atomic on its own: no BEGIN/COMMIT round trips) with session time zone UTC (rows read as
    UTC, like `UTCDateTime`). Rows are named tuples (attribute access, as Core rows). Opened and closed by
    the app's lifespan, on the loop that uses it. A read that meets a dropped connection (server restart)
    is retried once on another (a write is not: it may have committed); a failure, or no free connection
    within ASYNC_DB_WAIT_SECONDS, raises SQLAlchemy's OperationalError, which the API answers with a 503.
    Anything needing a transaction of several statements or locks goes through the sync engine.
    """

    def __init__(self, url: str) -> None:
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._pool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=ASYNC_DB_POOL_SIZE,
            timeout=ASYNC_DB_WAIT_SECONDS,
            open=False,
            name="api-reads",
            kwargs={"autocommit": True, "options": "-c TimeZone=UTC", "row_factory": namedtuple_row},
            configure=_configure_connection,
        )

        self._batchers: dict[str, KeyedBatcher[Any, Any]] = {}
        # Services' small per-database memos (e.g. the estimate's history by version): on the pool, so an
        # app on another database (tests build several) never sees them.
        self.memo: dict[str, Any] = {}

    def batcher(
        self, name: str, fetch: Callable[[Sequence[Any]], Awaitable[dict[Any, Any]]]
    ) -> KeyedBatcher[Any, Any]:
        """The pool's coalescing reader called `name` (made with `fetch` on first use; see app.core.batching).

        One statement in flight per reader: the pool's other connections stay free for the other reads and
        writes, and a burst of polls becomes one statement per round trip instead of one per request."""
        batcher = self._batchers.get(name)
        if batcher is None:
            batcher = self._batchers[name] = KeyedBatcher(fetch, max_in_flight=1)
        return batcher

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    async def fetch_one(self, sql: str, params: Mapping[str, Any], *, retry: bool = True) -> Any | None:
        """The first row of `sql` (psycopg `%(name)s` parameters) with `params`, or None.

        `retry=False` for a statement that writes: a dropped connection may have committed it.
        """
        rows = await self._fetch(sql, params, retry=retry, first=True)
        return rows[0] if rows else None

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[Any]:
        """Every row of the read `sql` with `params`."""
        return await self._fetch(sql, params, retry=True, first=False)

    async def _fetch(self, sql: str, params: Mapping[str, Any], *, retry: bool, first: bool) -> list[Any]:
        for attempt in (1, 2):
            try:
                async with self._pool.connection() as conn:
                    cursor = await conn.execute(sql, params)
                    if first:
                        row = await cursor.fetchone()
                        return [] if row is None else [row]
                    return await cursor.fetchall()
            except PoolTimeout as exc:
                raise OperationalError(sql, dict(params), exc) from exc
            except psycopg.OperationalError as exc:
                if attempt == 2 or not retry:
                    raise _as_sqlalchemy_error(sql, params, exc) from exc
                # The pool discards the broken connection; try once more on another.
            except psycopg.Error as exc:
                raise _as_sqlalchemy_error(sql, params, exc) from exc
        raise AssertionError("unreachable")


async def _configure_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Each new pool connection decodes JSON columns (a job's spec, metrics, results) with pydantic-core's
    parser: the same values as `json.loads`, in less than half the time (a 1 KB spec: 7 vs 16 µs)."""
    set_json_loads(pydantic_core.from_json, conn)


def _as_sqlalchemy_error(sql: str, params: Mapping[str, Any], exc: psycopg.Error) -> Exception:
    """psycopg's error as the SQLAlchemy one the sync engine raises (DataError, OperationalError, ...), so
    the API's handlers answer both paths alike (a NUL byte: 422; the server gone: 503)."""
    return DBAPIError.instance(sql, dict(params), exc, psycopg.Error)


def make_async_db(url: str) -> AsyncDb | None:
    """The async read pool for `url`; None on SQLite: the embedded default keeps its sync engine in the
    thread pool (a local file read is cheap, and there is no async driver to install)."""
    return None if is_sqlite(url) else AsyncDb(url)


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
