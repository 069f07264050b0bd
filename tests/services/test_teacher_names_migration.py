"""Migration 0007 on a database of its own (SQLite, and PostgreSQL when the run has a server): teacher names
become unique per owner, rows made before it survive, and the downgrade restores the global rule."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

REPO_ROOT = Path(__file__).resolve().parents[2]
_SERVER = os.environ.get("DATABASE_URL", "")

_INSERT = text(
    "INSERT INTO teachers (name, source_kind, location, type, description, builtin, tenant_id, created_at) "
    "VALUES (:name, 'hub', 'org/model', 'transformer', '', false, :tenant, :now)"
)


def _backends() -> list[str]:
    return ["sqlite", "postgresql"] if _SERVER.startswith("postgresql") else ["sqlite"]


@pytest.fixture(params=_backends())
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrate.db'}"
        return
    name = f"distillery_migrate_{uuid.uuid4().hex[:10]}"
    admin = create_engine(make_url(_SERVER).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(_SERVER).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _alembic(url: str) -> Config:
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    config.attributes["url"] = url
    return config


def _insert(url: str, name: str, tenant: str | None) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(_INSERT, {"name": name, "tenant": tenant, "now": datetime.now(UTC)})
    finally:
        engine.dispose()


def _owners(url: str, name: str) -> list[str | None]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = text("SELECT tenant_id FROM teachers WHERE name = :name ORDER BY tenant_id")
            return list(conn.scalars(query, {"name": name}).all())
    finally:
        engine.dispose()


def test_teacher_names_become_unique_per_owner_and_the_downgrade_restores_the_global_rule(
    empty_database: str,
) -> None:
    url = empty_database
    config = _alembic(url)
    command.upgrade(config, "0006")
    _insert(url, "shared-name", "tenant-a")
    _insert(url, "global-one", None)
    with pytest.raises(IntegrityError):  # before: one name over every tenant
        _insert(url, "shared-name", "tenant-b")

    command.upgrade(config, "0007")
    assert _owners(url, "shared-name") == ["tenant-a"]  # rows made before survive
    _insert(url, "shared-name", "tenant-b")  # another tenant may now use the name
    assert sorted(_owners(url, "shared-name"), key=str) == ["tenant-a", "tenant-b"]
    with pytest.raises(IntegrityError):  # the same tenant may not, twice
        _insert(url, "shared-name", "tenant-a")
    with pytest.raises(IntegrityError):  # nor may two global teachers (NULL owner) share one
        _insert(url, "global-one", None)

    with pytest.raises(RuntimeError, match="shared-name; rename"):  # refused while two owners share one
        command.downgrade(config, "0006")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM teachers WHERE tenant_id = 'tenant-b'"))
    finally:
        engine.dispose()
    command.downgrade(config, "0006")
    with pytest.raises(IntegrityError):
        _insert(url, "shared-name", "tenant-b")
    command.upgrade(config, "head")
    _insert(url, "shared-name", "tenant-b")
