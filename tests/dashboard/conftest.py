"""A hub with the dashboard, and browsers for it: httpx clients that keep cookies.

- ``hub``: a new hub per test on the ``db`` fixture (SQLite and PostgreSQL),
  the one the rollout tests use (``tests/hub/rollouts/conftest.py``): real
  bundles pushed through the management API, tokens of each role, devices
  straight in the database, no background loop unless a test runs one.
- ``released``: that hub with product ``gw`` and its releases 1.0.0 and 1.1.0.
- :class:`Browser`: one person's browser on the dashboard, over the same ASGI
  app that ``skylift hub serve`` runs, at ``https://hub`` (so cookies are
  ``Secure`` and ``__Host-`` prefixed, as behind the hub's TLS). It keeps
  cookies and the CSRF token of the last page it loaded, as a browser
  submitting that page's forms would.
- Users are created with real scrypt hashes (``skylift.hub.auth.hash_password``).
"""

from __future__ import annotations

import functools
import html
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parents[1]))
from hub.conftest import (  # noqa: F401 - fixtures, re-exported for this directory
    BACKENDS,
    MigratedDatabase,
    _postgres_databases,
    _sqlite_template,
    database_backend,
    db,
    postgres_url,
)
from hub.rollouts.conftest import (  # noqa: F401 - fixtures
    Exploded,
    Hub,
    _running_hub,
    v1,
    v2,
)
from skylift.hub.auth import hash_password
from skylift.hub.db.models import Organisation, Role, User

PASSWORD = "correct horse battery staple"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Browser:
    """One person's browser: cookies, and the CSRF token of the last page it loaded."""

    hub: Hub
    client: httpx.AsyncClient
    csrf: str | None = None
    history: list[str] = field(default_factory=list)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Accept": "text/html", **kw.pop("headers", {})}
        call = functools.partial(self.client.request, method, path, headers=headers, **kw)
        response: httpx.Response = self.hub.portal.call(call)
        self.history.append(f"{method} {path} -> {response.status_code}")
        if "text/html" in response.headers.get("content-type", ""):
            found = _CSRF.search(response.text)
            if found:
                self.csrf = html.unescape(found.group(1))
        return response

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, data: dict[str, str] | None = None, *, csrf: bool = True,
             **kw: Any) -> httpx.Response:  # fmt: skip
        """Submit a form (with the last page's CSRF token unless ``csrf`` is False)."""
        fields = dict(data or {})
        if csrf and self.csrf is not None:
            fields.setdefault("csrf", self.csrf)
        return self.request("POST", path, data=fields, **kw)

    def login(self, email: str, password: str = PASSWORD) -> httpx.Response:
        self.get("/login")
        return self.post("/login", {"email": email, "password": password})

    def close(self) -> None:
        self.hub.portal.call(self.client.aclose)


def add_user(
    hub: Hub, email: str, role: str, *, org_id: int | None = None, password: str = PASSWORD,
    disabled: bool = False,
) -> int:  # fmt: skip
    """A dashboard user straight in the database, with a real password hash."""
    org = org_id or hub.org_id()
    with hub.session() as s:
        user = User(org_id=org, email=email, password_hash=hash_password(password),
                    role=Role(role), disabled=disabled)  # fmt: skip
        s.add(user)
        s.flush()
        return user.id


@dataclass
class Dashboard:
    """The hub, its users, and a way to open browsers on it."""

    hub: Hub
    browsers: list[Browser] = field(default_factory=list)

    def browser(self, login: str | None = None) -> Browser:
        """A new browser; logged in as ``login`` (an email) if given."""
        app = self.hub.client._transport.app  # type: ignore[attr-defined]
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="https://hub", follow_redirects=False
        )
        b = Browser(self.hub, client)
        self.browsers.append(b)
        if login is not None:
            r = b.login(login)
            assert r.status_code == 303, r.text
            assert r.headers["location"] == "/"
        return b

    def state(self) -> dict[str, list[str]]:
        """Every row of the tables a dashboard action could change, to show nothing did."""
        from skylift.hub.db.models import Base

        out: dict[str, list[str]] = {}
        with self.hub.session() as s:
            for table in Base.metadata.sorted_tables:
                if table.name in ("web_sessions", "api_tokens"):
                    continue  # logging in and presenting tokens are uses, not changes
                out[table.name] = sorted(map(repr, s.execute(sa.select(table))))
        return out


def _with_users(hub: Hub) -> Dashboard:
    d = Dashboard(hub)
    for role in ("viewer", "operator", "admin"):
        add_user(hub, f"{role}@acme.example", role)
    other = hub.add_org("other")
    add_user(hub, "admin@other.example", "admin", org_id=other)
    return d


def _release(d: Dashboard, *bundles: Exploded) -> None:
    assert d.hub.create_product().status_code == 201
    for bundle in bundles:
        r = d.hub.push(bundle)
        assert r.status_code == 201, r.text


@pytest.fixture(scope="module", params=BACKENDS)
def shared(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    v1: Exploded,  # noqa: F811 - the fixture
    v2: Exploded,  # noqa: F811
) -> Iterator[Dashboard]:
    """One released hub with users per module and backend, for tables of refusals."""
    tmp = tmp_path_factory.mktemp("dashboard")
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        shutil.copyfile(template, tmp / "hub.db")
        url, drop = f"sqlite:///{tmp / 'hub.db'}", None
    else:
        databases = request.getfixturevalue("_postgres_databases")
        url = databases.create(migrated=True)
        drop = databases.drop
    try:
        with _running_hub(tmp / "hub", url) as h:
            d = _with_users(h)
            _release(d, v1, v2)
            try:
                yield d
            finally:
                for b in d.browsers:
                    b.close()
    finally:
        if drop is not None:
            drop(url)


@pytest.fixture
def hub(tmp_path: Path, db: MigratedDatabase) -> Iterator[Hub]:  # noqa: F811 - the fixture
    """A new hub per test and backend, with viewer and operator tokens."""
    with _running_hub(tmp_path / "hub", db.url) as h:
        yield h


@pytest.fixture
def dash(hub: Hub) -> Iterator[Dashboard]:
    """The hub with users of each role in "acme" and an admin in organisation "other"."""
    d = _with_users(hub)
    try:
        yield d
    finally:
        for b in d.browsers:
            b.close()


@pytest.fixture
def released(dash: Dashboard, v1: Exploded, v2: Exploded) -> Dashboard:  # noqa: F811
    """Product gw with releases 1.0.0 and 1.1.0."""
    _release(dash, v1, v2)
    return dash


def other_org_id(hub: Hub) -> int:
    with hub.session() as s:
        return int(s.scalars(sa.select(Organisation.id).where(Organisation.name == "other")).one())
