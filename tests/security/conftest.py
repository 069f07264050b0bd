"""Attacks over real HTTP: uvicorn subprocesses on the run's database, two tenants with their own keys.

Each server configuration starts once per module (a start costs seconds); tenants are fresh per test.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_server import live_server

# Not random per import: tests import this module by name while pytest loads it as a conftest (two copies).
ADMIN_KEY = f"admin-security-{os.getpid()}"


@dataclass
class Server:
    url: str
    env: dict[str, str]
    file_root: Path | None


@dataclass
class Tenant:
    name: str
    client: httpx.Client


def _server(env: dict[str, str], file_root: Path | None) -> Iterator[Server]:
    full = {"ADMIN_API_KEY": ADMIN_KEY, "AUTH_CACHE_SECONDS": "0"} | env
    with live_server(full) as url:
        yield Server(url, full, file_root)


@pytest.fixture(scope="module")
def no_root_server(migrated_database: str) -> Iterator[Server]:
    """The default: no ALLOWED_FILE_ROOT, so no server paths at all."""
    yield from _server({"ALLOWED_FILE_ROOT": ""}, None)


@pytest.fixture(scope="module")
def shared_root_server(migrated_database: str) -> Iterator[Server]:
    """A configured shared root (the run's test root, outside DATA_DIR)."""
    root = Path(os.environ["ALLOWED_FILE_ROOT"])
    yield from _server({"ALLOWED_FILE_ROOT": str(root)}, root)


@pytest.fixture(scope="module")
def per_tenant_server(migrated_database: str) -> Iterator[Server]:
    """ALLOWED_FILE_ROOT_PER_TENANT: each tenant resolves under ALLOWED_FILE_ROOT/<tenant name>/."""
    with tempfile.TemporaryDirectory(prefix="distillery-per-tenant-") as folder:
        root = Path(folder).resolve()
        yield from _server({"ALLOWED_FILE_ROOT": str(root), "ALLOWED_FILE_ROOT_PER_TENANT": "true"}, root)


TenantFactory = Callable[[Server], tuple[Tenant, Tenant]]


@pytest.fixture()
def two_tenants(clean_database: str, make_api_key: Callable[..., dict[str, str]]) -> Iterator[TenantFactory]:
    """`two_tenants(server)`: fresh tenants alice-* and mallory-* with keys, as httpx clients of `server`."""
    clients: list[httpx.Client] = []

    def factory(server: Server) -> tuple[Tenant, Tenant]:
        made = []
        for role in ("alice", "mallory"):
            name = f"{role}-{uuid.uuid4().hex[:8]}"
            client = httpx.Client(base_url=server.url, headers=make_api_key(name), timeout=30.0)
            clients.append(client)
            made.append(Tenant(name, client))
        return made[0], made[1]

    yield factory
    for client in clients:
        client.close()


def upload(client: httpx.Client, body: bytes, filename: str = "train.csv") -> dict[str, Any]:
    response = client.post("/distillation/datasets", files={"file": (filename, body)})
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result
