"""The local key `distillery up` creates: under DATA_DIR, mode 0600, reused, replaced if revoked."""

from __future__ import annotations

import stat
from pathlib import Path

from app.core.db import session_scope
from app.services import auth


def test_local_key_is_created_once_private_and_valid(clean_database: str, tmp_path: Path) -> None:
    path = tmp_path / "data" / "api_key"
    with session_scope() as session:
        key, created = auth.ensure_local_key(session, path=path)
    assert created and key.startswith("dk_")
    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with session_scope() as session:
        principal = auth.authenticate(session, key=key)
        assert principal is not None and principal.tenant_name == auth.LOCAL_TENANT
        again, created_again = auth.ensure_local_key(session, path=path)
    assert (again, created_again) == (key, False)


def test_a_revoked_or_foreign_local_key_is_replaced(clean_database: str, tmp_path: Path) -> None:
    path = tmp_path / "api_key"
    path.write_text("dk_from-another-database\n")
    with session_scope() as session:
        first, created = auth.ensure_local_key(session, path=path)
    assert created and first != "dk_from-another-database"
    with session_scope() as session:
        principal = auth.authenticate(session, key=first)
        assert principal is not None
        auth.revoke_key(session, key_id=principal.key_id)
    with session_scope() as session:
        second, created = auth.ensure_local_key(session, path=path)
        assert created and second != first and auth.authenticate(session, key=second) is not None
    assert path.read_text().strip() == second
    # Same tenant as before: the local user keeps seeing their jobs.
    with session_scope() as session:
        assert auth.authenticate(session, key=second).tenant_id == principal.tenant_id  # type: ignore[union-attr]
