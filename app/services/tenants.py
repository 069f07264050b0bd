"""Tenants: who owns jobs, datasets and registered teachers. Created on demand when an admin issues a key."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import Tenant


def get_by_name(session: Session, *, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def get_or_create(session: Session, *, name: str) -> Tenant:
    """The tenant called `name`, created if missing (flushed, not committed); safe against a racing create."""
    tenant = get_by_name(session, name=name)
    if tenant is not None:
        return tenant
    try:
        with session.begin_nested():
            tenant = Tenant(name=name)
            session.add(tenant)
    except IntegrityError:
        # Another request created it between our read and insert: use theirs.
        tenant = get_by_name(session, name=name)
        if tenant is None:
            raise
    return tenant


def list_all(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.name)).all())
