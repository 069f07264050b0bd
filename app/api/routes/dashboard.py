"""The dashboard: server-rendered pages for people (jobs, curves, results, downloads, cancel).

Sign-in exchanges an API key for an opaque session id in an HttpOnly, SameSite=Strict cookie (stored
hashed, expiring, ended by sign-out and by revoking the key). The sign-in form carries a token bound to a
pre-session cookie, and the forms of a session a token bound to its id: a page of another site can neither
read nor compute them; sign-in and sign-out also refuse a foreign Origin. No JavaScript or external assets
are needed: pages refresh themselves while a job is live.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app.api.deps import SessionDep, SettingsDep
from app.core.logging import bind as bind_log_fields
from app.errors import ProblemError
from app.models import TERMINAL_STATUSES, Job
from app.services import artifacts as artifacts_service
from app.services import auth as auth_service
from app.services import events as events_service
from app.services import job_ids
from app.services import jobs as jobs_service
from app.services.auth import Principal
from app.web import results_view
from app.web.charts import history_charts
from app.web.search_view import build as build_search_view
from app.web.search_view import size_curve_chart

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parents[2] / "web" / "templates"))

SESSION_COOKIE = "distillery_session"
# Before sign-in: a random value the sign-in form's token is bound to (login CSRF protection).
SIGNIN_COOKIE = "distillery_signin"
SIGNIN_MAX_AGE = 3600
CSRF_FIELD = "csrf_token"
REFRESH_SECONDS = 3
# Metric events read to draw a running job's curves (one per epoch and stage).
MAX_CURVE_EVENTS = 5000


def csrf_token(secret: str, purpose: bytes = b"distillery-dashboard-csrf") -> str:
    """A form's CSRF token: an HMAC of the session id (or pre-session value), unguessable without it."""
    return hmac.new(secret.encode("utf-8"), purpose, hashlib.sha256).hexdigest()


def _signin_token(value: str) -> str:
    return csrf_token(value, b"distillery-dashboard-signin")


def _token_matches(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def _same_origin(request: Request) -> bool:
    """False when the browser says the form came from another site (Origin or Sec-Fetch-Site)."""
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not sent by every client; the CSRF token still decides
    netloc = urlsplit(origin).netloc.lower()
    # Behind a reverse proxy the Host may be the upstream's; the proxy's X-Forwarded-Host then names ours (a
    # cross-site form cannot set either header).
    hosts = {request.headers.get("host", "").lower()}
    hosts |= {h.strip().lower() for h in request.headers.get("x-forwarded-host", "").split(",") if h.strip()}
    return bool(netloc) and netloc in hosts


def _signed_in(request: Request, session: Session) -> tuple[Principal, str] | None:
    """The principal and id of the session cookie; None: none, expired, signed out or key revoked."""
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        return None
    principal = auth_service.session_principal(session, session_id=session_id)
    session.rollback()  # end the lookup's transaction (SQLite: its lock) before rendering
    if principal is None:
        return None
    bind_log_fields(tenant=principal.tenant_name)
    return principal, session_id


def _to_signin() -> RedirectResponse:
    return RedirectResponse("/signin", status_code=status.HTTP_303_SEE_OTHER)


def _page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _signin_page(
    request: Request, *, error: str | None = None, status_code: int = status.HTTP_200_OK
) -> HTMLResponse:
    """The sign-in form, its token bound to the browser's pre-session cookie (set here when missing)."""
    existing = request.cookies.get(SIGNIN_COOKIE)
    value = existing or secrets.token_urlsafe(32)
    response = _page(
        request, "signin.html", {"error": error, "csrf_token": _signin_token(value)}, status_code
    )
    if not existing:
        response.set_cookie(
            SIGNIN_COOKIE,
            value,
            max_age=SIGNIN_MAX_AGE,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
    return response


@router.get("/signin", response_class=HTMLResponse)
def signin_form(request: Request) -> HTMLResponse:
    return _signin_page(request)


@router.post("/signin", response_class=HTMLResponse)
def signin(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=500)] = "",
    csrf: Annotated[str, Form(alias=CSRF_FIELD, max_length=200)] = "",
) -> Response:
    pre_session = request.cookies.get(SIGNIN_COOKIE, "")
    if not _same_origin(request) or not pre_session or not _token_matches(csrf, _signin_token(pre_session)):
        return _forbidden(request)
    principal = auth_service.authenticate(session, key=api_key.strip())
    session.rollback()
    if principal is None:
        return _signin_page(request, error="That API key is unknown or revoked.", status_code=401)
    ttl = timedelta(hours=settings.dashboard_session_hours)
    session_id = auth_service.start_session(session, principal=principal, ttl=ttl)
    response = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(ttl.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    response.delete_cookie(SIGNIN_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.post("/signout")
def signout(
    request: Request, session: SessionDep, csrf: Annotated[str, Form(alias=CSRF_FIELD, max_length=200)] = ""
) -> Response:
    if not _same_origin(request):
        return _forbidden(request)
    signed_in = _signed_in(request, session)
    if signed_in is not None:
        if not _token_matches(csrf, csrf_token(signed_in[1])):
            return _forbidden(request)
        auth_service.end_session(session, session_id=signed_in[1])
    response = _to_signin()
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def _forbidden(request: Request) -> HTMLResponse:
    return _page(
        request,
        "error.html",
        {
            "title": "Forbidden",
            "message": "The form's CSRF token is missing or wrong, or it came from another site; reload the "
            "page.",
        },
        status.HTTP_403_FORBIDDEN,
    )


@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep) -> Response:
    signed_in = _signed_in(request, session)
    if signed_in is None:
        return _to_signin()
    principal, key = signed_in
    jobs, _, _ = jobs_service.list_page(
        session, limit=100, cursor=None, statuses=[], teacher=None, tenant_id=principal.tenant_id
    )
    summaries = [jobs_service.to_summary(job) for job in jobs]
    live = any(s.status not in TERMINAL_STATUSES for s in summaries)
    return _page(
        request,
        "jobs.html",
        {
            "principal": principal,
            "jobs": summaries,
            "csrf_token": csrf_token(key),
            "refresh": REFRESH_SECONDS if live else None,
        },
    )


def _curve_history(session: Session, job: Job) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-epoch figures of the KD run and of the labels-only baseline run: the stored histories when
    finished, else the metric events so far."""
    results = job.results or {}
    history, baseline = results.get("training_history"), results.get("baseline_history")
    if isinstance(history, list) and history:
        return (
            [entry for entry in history if isinstance(entry, dict)],
            [entry for entry in baseline or [] if isinstance(entry, dict)],
        )
    events, _ = events_service.list_events(session, job_id=job.id, after=0, limit=MAX_CURVE_EVENTS)
    by_epoch: dict[tuple[int, int], dict[str, Any]] = {}
    baseline_by_epoch: dict[int, dict[str, Any]] = {}
    for event in events:
        data = event.data or {}
        phase = str(data.get("phase") or "")
        # Search trials and other seeds' runs have curves of their own, not the delivered run's.
        if event.kind != "metric" or "epoch" not in data or phase.startswith(("teacher", "search", "seeds")):
            continue
        if phase.startswith("baseline"):
            baseline_by_epoch[int(data["epoch"])] = data
        else:  # a resumed epoch: latest wins
            by_epoch[(int(data.get("stage") or 1), int(data["epoch"]))] = data
    return [by_epoch[k] for k in sorted(by_epoch)], [baseline_by_epoch[k] for k in sorted(baseline_by_epoch)]


def _spec_metric(job: Job) -> str:
    """The metric a running job reports per epoch, before its results say so."""
    return "perplexity" if (job.spec or {}).get("task") == "causal-lm" else "accuracy"


def _selected_epoch(results: dict[str, Any], history: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(stage, epoch) of the delivered weights: `selected_epoch` of the last stage, else (older results,
    best-validation delivery) that stage's `best_epoch`."""
    if not results or not history:
        return None
    stage = int(history[-1].get("stage") or 1)
    epoch = results.get("selected_epoch")
    if epoch is None and results_view.selected_by(results) == "best_validation":
        stages = results.get("stages") or []
        epoch = stages[-1].get("best_epoch") if stages and isinstance(stages[-1], dict) else None
    return (stage, int(epoch)) if isinstance(epoch, int) else None


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, session: SessionDep) -> Response:
    signed_in = _signed_in(request, session)
    if signed_in is None:
        return _to_signin()
    principal, key = signed_in
    if not job_ids.is_full(job_id):  # a short id, as the jobs list shows: go to the job's own address
        try:
            full_id = job_ids.resolve(session, job_id=job_id, tenant_id=principal.tenant_id)
        except ProblemError as exc:
            return _page(request, "error.html", {"title": exc.title, "message": exc.detail}, exc.status)
        return RedirectResponse(f"/jobs/{full_id}", status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    return _render_job(request, session, principal, key, job_id)


def _render_job(
    request: Request,
    session: Session,
    principal: Principal,
    key: str,
    job_id: str,
    *,
    notice: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    try:
        job = jobs_service.get_or_raise(session, job_id=job_id, tenant_id=principal.tenant_id)
    except ProblemError as exc:
        return _page(request, "error.html", {"title": exc.title, "message": exc.detail}, exc.status)
    read = jobs_service.to_read(job)
    results = job.results or {}
    history, baseline_history = _curve_history(session, job)
    view = results_view.build(results) if results else None
    charts = history_charts(
        history,
        teacher_metric=results.get("teacher_accuracy"),
        metric=str(results.get("metric") or _spec_metric(job)),
        baseline_history=baseline_history,
        selected=_selected_epoch(results, history),
        selected_by=results_view.selected_by(results) if results else None,
    )
    size_curve = size_curve_chart(results) if results else None
    if size_curve is not None:
        charts.append(size_curve)
    artifacts = artifacts_service.list_for_job(session, job_id=job.id)
    live = read.status not in TERMINAL_STATUSES
    return _page(
        request,
        "job.html",
        {
            "principal": principal,
            "job": read,
            "results": results,
            "view": view,
            "charts": charts,
            "search": build_search_view(results) if results else None,
            "artifacts": artifacts,
            "csrf_token": csrf_token(key),
            "cancellable": live and read.status != "cancelling",
            "notice": notice,
            "refresh": REFRESH_SECONDS if live else None,
        },
        status_code,
    )


@router.post("/jobs/{job_id}/cancel")
def cancel_from_page(
    request: Request,
    job_id: str,
    session: SessionDep,
    csrf: Annotated[str, Form(alias=CSRF_FIELD, max_length=200)] = "",
) -> Response:
    signed_in = _signed_in(request, session)
    if signed_in is None:
        return _to_signin()
    principal, key = signed_in
    if not hmac.compare_digest(csrf.encode(), csrf_token(key).encode()):
        return _forbidden(request)
    try:
        job_id = job_ids.resolve(session, job_id=job_id, tenant_id=principal.tenant_id)
        job = jobs_service.cancel(session, job_id=job_id, tenant_id=principal.tenant_id)
    except ProblemError as exc:
        return _render_job(
            request, session, principal, key, job_id, notice=exc.detail, status_code=exc.status
        )
    return RedirectResponse(f"/jobs/{job.id}", status_code=status.HTTP_303_SEE_OTHER)


@router.get("/jobs/{job_id}/artifacts/{name}")
def download_from_page(
    request: Request, job_id: str, name: str, session: SessionDep, settings: SettingsDep
) -> Response:
    signed_in = _signed_in(request, session)
    if signed_in is None:
        return _to_signin()
    try:
        job_id = job_ids.resolve(session, job_id=job_id, tenant_id=signed_in[0].tenant_id)
        jobs_service.get_or_raise(session, job_id=job_id, tenant_id=signed_in[0].tenant_id)
        artifact, path = artifacts_service.get_file(session, job_id=job_id, name=name, settings=settings)
    except ProblemError as exc:
        return _page(request, "error.html", {"title": exc.title, "message": exc.detail}, exc.status)
    return FileResponse(path, media_type=artifact.media_type, filename=artifact.name)
