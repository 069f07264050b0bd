"""API keys: issue (shown once), store only their sha256, authenticate bearer tokens, revoke.

Keys are 256-bit random tokens, so a plain sha256 is a safe verifier (no slow hash needed: there is nothing
to brute-force) and lets a request find its key with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, delete, select
from sqlalchemy.orm import Session

from app.core.db import AsyncDb, compile_for_psycopg
from app.errors import NotFound
from app.models import ApiKey, DashboardSession, Tenant, utcnow
from app.services import tenants as tenants_service

KEY_PREFIX = "dk_"
# Characters of the key shown in listings so people can tell keys apart ("dk_" + 8).
DISPLAY_PREFIX_LENGTH = 11
# A longer header value cannot be one of our keys; refuse it before hashing.
MAX_KEY_LENGTH = 200


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the tenant and the key it presented."""

    tenant_id: str
    tenant_name: str
    key_id: str
    key_prefix: str


@dataclass(frozen=True)
class IssuedKey:
    """A newly created key: `key` is the secret, returned once and never stored."""

    record: ApiKey
    tenant: Tenant
    key: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random key, `dk_` + 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(session: Session, *, tenant_name: str, name: str) -> IssuedKey:
    """Issue a key for `tenant_name` (created if new) and commit; the secret is only in the return value."""
    tenant = tenants_service.get_or_create(session, name=tenant_name)
    key = generate_key()
    record = ApiKey(
        tenant_id=tenant.id, name=name, prefix=key[:DISPLAY_PREFIX_LENGTH], key_hash=hash_key(key)
    )
    session.add(record)
    session.commit()
    return IssuedKey(record=record, tenant=tenant, key=key)


# The key's principal columns (and revocation) by its hash: one indexed lookup joined to the tenant.
_PRINCIPAL_BY_HASH = (
    select(ApiKey.id, ApiKey.prefix, ApiKey.revoked_at, Tenant.id.label("tenant_id"), Tenant.name)
    .join(Tenant, Tenant.id == ApiKey.tenant_id)
    .where(ApiKey.key_hash == bindparam("key_hash"))
)
_PRINCIPAL_BY_HASH_SQL = compile_for_psycopg(_PRINCIPAL_BY_HASH)


def _principal(row: Any | None) -> Principal | None:
    """The principal of a `_PRINCIPAL_BY_HASH` row; None for no row or a revoked key."""
    if row is None or row.revoked_at is not None:
        return None
    return Principal(tenant_id=row.tenant_id, tenant_name=row.name, key_id=row.id, key_prefix=row.prefix)


def authenticate(session: Session, *, key: str) -> Principal | None:
    """The principal for a presented key, or None when it is unknown or revoked."""
    if not key or len(key) > MAX_KEY_LENGTH:
        return None
    return _principal(session.execute(_PRINCIPAL_BY_HASH, {"key_hash": hash_key(key)}).first())


async def authenticate_async(db: AsyncDb, *, key: str, ttl_seconds: float) -> Principal | None:
    """`authenticate_cached` through the API's async read pool: the lookup runs on the event loop."""
    if not key or len(key) > MAX_KEY_LENGTH:
        return None
    principal = cached_principal(key) if ttl_seconds > 0 else None
    if principal is not None:
        return principal
    key_hash = hash_key(key)
    principal = _principal(await db.fetch_one(_PRINCIPAL_BY_HASH_SQL, {"key_hash": key_hash}))
    if principal is not None and ttl_seconds > 0:
        principal_cache.put(key_hash, principal, ttl_seconds)
    return principal


class PrincipalCache:
    """Key hash -> Principal for a few seconds, so a hot client's requests skip the key lookup.

    Only accepted keys are cached (an unknown key always asks the database, so a key issued by another
    process works at once). A revocation through this process clears its cache at once; another API process
    keeps accepting a revoked key for at most `ttl_seconds` (the bound documented in README's settings).
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        expires, principal = entry
        if time.monotonic() >= expires:
            with self._lock:
                self._entries.pop(key_hash, None)
            return None
        return principal

    def put(self, key_hash: str, principal: Principal, ttl_seconds: float) -> None:
        with self._lock:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()  # bounded memory; a burst of keys only costs lookups
            self._entries[key_hash] = (time.monotonic() + ttl_seconds, principal)

    def forget_key(self, key_id: str) -> None:
        """Drop every entry of this key (revocation)."""
        with self._lock:
            for key_hash in [h for h, (_, p) in self._entries.items() if p.key_id == key_id]:
                del self._entries[key_hash]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


principal_cache = PrincipalCache()


def cached_principal(key: str) -> Principal | None:
    """The cached principal of an accepted key still within its TTL; no database access."""
    if not key or len(key) > MAX_KEY_LENGTH:
        return None
    return principal_cache.get(hash_key(key))


def authenticate_cached(session: Session, *, key: str, ttl_seconds: float) -> Principal | None:
    """`authenticate`, answered from the in-process cache for `ttl_seconds` after a key was accepted."""
    if ttl_seconds <= 0:
        return authenticate(session, key=key)
    principal = cached_principal(key)
    if principal is not None:
        return principal
    principal = authenticate(session, key=key)
    if principal is not None:
        principal_cache.put(hash_key(key), principal, ttl_seconds)
    return principal


def is_admin_key(presented: str, admin_key: str) -> bool:
    """Constant-time comparison with the configured admin key (never true when none is configured)."""
    if not admin_key or not presented:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), admin_key.encode("utf-8"))


def list_keys(session: Session) -> list[tuple[ApiKey, Tenant]]:
    """Every key with its tenant, newest first (hashes stay inside; listings show the prefix)."""
    rows = session.execute(
        select(ApiKey, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .order_by(ApiKey.created_at.desc(), ApiKey.id)
    ).all()
    return [(api_key, tenant) for api_key, tenant in rows]


def revoke_key(session: Session, *, key_id: str) -> tuple[ApiKey, Tenant]:
    """Mark a key revoked (idempotent: revoking again keeps the first time) and commit."""
    row = session.execute(
        select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id).where(ApiKey.id == key_id)
    ).first()
    if row is None:
        raise NotFound(f"No API key with id '{key_id}'; GET /admin/keys lists them.")
    api_key, tenant = row
    if api_key.revoked_at is None:
        api_key.revoked_at = utcnow()
    # The key's dashboard sessions end with it (lookups also check revoked_at, so none outlives a race).
    session.execute(delete(DashboardSession).where(DashboardSession.api_key_id == api_key.id))
    session.commit()
    principal_cache.forget_key(api_key.id)
    return api_key, tenant


# ---------------------------------------------------------------------------------- dashboard sessions
#
# The dashboard cookie holds an opaque random session id, never the API key: the database keeps only its
# sha256 (256 random bits: nothing to brute-force), the key it was signed in with and when it expires.

SESSION_PREFIX = "ds_"


def start_session(session: Session, *, principal: Principal, ttl: timedelta) -> str:
    """A new dashboard session for the principal's key, committed; returns the id for the cookie (only here).

    Expired sessions are swept at the same time, so the table holds only live ones plus a day at most.
    """
    now = utcnow()
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
    session_id = SESSION_PREFIX + secrets.token_urlsafe(32)
    session.add(
        DashboardSession(
            id_hash=hash_key(session_id), api_key_id=principal.key_id, created_at=now, expires_at=now + ttl
        )
    )
    session.commit()
    return session_id


def session_principal(session: Session, *, session_id: str) -> Principal | None:
    """Who a dashboard session acts for; None when unknown, expired, signed out or its key was revoked."""
    if not session_id.startswith(SESSION_PREFIX) or len(session_id) > MAX_KEY_LENGTH:
        return None
    row = session.execute(
        select(DashboardSession, ApiKey, Tenant)
        .join(ApiKey, ApiKey.id == DashboardSession.api_key_id)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(DashboardSession.id_hash == hash_key(session_id))
    ).first()
    if row is None:
        return None
    dashboard_session, api_key, tenant = row
    if api_key.revoked_at is not None or dashboard_session.expires_at <= utcnow():
        return None
    return Principal(
        tenant_id=tenant.id, tenant_name=tenant.name, key_id=api_key.id, key_prefix=api_key.prefix
    )


def end_session(session: Session, *, session_id: str) -> None:
    """Sign-out: the session row is deleted (the id is then worthless), committed."""
    session.execute(delete(DashboardSession).where(DashboardSession.id_hash == hash_key(session_id)))
    session.commit()


LOCAL_TENANT = "local"


def ensure_local_key(session: Session, *, path: Path, tenant_name: str = LOCAL_TENANT) -> tuple[str, bool]:
    """The local key stored at `path` (`DATA_DIR/api_key`), issued and written (mode 0600) if missing.

    A stored key this database does not accept (revoked, or a fresh database) is replaced. Returns
    (key, created) so `distillery up` can print a new key once.
    """
    if path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if authenticate(session, key=stored) is not None:
            session.rollback()
            return stored, False
    issued = create_key(session, tenant_name=tenant_name, name="local (distillery up)")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(issued.key + "\n")
    os.chmod(temporary, 0o600)  # the umask may have narrowed it further; never wider
    temporary.replace(path)
    return issued.key, True
