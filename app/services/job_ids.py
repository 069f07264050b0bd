"""Job ids as people type them: the full id, or any unique prefix of it (as git resolves commits).

Routes call `resolve` first; a full-length id returns at once, without a query, so the polled
GET /distillation/jobs/{id} path costs nothing more. A shorter id is looked up among the caller's
tenant's jobs only: another tenant's job never matches, and is never listed as a candidate.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import Job

# Job ids are UUID4 strings (app.models.new_id).
FULL_ID_LENGTH = 36
MIN_PREFIX_LENGTH = 4
# Candidates listed in a 409 for an ambiguous prefix.
MAX_LISTED_MATCHES = 10


def is_full(job_id: str) -> bool:
    """Whether `job_id` has the length of a whole id (then it is used as given, never as a prefix)."""
    return len(job_id) >= FULL_ID_LENGTH


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def resolve(session: Session, *, job_id: str, tenant_id: str | None) -> str:
    """The full id `job_id` names: itself when full length, else the one tenant job it is a prefix of.

    NotFound when no job matches (or the prefix is shorter than MIN_PREFIX_LENGTH); Conflict (409) listing
    the matching ids when several do.
    """
    if is_full(job_id):
        return job_id
    if len(job_id) < MIN_PREFIX_LENGTH:
        raise NotFound(
            f"No job with id '{job_id}'; an id prefix needs at least {MIN_PREFIX_LENGTH} characters."
        )
    prefix = job_id.lower()  # ids are lower-case hex; a prefix copied in capitals still matches
    query = select(Job.id).where(Job.id.like(_escape_like(prefix) + "%", escape="\\"))
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    matches = list(session.scalars(query.order_by(Job.id).limit(MAX_LISTED_MATCHES + 1)))
    if job_id in matches:  # an exact id that happens to be shorter than a UUID
        return job_id
    if not matches:
        raise NotFound(f"No job with id '{job_id}', nor any whose id starts with it.")
    if len(matches) > 1:
        listed = matches[:MAX_LISTED_MATCHES]
        more = " and more" if len(matches) > MAX_LISTED_MATCHES else ""
        raise Conflict(
            f"The id prefix '{job_id}' is ambiguous: it matches {', '.join(listed)}{more}; "
            "give more characters.",
            matches=listed,
        )
    return matches[0]
