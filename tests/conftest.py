"""Suite-wide setup: a fresh database and broker key prefix per run, dropped at the end.

DATABASE_URL / BROKER_URL from the environment name the *servers* to use (CI: the machine's PostgreSQL and
Redis). Each run creates its own database `distillery_test_<id>` and Redis key prefix, and removes them.
Unset, the run uses the embedded default: a SQLite file and the filesystem broker in a temp DATA_DIR.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

RUN_ID = uuid.uuid4().hex[:10]
_SERVER_DATABASE_URL = os.environ.get("DATABASE_URL", "")
_SERVER_BROKER_URL = os.environ.get("BROKER_URL", "")
_TMP_ROOT = Path(tempfile.mkdtemp(prefix=f"distillery-test-{RUN_ID}-"))
_TEST_DB_NAME = f"distillery_test_{RUN_ID}"


def _admin_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database="postgres").render_as_string(hide_password=False)


def _test_database_url() -> str:
    if _SERVER_DATABASE_URL.startswith("postgresql"):
        from sqlalchemy.engine import make_url

        return (
            make_url(_SERVER_DATABASE_URL).set(database=_TEST_DB_NAME).render_as_string(hide_password=False)
        )
    return f"sqlite:///{_TMP_ROOT / 'data' / 'distillery.db'}"


TEST_DATABASE_URL = _test_database_url()
TEST_BROKER_KEY_PREFIX = f"distillery-test-{RUN_ID}:" if _SERVER_BROKER_URL.startswith("redis") else ""

# Everything imported from here on (app settings, workers spawned by tests) sees the test locations.
os.environ["DATA_DIR"] = str(_TMP_ROOT / "data")
os.environ["DATABASE_URL"] = TEST_DATABASE_URL
os.environ["BROKER_URL"] = _SERVER_BROKER_URL
os.environ["BROKER_KEY_PREFIX"] = TEST_BROKER_KEY_PREFIX
# Server paths (`file` datasets, local teachers) resolve under a root of their own, never DATA_DIR; tests of
# the "no root configured" default build their apps with `allowed_file_root=None`.
TEST_FILE_ROOT = _TMP_ROOT / "files"
TEST_FILE_ROOT.mkdir(parents=True, exist_ok=True)
os.environ["ALLOWED_FILE_ROOT"] = str(TEST_FILE_ROOT)


def _create_postgres_database() -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(_admin_url(_SERVER_DATABASE_URL), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{_TEST_DB_NAME}"'))
    engine.dispose()


def _drop_postgres_database() -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(_admin_url(_SERVER_DATABASE_URL), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{_TEST_DB_NAME}" WITH (FORCE)'))
    engine.dispose()


def _drop_redis_keys() -> None:
    import redis

    client = redis.Redis.from_url(_SERVER_BROKER_URL)
    for key in client.scan_iter(match=f"{TEST_BROKER_KEY_PREFIX}*", count=1000):
        client.delete(key)
    client.close()


def pytest_sessionstart(session: pytest.Session) -> None:
    if _SERVER_DATABASE_URL.startswith("postgresql"):
        _create_postgres_database()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from app.core import db

    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    if _SERVER_DATABASE_URL.startswith("postgresql"):
        _drop_postgres_database()
    if TEST_BROKER_KEY_PREFIX:
        _drop_redis_keys()
    shutil.rmtree(_TMP_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def migrated_database() -> str:
    """The run's database, migrated to head with Alembic (as production does)."""
    from alembic import command
    from alembic.config import Config

    from app.core.config import get_settings

    get_settings().ensure_dirs()
    config = Config(str(Path(__file__).resolve().parents[1] / "alembic.ini"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")
    return TEST_DATABASE_URL


@pytest.fixture()
def clean_database(migrated_database: str) -> Iterator[str]:
    """The migrated database, emptied of jobs, events, artifacts and datasets after the test."""
    yield migrated_database
    from sqlalchemy import delete

    from app.core.db import session_scope
    from app.models import ApiKey, Artifact, Dataset, IdempotencyRecord, Job, JobEvent, Tenant

    with session_scope() as session:
        for model in (JobEvent, Artifact, Job, Dataset, IdempotencyRecord, ApiKey, Tenant):
            session.execute(delete(model))


ApiKeyFactory = Callable[..., dict[str, str]]


@pytest.fixture()
def make_api_key(migrated_database: str) -> ApiKeyFactory:
    """`make_api_key("acme")` issues a key for that tenant (a new one by default); returns auth headers."""
    from app.core.db import session_scope
    from app.services.auth import create_key

    def factory(tenant: str | None = None, *, name: str = "test") -> dict[str, str]:
        with session_scope() as session:
            issued = create_key(session, tenant_name=tenant or f"tenant-{uuid.uuid4().hex[:12]}", name=name)
        return {"Authorization": f"Bearer {issued.key}"}

    return factory


@pytest.fixture()
def auth_headers(make_api_key: ApiKeyFactory) -> dict[str, str]:
    """Bearer headers of a fresh tenant's API key."""
    return make_api_key()
