"""Schemathesis against /openapi.json, authenticated: no 5xx, and every answer matches the documented schema.

Bounded: FUZZ_MAX_EXAMPLES examples per operation (default 20), no shrinking, no example database.
Every default check runs except `positive_data_acceptance`: a schema-valid request may still name a teacher,
dataset or cursor that does not exist, or upload a file that is not CSV/JSONL, and the documented answer to
that is a 422 problem.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import positive_data_acceptance

from app.core.config import Settings, get_settings
from app.main import create_app

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "20"))
ADMIN_KEY = "fuzz-admin-key"
# Requests sent and answers by status class, printed at the end of the module (pytest -s) for the note.
COUNTS: Counter[str] = Counter()


# Built at import (schemathesis reads the schema at collection); requests reach the test database.
APP = create_app(
    Settings(**(get_settings().model_dump() | {"admin_api_key": ADMIN_KEY})), wake_scheduler=False
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture()
def seeded(clean_database: str) -> None:
    """The default teachers, as the app's startup seeds them (ASGI calls here skip the lifespan)."""
    from app.core.db import session_scope
    from app.services.teachers import seed_default_teachers

    with session_scope() as session:
        seed_default_teachers(session)


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    print(f"\nschemathesis: {sum(v for k, v in COUNTS.items() if k != 'failures')} requests, {dict(COUNTS)}")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case: Any, seeded: None, auth_headers: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"} if case.path.startswith("/admin") else auth_headers
    try:
        response = case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])
    except BaseException:
        COUNTS["failures"] += 1
        raise
    COUNTS[f"{response.status_code // 100}xx"] += 1
