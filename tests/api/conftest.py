"""API test fixtures: a TestClient on the migrated test database, with its own settings when needed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings, get_settings
from app.main import create_app

ClientFactory = Callable[..., TestClient]


@pytest.fixture()
def make_client(clean_database: str, auth_headers: dict[str, str]) -> Iterator[ClientFactory]:
    """Build clients on apps with overridden settings, e.g. `make_client(max_queued_jobs=2)`.

    Clients send one tenant's API key (`auth_headers`) unless given `headers` (`headers={}`: none).
    The scheduler wake-up after a start is off: these tests check the API's own state changes, and the
    integration tests cover admission with a real scheduler and workers.
    """
    with ExitStack() as stack:

        def factory(
            *,
            raise_server_exceptions: bool = True,
            headers: dict[str, str] | None = None,
            **overrides: Any,
        ) -> TestClient:
            settings = Settings(**overrides) if overrides else get_settings()
            app = create_app(settings, wake_scheduler=False)
            client = TestClient(
                app,
                raise_server_exceptions=raise_server_exceptions,
                headers=auth_headers if headers is None else headers,
            )
            return stack.enter_context(client)

        yield factory


@pytest.fixture()
def client(make_client: ClientFactory) -> TestClient:
    return make_client()


def _assert_problem(response: Any, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with `status`; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    for key in ("type", "title", "detail", "instance"):
        assert body[key], key
    return body


ProblemCheck = Callable[[Any, int], dict[str, Any]]


@pytest.fixture()
def problem() -> ProblemCheck:
    """`problem(response, 422)` asserts an RFC 9457 problem+json answer and returns its body."""
    return _assert_problem
