"""Domain errors and the handlers that turn every error into an RFC 9457 problem+json response."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

logger = logging.getLogger("distillery.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
# Non-resolvable identifiers (RFC 9457 allows tag URIs); clients compare them, never fetch them.
PROBLEM_TYPE_BASE = "tag:distillery.example,2026:problem/"


class ProblemError(Exception):
    """An error a client can act on; rendered as problem+json with `status`, `title` and `detail`."""

    status: int = 400
    slug: str = "bad-request"
    title: str = "Bad request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extras: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extras = extras


class Unauthorized(ProblemError):
    """No valid API key: the client must send `Authorization: Bearer <key>`."""

    status = 401
    slug = "unauthorized"
    title = "Unauthorized"

    def __init__(self, detail: str, **extras: Any) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="distillery"'}, **extras)


class Forbidden(ProblemError):
    status = 403
    slug = "forbidden"
    title = "Forbidden"


class NotFound(ProblemError):
    status = 404
    slug = "not-found"
    title = "Not found"


class Conflict(ProblemError):
    status = 409
    slug = "conflict"
    title = "Conflict"


class Unprocessable(ProblemError):
    """The request is well-formed but names something invalid (unknown teacher, missing file, bound)."""

    status = 422
    slug = "unprocessable"
    title = "Unprocessable request"


class PayloadTooLarge(ProblemError):
    status = 413
    slug = "payload-too-large"
    title = "Payload too large"


class QuotaExceeded(ProblemError):
    """Too much is waiting; the client should come back after `retry_after` seconds."""

    status = 429
    slug = "quota-exceeded"
    title = "Too many queued jobs"

    def __init__(self, detail: str, *, retry_after: int, **extras: Any) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, retry_after=retry_after, **extras)


class ServiceUnavailable(ProblemError):
    status = 503
    slug = "service-unavailable"
    title = "Service unavailable"


def problem_response(
    request: Request,
    *,
    status: int,
    title: str,
    detail: str,
    slug: str | None = None,
    headers: dict[str, str] | None = None,
    **extras: Any,
) -> JSONResponse:
    """One problem+json response; `instance` is the request path."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + (slug or _slug_for(status)),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    body.update(extras)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _slug_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "-").replace("'", "")
    except ValueError:
        return "error"


def _title_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _loc_text(loc: tuple[int | str, ...] | list[int | str]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


async def _problem_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(
        request,
        status=exc.status,
        title=exc.title,
        detail=exc.detail,
        slug=exc.slug,
        headers=exc.headers,
        **exc.extras,
    )


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        loc = list(error.get("loc", ()))
        # Union members add a discriminator tag to the location; keep it, it names the member.
        errors.append(
            {
                "loc": loc,
                "field": _loc_text(loc),
                "msg": str(error.get("msg", "")),
                "type": error.get("type", ""),
            }
        )
    detail = "; ".join(f"{e['field']}: {e['msg']}" if e["field"] else str(e["msg"]) for e in errors)
    return problem_response(
        request,
        status=422,
        title="Invalid request",
        detail=detail or "The request is invalid.",
        slug="validation-error",
        errors=errors,
    )


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _title_for(exc.status_code)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"No resource at {request.method} {request.url.path}."
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 400 and detail == "There was an error parsing the body":
        # FastAPI's answer to a body that is not UTF-8 JSON; the same class of error as malformed JSON (422).
        return problem_response(
            request,
            status=422,
            title="Invalid request",
            detail="The request body is not valid UTF-8 JSON.",
            slug="validation-error",
        )
    if exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}."
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return problem_response(
        request,
        status=exc.status_code,
        title=_title_for(exc.status_code),
        detail=detail,
        headers=headers or None,
    )


_PROBED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's Allow names only the first route's)."""
    routes = request.app.router.routes
    return [
        method
        for method in _PROBED_METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


async def _database_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.error("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    detail = "The database cannot be reached right now; retry shortly."
    if "no such table" in str(exc):
        detail = "The database has no schema yet; run `alembic upgrade head` (`distillery up` does)."
    return problem_response(
        request,
        status=503,
        title="Database unavailable",
        detail=detail,
        slug="database-unavailable",
        headers={"Retry-After": "5"},
    )


async def _database_data_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A value the database type cannot hold (NUL in text, integer out of range): the client's input."""
    assert isinstance(exc, DataError)
    reason = str(getattr(exc, "orig", exc)).splitlines()[0] if str(getattr(exc, "orig", exc)) else "bad value"
    logger.info("database refused a value on %s %s: %s", request.method, request.url.path, reason)
    return problem_response(
        request,
        status=422,
        title="Invalid request",
        detail=f"A value in the request cannot be stored: {reason}.",
        slug="validation-error",
    )


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request,
        status=500,
        title="Internal server error",
        detail="An unexpected error occurred; it has been logged.",
        slug="internal-error",
    )


def install_exception_handlers(app: FastAPI) -> None:
    """Register the problem+json handlers on `app` (domain, validation, HTTP, database, unexpected)."""
    app.add_exception_handler(ProblemError, _problem_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(OperationalError, _database_unavailable_handler)
    app.add_exception_handler(DataError, _database_data_error_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
