"""Typed request dependencies: a database session per request and the app's settings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import get_sessionmaker


def get_session() -> Iterator[Session]:
    """One session per request; closed (rolled back if uncommitted) when the request ends."""
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with (tests build apps with their own), else the process-wide ones."""
    settings = getattr(request.app.state, "settings", None)
    return settings if isinstance(settings, Settings) else get_settings()


# Closed when the route function returns, before the response is sent: a SQLite transaction (BEGIN
# IMMEDIATE) must not hold the write lock while a client downloads an artifact.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_wake_scheduler(request: Request) -> bool:
    """Whether a start asks the scheduler for admission at once (off in API tests that check states)."""
    return bool(getattr(request.app.state, "wake_scheduler", True))


WakeSchedulerDep = Annotated[bool, Depends(get_wake_scheduler)]
