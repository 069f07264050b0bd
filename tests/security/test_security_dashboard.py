"""Dashboard sessions over real HTTP: the cookie is an opaque id (stored hashed), sign-in and sign-out are
CSRF- and Origin-checked, and a session ends at sign-out, at expiry and when its key is revoked."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import httpx
from sqlalchemy import select, update

from app.core.db import session_scope
from app.models import ApiKey, DashboardSession, utcnow
from tests.security.conftest import ADMIN_KEY, Server, TenantFactory

SESSION_COOKIE = "distillery_session"


def _key(tenant_client: httpx.Client) -> str:
    return tenant_client.headers["Authorization"].removeprefix("Bearer ")


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def _browser(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30.0)


def _sign_in(browser: httpx.Client, key: str, **headers: str) -> httpx.Response:
    token = _csrf(browser.get("/signin").text)
    return browser.post("/signin", data={"api_key": key, "csrf_token": token}, headers=headers)


def _session_rows(key: str) -> list[DashboardSession]:
    with session_scope() as session:
        key_hash = hashlib.sha256(key.encode()).hexdigest()
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == key_hash))
        rows = list(session.scalars(select(DashboardSession).where(DashboardSession.api_key_id == key_id)))
        for row in rows:
            session.expunge(row)
        return rows


def _opens_pages(server: Server, session_id: str) -> bool:
    with httpx.Client(base_url=server.url, cookies={SESSION_COOKIE: session_id}) as client:
        return client.get("/").status_code == 200


def test_the_cookie_is_an_opaque_hashed_session_not_the_key(
    shared_root_server: Server, two_tenants: TenantFactory
) -> None:
    alice, _ = two_tenants(shared_root_server)
    key = _key(alice.client)
    with _browser(shared_root_server) as browser:
        signed_in = _sign_in(browser, key)
        assert signed_in.status_code == 303, signed_in.text
        session_id = browser.cookies[SESSION_COOKIE]
        assert key not in session_id and session_id != key
        assert "max-age=28800" in signed_in.headers["set-cookie"].lower()  # DASHBOARD_SESSION_HOURS=8
        [row] = _session_rows(key)
        assert row.id_hash == hashlib.sha256(session_id.encode()).hexdigest()  # only the hash is stored
        assert browser.get("/").status_code == 200
    # The raw API key is no longer a dashboard credential.
    assert not _opens_pages(shared_root_server, key)


def test_login_csrf_from_another_site_is_refused(
    shared_root_server: Server, two_tenants: TenantFactory
) -> None:
    _, mallory = two_tenants(shared_root_server)
    attacker_key = _key(mallory.client)
    with _browser(shared_root_server) as victim:
        # A cross-site form post: no pre-session cookie of this site, no token.
        forged = victim.post(
            "/signin", data={"api_key": attacker_key}, headers={"Origin": "https://evil.example"}
        )
        assert forged.status_code == 403 and SESSION_COOKIE not in victim.cookies
        # Even with a token lifted from somewhere, a foreign Origin or a cross-site fetch is refused.
        foreign = ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"})
        for headers in foreign:
            refused = _sign_in(victim, attacker_key, **headers)
            assert refused.status_code == 403, headers
            assert SESSION_COOKIE not in victim.cookies
        # A wrong token with the right cookie is refused too.
        victim.get("/signin")
        wrong = victim.post("/signin", data={"api_key": attacker_key, "csrf_token": "0" * 64})
        assert wrong.status_code == 403
        assert _session_rows(attacker_key) == []
        # The legitimate same-origin form works.
        origin = shared_root_server.url
        assert _sign_in(victim, attacker_key, Origin=origin).status_code == 303


def test_sign_out_ends_the_session_and_needs_token_and_origin(
    shared_root_server: Server, two_tenants: TenantFactory
) -> None:
    alice, _ = two_tenants(shared_root_server)
    key = _key(alice.client)
    with _browser(shared_root_server) as browser:
        assert _sign_in(browser, key).status_code == 303
        session_id = browser.cookies[SESSION_COOKIE]
        token = _csrf(browser.get("/").text)
        assert browser.post("/signout", data={}).status_code == 403
        foreign = browser.post(
            "/signout", data={"csrf_token": token}, headers={"Origin": "https://evil.example"}
        )
        assert foreign.status_code == 403 and _opens_pages(shared_root_server, session_id)
        out = browser.post("/signout", data={"csrf_token": token}, headers={"Origin": shared_root_server.url})
        assert out.status_code == 303
    assert _session_rows(key) == []
    assert not _opens_pages(shared_root_server, session_id)  # a copied cookie is worthless now


def test_revoking_the_key_and_expiry_end_sessions(
    shared_root_server: Server, two_tenants: TenantFactory
) -> None:
    alice, mallory = two_tenants(shared_root_server)
    sessions = {}
    for tenant in (alice, mallory):
        with _browser(shared_root_server) as browser:
            assert _sign_in(browser, _key(tenant.client)).status_code == 303
            sessions[tenant.name] = browser.cookies[SESSION_COOKIE]
    # Expiry: a session past expires_at opens nothing.
    with session_scope() as session:
        session.execute(
            update(DashboardSession)
            .where(DashboardSession.id_hash == hashlib.sha256(sessions[mallory.name].encode()).hexdigest())
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert not _opens_pages(shared_root_server, sessions[mallory.name])
    # Revocation through the admin API ends the key's sessions at once.
    assert _opens_pages(shared_root_server, sessions[alice.name])
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys = httpx.get(f"{shared_root_server.url}/admin/keys", headers=admin).json()
    [alice_key] = [k for k in keys if k["tenant"] == alice.name]
    revoked = httpx.delete(f"{shared_root_server.url}/admin/keys/{alice_key['id']}", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert not _opens_pages(shared_root_server, sessions[alice.name])
    assert _session_rows(_key(alice.client)) == []
