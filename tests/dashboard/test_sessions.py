"""Logging in and out: cookies, sessions in the database, CSRF on the login form, throttling."""

from __future__ import annotations

import hashlib
import logging

import pytest
import sqlalchemy as sa

from skylift.hub.dashboard.sessions import IDLE
from skylift.hub.db.models import User, WebSession

from .conftest import PASSWORD, Dashboard, add_user


def _sessions(dash: Dashboard) -> list[WebSession]:
    with dash.hub.session() as s:
        rows = list(s.scalars(sa.select(WebSession)))
        s.expunge_all()
        return rows


def test_login_sets_a_safe_cookie_and_stores_only_its_hash(dash: Dashboard) -> None:
    b = dash.browser()
    form = b.get("/login?next=/devices")
    assert form.status_code == 200 and 'name="csrf"' in form.text
    r = b.post("/login", {"email": "Operator@Acme.example", "password": PASSWORD,
                          "next": "/devices"})  # fmt: skip
    assert r.status_code == 303 and r.headers["location"] == "/devices"
    [cookie] = [
        c for c in r.headers.get_list("set-cookie") if c.startswith("__Host-skylift_session=")
    ]
    attributes = {a.strip().lower() for a in cookie.split(";")}
    assert {"httponly", "secure", "samesite=lax", "path=/"} <= attributes
    assert not any(a.startswith("domain") for a in attributes)
    token = cookie.split(";")[0].split("=", 1)[1]
    [row] = _sessions(dash)
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest() != token
    page = b.get("/devices")
    assert page.status_code == 200 and "operator@acme.example · operator · acme" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("email", "password"),
    [("operator@acme.example", "wrong password"), ("nobody@acme.example", PASSWORD),
     ("disabled@acme.example", PASSWORD)],
    ids=["wrong-password", "unknown-email", "disabled-user"],
)  # fmt: skip
def test_refused_logins_say_one_thing_and_open_no_session(
    dash: Dashboard, email: str, password: str
) -> None:
    add_user(dash.hub, "disabled@acme.example", "admin", disabled=True)
    b = dash.browser()
    b.get("/login")
    r = b.post("/login", {"email": email, "password": password})
    assert r.status_code == 401
    assert '<p class="error" role="alert" id="login-error">wrong email or password</p>' in r.text
    assert _sessions(dash) == []
    assert b.get("/").status_code == 303  # still logged out


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
def test_login_form_needs_its_csrf_token_and_our_origin(dash: Dashboard) -> None:
    b = dash.browser()
    b.get("/login")
    # A login forged from another site: no token of ours...
    r = b.post("/login", {"email": "admin@acme.example", "password": PASSWORD}, csrf=False)
    assert r.status_code == 403 and "the login form expired" in r.text
    # ... or ours, but sent from another origin.
    r = b.post("/login", {"email": "admin@acme.example", "password": PASSWORD},
               headers={"Origin": "https://evil.example"})  # fmt: skip
    assert r.status_code == 403 and "another site" in r.text
    assert _sessions(dash) == []


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
def test_after_login_only_local_paths_are_followed(dash: Dashboard) -> None:
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        b = dash.browser()
        b.get("/login")
        r = b.post("/login", {"email": "viewer@acme.example", "password": PASSWORD,
                              "next": target})  # fmt: skip
        assert r.status_code == 303 and r.headers["location"] == "/", target


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
def test_pages_send_strangers_to_the_login_page(dash: Dashboard) -> None:
    b = dash.browser()
    r = b.get("/deployments?status=active")
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=%2Fdeployments%3Fstatus%3Dactive"
    live = b.get("/overview/live")  # the script's requests get a status, not a page
    assert live.status_code == 401 and live.headers["content-type"].startswith("text/plain")


def test_logout_ends_the_session_everywhere(dash: Dashboard) -> None:
    b = dash.browser("admin@acme.example")
    cookie = b.client.cookies.get("__Host-skylift_session")
    assert b.get("/").status_code == 200
    r = b.post("/logout")
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert _sessions(dash) == []
    # The old cookie, replayed, is worth nothing.
    replay = dash.browser()
    replay.client.cookies.set("__Host-skylift_session", cookie or "", domain="hub")
    assert replay.get("/").status_code == 303


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
def test_sessions_end_when_idle_and_when_the_user_is_disabled(dash: Dashboard) -> None:
    b = dash.browser("viewer@acme.example")
    dash.hub.clock.advance(IDLE.total_seconds() - 60)
    assert b.get("/").status_code == 200  # used within the idle time: extended
    dash.hub.clock.advance(IDLE.total_seconds() - 60)
    assert b.get("/").status_code == 200
    dash.hub.clock.advance(IDLE.total_seconds() + 1)
    assert b.get("/").status_code == 303
    c = dash.browser("operator@acme.example")
    with dash.hub.session() as s:
        s.execute(
            sa.update(User).where(User.email == "operator@acme.example").values(disabled=True)
        )
    assert c.get("/").status_code == 303


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
def test_failed_logins_are_limited_per_email(dash: Dashboard) -> None:
    b = dash.browser()
    for _ in range(10):
        b.get("/login")
        assert (
            b.post("/login", {"email": "admin@acme.example", "password": "guess"}).status_code
            == 401
        )
    b.get("/login")
    r = b.post("/login", {"email": "admin@acme.example", "password": PASSWORD})
    assert r.status_code == 401 and "too many failed logins" in r.text
    assert _sessions(dash) == []
    # Another account is not locked by it.
    assert dash.browser("viewer@acme.example").get("/").status_code == 200


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
def test_passwords_and_hashes_never_reach_the_log(
    dash: Dashboard, caplog: pytest.LogCaptureFixture
) -> None:
    with dash.hub.session() as s:
        digest = s.scalars(
            sa.select(User.password_hash).where(User.email == "admin@acme.example")
        ).one()
    caplog.set_level(logging.DEBUG)
    b = dash.browser()
    b.get("/login")
    b.post("/login", {"email": "admin@acme.example", "password": "a wrong one"})
    b.get("/login")
    b.post("/login", {"email": "admin@acme.example", "password": PASSWORD})
    logged = caplog.text
    assert "dashboard login: admin@acme.example" in logged
    for secret in (PASSWORD, "a wrong one", digest, digest.split("$")[-1]):
        assert secret not in logged
