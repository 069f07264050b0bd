"""Engine pool on PostgreSQL: idle connections are pinged (a dead one is replaced); autocommit reads."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from app.core import db

pytestmark = pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgresql"),
    reason="PostgreSQL pool behaviour (set DATABASE_URL)",
)


@pytest.fixture()
def engine(migrated_database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.0)  # every pooled connection counts as idle
    engine = db.make_engine(migrated_database)
    yield engine
    engine.dispose()


def test_a_pooled_connection_killed_by_the_server_is_replaced_on_checkout(engine: Engine) -> None:
    with engine.connect() as conn:
        first_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    outsider = create_engine(engine.url, poolclass=NullPool)  # the server side, as a restart would
    with outsider.connect() as killer:
        assert killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first_pid}).scalar_one()
    outsider.dispose()
    # Without the idle ping this checkout would hand out the dead connection and the query would fail.
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != first_pid


def test_autocommit_read_runs_each_statement_in_its_own_transaction(engine: Engine) -> None:
    xact = text("SELECT pg_current_xact_id()::text")
    with Session(engine) as session:
        db.begin_autocommit_read(session)
        assert session.execute(xact).scalar_one() != session.execute(xact).scalar_one()
    # Back in the pool, the connection is transactional again for the next user.
    with Session(engine) as session:
        assert session.execute(xact).scalar_one() == session.execute(xact).scalar_one()
