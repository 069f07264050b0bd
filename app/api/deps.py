"""Typed request dependencies: a database session per request and the app's settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import AsyncDb, get_sessionmaker
from app.core.logging import bind as bind_log_fields
from app.errors import Forbidden, Unauthorized, Unprocessable
from app.services import auth as auth_service
from app.services.auth import Principal


async def get_session() -> AsyncIterator[Session]:
    """One session per request; closed (rolled back if uncommitted) when the request ends.

    Async so that opening it costs no worker-thread hop (a Session does no I/O until first used); the close
    runs in the thread pool only when the session holds a connection (its rollback is a round trip).
    """
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_async_db(request: Request) -> AsyncDb | None:
    """The app's async pool for hot one-statement work (PostgreSQL, while the lifespan runs).

    None on SQLite, and in an app whose lifespan has not started (a TestClient used without `with`):
    callers then read through a sync session in the thread pool.
    """
    db = getattr(request.app.state, "async_db", None)
    return db if isinstance(db, AsyncDb) else None


AsyncDbDep = Annotated[AsyncDb | None, Depends(get_async_db)]


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with (tests build apps with their own), else the process-wide ones."""
    settings = getattr(request.app.state, "settings", None)
    return settings if isinstance(settings, Settings) else get_settings()


# Closed when the route function returns, before the response is sent: a SQLite transaction (BEGIN
# IMMEDIATE) must not hold the write lock while a client downloads an artifact.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_wake_scheduler(request: Request) -> bool:
    """Whether a start asks the scheduler for admission at once (off in API tests that check states)."""
    return bool(getattr(request.app.state, "wake_scheduler", True))


WakeSchedulerDep = Annotated[bool, Depends(get_wake_scheduler)]


class TenantKey(HTTPBearer):
    """The tenant of the bearer key; 401 (with WWW-Authenticate) when missing, unknown or revoked.

    A security scheme (so /docs shows it and its Authorize button) that is the whole dependency: the
    header parse and the lookup in one call, with no sub-dependencies for FastAPI to resolve on every
    request. A key accepted in the last AUTH_CACHE_SECONDS is answered from memory, on the event loop;
    otherwise the lookup runs on the event loop too (PostgreSQL's async read pool), or in the thread pool
    (SQLite). No request session is opened for it: the hot reads need none.
    """

    def __init__(self) -> None:
        # auto_error=False: a missing or malformed header becomes our 401 problem+json, not FastAPI's 403.
        super().__init__(
            auto_error=False,
            scheme_name="ApiKey",
            description="A tenant API key: `Authorization: Bearer dk_...` (issued by POST /admin/keys; "
            "`distillery up` stores a local one in DATA_DIR/api_key).",
        )

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        credentials = await super().__call__(request)
        if credentials is None:
            raise Unauthorized(
                "Send an API key as `Authorization: Bearer <key>`: the local stack (`distillery up`) prints "
                "one and stores it in DATA_DIR/api_key; an operator issues others with POST /admin/keys."
            )
        key = credentials.credentials
        ttl_seconds = (await get_app_settings(request)).auth_cache_seconds
        principal = auth_service.cached_principal(key) if ttl_seconds > 0 else None
        if principal is None:
            db = await get_async_db(request)
            if db is not None:
                principal = await auth_service.authenticate_async(db, key=key, ttl_seconds=ttl_seconds)
            else:
                principal = await run_in_threadpool(_authenticate, key, ttl_seconds)
        if principal is None:
            raise Unauthorized(
                "The API key sent is unknown or has been revoked; check which key your client sends "
                "(`distillery config` shows it) or ask an operator for a new one."
            )
        bind_log_fields(tenant=principal.tenant_name)
        return principal


get_current_tenant = TenantKey()
_admin_bearer = HTTPBearer(
    auto_error=False, scheme_name="AdminKey", description="The ADMIN_API_KEY setting, as a bearer token."
)


def _authenticate(key: str, ttl_seconds: float) -> Principal | None:
    """The key lookup in its own short session (thread pool): its transaction ends at once, which on SQLite
    releases the write lock before an upload streams."""
    with get_sessionmaker()() as session:
        return auth_service.authenticate_cached(session, key=key, ttl_seconds=ttl_seconds)


CurrentTenantDep = Annotated[Principal, Depends(get_current_tenant)]


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
) -> None:
    """Admin endpoints: 403 when ADMIN_API_KEY is unset, 401 unless the bearer token equals it."""
    if not settings.admin_api_key:
        raise Forbidden("Admin endpoints are disabled: set ADMIN_API_KEY to enable them.")
    if credentials is None or not auth_service.is_admin_key(credentials.credentials, settings.admin_api_key):
        raise Unauthorized("Send the admin key as `Authorization: Bearer <ADMIN_API_KEY>`.")


AdminDep = Annotated[None, Depends(require_admin)]


def _declared_query(dependant: Dependant) -> tuple[frozenset[str], tuple[str, ...]]:
    """The query parameter names an operation declares (aliases; `name[key]` aliases stand for a `name[`
    prefix), its dependencies' included."""
    names: set[str] = set()
    prefixes: list[str] = []
    stack = [dependant]
    while stack:
        current = stack.pop()
        stack.extend(current.dependencies)
        for param in current.query_params:
            if param.alias.endswith("[key]"):
                prefixes.append(param.alias.removesuffix("key]"))
            else:
                names.add(param.alias)
    return frozenset(names), tuple(prefixes)


def reject_unknown_query_params(request: Request, names: frozenset[str], prefixes: tuple[str, ...]) -> None:
    """422 for a query parameter the operation does not take: a misspelt filter (`?stauts=`) must not
    silently answer everything, just as unknown body fields are refused."""
    unknown = [
        k for k in request.query_params if k not in names and not (prefixes and k.startswith(prefixes))
    ]
    if unknown:
        valid = ", ".join(sorted(names | {f"{p}key]" for p in prefixes})) or "none"
        shown = ", ".join(repr(k[:64]) for k in unknown[:5])
        raise Unprocessable(
            f"Unknown query parameter(s) {shown}; this operation takes: {valid}",
            errors=[
                {
                    "loc": ["query", k[:100]],
                    "field": k[:100],
                    "msg": "unknown query parameter",
                    "type": "extra_forbidden",
                }
                for k in unknown[:20]
            ],
        )


class CheckedQueryRoute(APIRoute):
    """The API's routes (`APIRouter(route_class=CheckedQueryRoute)`): unknown query parameters are refused
    with a 422 before anything else runs (authentication included), as unknown body fields are.

    A wrapper around the operation's handler rather than a dependency of every router: it costs nothing
    on a request without a query string, where a dependency would be resolved on every request.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        names, prefixes = _declared_query(self.dependant)

        async def checked(request: Request) -> Response:
            if request.scope.get("query_string"):
                reject_unknown_query_params(request, names, prefixes)
            return await handler(request)

        return checked
