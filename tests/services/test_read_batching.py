"""Concurrent job reads share statements (`KeyedBatcher`); each gets its own, current, tenant-checked row."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import update

from app.core.batching import KeyedBatcher
from app.core.db import make_async_db, session_scope
from app.errors import NotFound
from app.models import Job, JobStatus, utcnow
from app.services import jobs as jobs_service
from app.services import tenants as tenants_service


class _Store:
    """A fetch that records the keys of each statement and answers after a loop turn or two."""

    def __init__(self, values: dict[str, int], *, fail: bool = False) -> None:
        self.values = values
        self.fail = fail
        self.statements: list[list[str]] = []

    async def fetch(self, keys: Sequence[str]) -> dict[str, int]:
        self.statements.append(list(keys))
        await asyncio.sleep(0.01)
        if self.fail:
            raise ConnectionError("the database went away")
        return {k: self.values[k] for k in keys if k in self.values}


def test_concurrent_gets_share_statements_and_each_gets_its_value() -> None:
    store = _Store({"a": 1, "b": 2, "c": 3})

    async def run() -> list[int | None]:
        batcher: KeyedBatcher[str, int] = KeyedBatcher(store.fetch, max_in_flight=1)
        keys = ["a", "b", "c", "missing"] * 10
        return await asyncio.gather(*(batcher.get(k) for k in keys))

    answers = asyncio.run(run())
    assert answers == [1, 2, 3, None] * 10
    # Asked for in the same turn of the loop: one statement, each key once.
    assert store.statements == [["a", "b", "c", "missing"]]


def test_a_lone_get_is_sent_at_once_and_batches_are_capped() -> None:
    store = _Store({str(i): i for i in range(10)})

    async def run() -> list[int | None]:
        batcher: KeyedBatcher[str, int] = KeyedBatcher(store.fetch, max_in_flight=2, max_batch=3)
        first = await batcher.get("0")
        rest = await asyncio.gather(*(batcher.get(str(i)) for i in range(1, 10)))
        return [first, *rest]

    assert asyncio.run(run()) == list(range(10))
    assert store.statements[0] == ["0"]
    assert max(len(s) for s in store.statements) <= 3
    assert sorted(k for s in store.statements for k in s) == sorted(str(i) for i in range(10))


def test_a_failed_statement_fails_every_request_it_carried_and_the_next_ones_run() -> None:
    store = _Store({"a": 1}, fail=True)

    async def run() -> tuple[list[Any], int | None]:
        batcher: KeyedBatcher[str, int] = KeyedBatcher(store.fetch)
        failed = await asyncio.gather(*(batcher.get("a") for _ in range(5)), return_exceptions=True)
        store.fail = False
        return failed, await batcher.get("a")

    failed, after = asyncio.run(run())
    assert all(isinstance(e, ConnectionError) for e in failed)
    assert after == 1


def test_a_cancelled_request_leaves_the_others_answered() -> None:
    store = _Store({"a": 1})

    async def run() -> list[Any]:
        batcher: KeyedBatcher[str, int] = KeyedBatcher(store.fetch)
        first = asyncio.ensure_future(batcher.get("a"))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(batcher.get("a")) for _ in range(3)]
        await asyncio.sleep(0)
        waiting[0].cancel()
        return await asyncio.gather(first, *waiting, return_exceptions=True)

    answers = asyncio.run(run())
    assert answers[0] == 1 and isinstance(answers[1], asyncio.CancelledError) and answers[2:] == [1, 1]


def _job(tenant_id: str, progress: float) -> str:
    now = utcnow()
    with session_scope() as session:
        job = Job(
            spec={"teacher_model_name": "digits-cnn", "target_compression": 0.25},
            teacher_model_name="digits-cnn",
            status=JobStatus.running,
            attempt=1,
            progress=progress,
            created_at=now,
            updated_at=now,
            tenant_id=tenant_id,
        )
        session.add(job)
        session.flush()
        return job.id


def test_batched_reads_are_tenant_checked_and_see_every_committed_write(clean_database: str) -> None:
    db = make_async_db(clean_database)
    if db is None:
        pytest.skip("the async pool is PostgreSQL's")
    with session_scope() as session:
        mine = tenants_service.get_or_create(session, name="batch-reader").id
        other = tenants_service.get_or_create(session, name="batch-other").id
    my_job, other_job = _job(mine, 10.0), _job(other, 20.0)

    async def run() -> None:
        await db.open()
        try:
            reads = [jobs_service.read_async(db, job_id=j, tenant_id=mine) for j in [my_job, other_job] * 15]
            answers = await asyncio.gather(*reads, return_exceptions=True)
            # In the same statements as the owner's reads, the other tenant's job is still "no such job".
            assert all(a.progress == 10.0 for a in answers[0::2])  # type: ignore[union-attr]
            assert all(isinstance(a, NotFound) for a in answers[1::2])
            batcher = jobs_service.read_batcher(db)
            assert batcher.statements < 30 and batcher.keys_read < 30
            # A write committed before a read is seen by it, even with other reads in flight.
            in_flight = [jobs_service.read_async(db, job_id=my_job, tenant_id=mine) for _ in range(5)]
            pending = asyncio.gather(*in_flight)
            await asyncio.sleep(0)
            with session_scope() as session:
                session.execute(update(Job).where(Job.id == my_job).values(progress=55.0))
            fresh = await jobs_service.read_async(db, job_id=my_job, tenant_id=mine)
            assert fresh.progress == 55.0
            await pending
        finally:
            await db.close()

    asyncio.run(run())
