"""Teacher-signal caches on disk: list, read, delete, and keep under a size bound with LRU eviction.

Torch-free: the engine (`workers.distill.signal_cache`) writes each cache as a folder
`DATA_DIR/teacher_caches/<owner>/<key>/` holding `signal.safetensors` and a `meta.json` beside it; this
module reads and manages those folders by their JSON alone, so the API lists and deletes caches without
torch.

Tenant scoping: a cache belongs to the tenant whose job created it (`owner` = tenant id; "local" for runs
without a tenant) and is reused, listed and deleted only by that tenant's jobs and keys. It is never shared
across tenants, even for a global teacher both can see: the teacher logits of a dataset are derived from
that dataset, and a cross-tenant hit would tell one tenant that another trained on the same data (and let
one tenant delete what another relies on). A sweep of one tenant's students still pays the teacher once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.models import Job

CACHE_FOLDER = "teacher_caches"
META_FILE = "meta.json"
SIGNAL_FILE = "signal.safetensors"
LOCAL_OWNER = "local"
_KEY = re.compile(r"^[0-9a-f]{32}$")
_OWNER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class CacheEntry:
    """One cache folder and its metadata."""

    path: Path
    meta: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    @property
    def owner(self) -> str:
        return str(self.meta["owner"])

    @property
    def bytes(self) -> int:
        return int(self.meta.get("bytes", 0))

    @property
    def last_used_at(self) -> float:
        return float(self.meta.get("last_used_at", 0.0))


def owner_of_job(session: Session, *, job_id: str) -> str:
    """The cache owner of a job: its tenant id, or LOCAL_OWNER for a job without one."""
    tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    return str(tenant_id) if tenant_id else LOCAL_OWNER


def caches_root(data_dir: Path) -> Path:
    return data_dir / CACHE_FOLDER


def owner_dir(data_dir: Path, owner: str) -> Path:
    """The folder of one owner's caches; refuses names that could leave the caches root."""
    if not _OWNER.fullmatch(owner):
        raise ValueError(f"invalid cache owner {owner!r}")
    return caches_root(data_dir) / owner


def is_valid_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key))


@contextlib.contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """An exclusive lock over the caches root (writers, eviction, deletion; readers only bump metadata)."""
    root = caches_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_meta(folder: Path) -> dict[str, Any] | None:
    """A cache folder's metadata, or None when it is incomplete (being written, or damaged)."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not (folder / SIGNAL_FILE).is_file():
        return None
    return meta


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Replace a cache's metadata atomically."""
    partial = folder / (META_FILE + ".partial")
    partial.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(partial, folder / META_FILE)


def entries(data_dir: Path, *, owner: str | None) -> list[CacheEntry]:
    """Complete caches of `owner` (None: of every owner), most recently used first."""
    root = caches_root(data_dir)
    owners = [owner_dir(data_dir, owner)] if owner is not None else [p for p in root.glob("*") if p.is_dir()]
    found: list[CacheEntry] = []
    for folder in owners:
        for path in sorted(folder.glob("*")):
            meta = read_meta(path) if path.is_dir() and is_valid_key(path.name) else None
            if meta is not None:
                found.append(CacheEntry(path=path, meta=meta))
    return sorted(found, key=lambda e: e.last_used_at, reverse=True)


def get(data_dir: Path, *, owner: str, key: str) -> CacheEntry | None:
    if not is_valid_key(key):
        return None
    path = owner_dir(data_dir, owner) / key
    meta = read_meta(path)
    return CacheEntry(path=path, meta=meta) if meta is not None else None


def get_or_raise(data_dir: Path, *, owner: str, key: str) -> CacheEntry:
    entry = get(data_dir, owner=owner, key=key)
    if entry is None:
        raise NotFound(f"No teacher cache '{key}' (GET /distillation/teacher-caches lists yours).")
    return entry


def delete(data_dir: Path, *, owner: str, key: str) -> None:
    """Remove one cache of `owner`; NotFound when it has none of that key."""
    with locked(data_dir):
        entry = get_or_raise(data_dir, owner=owner, key=key)
        shutil.rmtree(entry.path, ignore_errors=True)


def touch(entry: CacheEntry) -> None:
    """Record a use (for LRU eviction and the listing): last_used_at = now, hits + 1."""
    meta = {**entry.meta, "last_used_at": time.time(), "hits": int(entry.meta.get("hits", 0)) + 1}
    with contextlib.suppress(OSError):
        write_meta(entry.path, meta)


def evict_to_fit(data_dir: Path, *, max_bytes: int, keep: set[Path] | None = None) -> list[str]:
    """Delete least-recently-used caches (of every owner) until they total <= max_bytes; the caller locks.

    Folders in `keep` are never deleted. Returns the keys evicted.
    """
    keep = keep or set()
    current = entries(data_dir, owner=None)
    total = sum(e.bytes for e in current)
    evicted: list[str] = []
    for entry in sorted(current, key=lambda e: e.last_used_at):
        if total <= max_bytes:
            break
        if entry.path in keep:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        total -= entry.bytes
        evicted.append(entry.key)
    return evicted


def total_bytes(data_dir: Path) -> int:
    return sum(e.bytes for e in entries(data_dir, owner=None))


def to_read(entry: CacheEntry) -> dict[str, Any]:
    """The API view of a cache: its metadata minus the owner (always the caller)."""
    return {k: v for k, v in entry.meta.items() if k != "owner"}
