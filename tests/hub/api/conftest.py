"""A hub made by ``init_hub`` on each database, driven through its management API.

- ``hub``: a new hub per test on the ``db`` fixture (SQLite and PostgreSQL).
- ``shared_hub``: one hub per test module and backend, for tables of
  requests that must change nothing (the security table).

Requests go through httpx's ASGI transport to ``make_api_app(open_hub(...))``,
the app ``skylift hub serve`` runs (without its lifespan: no background
loops). Every answer is checked against the OpenAPI document's schema for
its operation and status, so the document cannot drift from the code.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import jsonschema
import pytest
import sqlalchemy as sa
from securesystemslib.signer import CryptoSigner, Key
from sqlalchemy.orm import Session

from skylift.hub import openapi
from skylift.hub.app import make_api_app
from skylift.hub.auth import issue_secret
from skylift.hub.db import make_engine
from skylift.hub.db.models import (
    ApiToken,
    AuditEntry,
    Base,
    Device,
    DeviceSlot,
    DeviceState,
    DeviceTag,
    EnrollmentMethod,
    Organisation,
    Product,
    Role,
)
from skylift.hub.setup import init_hub, open_hub
from skylift.hub.web import HubContext
from skylift.trust.keys import generate_private_key, signer_for
from skylift.trust.repository import offline_metadata

from ..conftest import MigratedDatabase

ORG = "acme"
ADMIN_EMAIL = "ops@acme.example"
#: Actor name of the token init_hub makes, as the audit log records it.
ADMIN_ACTOR = f"{ADMIN_EMAIL} (hub init)"
BASE = "/api/v1"
#: The name of init_hub's admin token in Hub.tokens, used when a call names none.
ADMIN = "admin"


class Clock:
    """The hub's clock: real time plus an offset tests can move."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


# -- answers against the OpenAPI document ---------------------------------------------------------


@functools.cache
def _document() -> dict[str, Any]:
    return openapi.document()


@functools.cache
def _operations() -> list[tuple[str, re.Pattern[str], dict[str, Any]]]:
    ops = []
    for path, methods in _document()["paths"].items():
        # {file} may hold slashes (a repository file path); other parameters do not.
        pattern = re.sub(r"\{file\}", r".+", path)
        pattern = re.sub(r"\{[^}]+\}", r"[^/]+", pattern)
        for method, op in methods.items():
            ops.append((method.upper(), re.compile(pattern), op))
    return ops


@functools.cache
def _validator(schema_json: str) -> jsonschema.Draft202012Validator:
    doc = _document()
    schema = {**json.loads(schema_json), "components": doc["components"]}
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def check_against_document(method: str, path: str, response: httpx.Response) -> None:
    """Fail unless ``response`` is what the OpenAPI document says ``method path`` answers."""
    path = path.split("?", 1)[0].removeprefix(BASE)
    matches = [op for m, rx, op in _operations() if m == method and rx.fullmatch(path)]
    if not matches:
        # The router's own 404/405 for paths the API does not have.
        assert response.status_code in (404, 405), f"{method} {path} is not in the document"
        assert set(response.json()) == {"error"}
        return
    op = matches[0]
    status = str(response.status_code)
    assert status in op["responses"], f"{method} {path} answered {status}, not documented"
    answer = op["responses"][status]
    if "$ref" in answer:
        answer = _document()["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    content = answer.get("content")
    if content is None:
        assert response.content == b"", f"{method} {path} {status} should have no body"
        return
    media = response.headers["content-type"].split(";")[0]
    assert media in content, f"{method} {path} {status} answered {media}"
    if media == "application/json":
        _validator(json.dumps(content[media]["schema"], sort_keys=True)).validate(response.json())


# -- the hub --------------------------------------------------------------------------------------


@dataclass
class Hub:
    """A hub, its database, an admin token and a client for its management API."""

    ctx: HubContext
    db: MigratedDatabase
    admin_token: str
    clock: Clock
    _portal: Any
    _client: httpx.AsyncClient
    check_answers: bool = True
    tokens: dict[str, str] = field(default_factory=dict)

    # -- requests

    def call(
        self, method: str, path: str, *, token: str | None = ADMIN, **kwargs: Any
    ) -> httpx.Response:
        """``method BASE+path``; ``token`` names a token of :attr:`tokens` (or is one), or None."""
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            value = self.tokens.get(token, token)
            headers.setdefault("Authorization", f"Bearer {value}")
        url = BASE + path
        response: httpx.Response = self._portal.call(
            functools.partial(self._client.request, method, url, headers=headers, **kwargs)
        )
        if self.check_answers:
            check_against_document(method, url, response)
        return response

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.call("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.call("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.call("DELETE", path, **kwargs)

    # -- the database, directly

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.ctx.sessions.begin() as session:
            yield session

    @property
    def org_id(self) -> int:
        with self.session() as s:
            return s.scalars(sa.select(Organisation.id).where(Organisation.name == ORG)).one()

    def add_org(self, name: str) -> int:
        with self.session() as s:
            org = Organisation(name=name)
            s.add(org)
            s.flush()
            return org.id

    def add_token(
        self,
        role: str,
        *,
        org_id: int | None = None,
        name: str | None = None,
        expires: datetime | None = None,
        revoked: bool = False,
    ) -> str:
        """A new API token straight in the database; returns the secret."""
        secret = issue_secret("sk")
        org = org_id or self.org_id  # before the session: SQLite writers do not nest
        with self.session() as s:
            s.add(
                ApiToken(
                    org_id=org,
                    name=name or f"{role}-{secret.prefix}",
                    role=Role(role),
                    token_hash=secret.digest,
                    prefix=secret.prefix,
                    expires=expires,
                    revoked=revoked,
                )
            )
        return secret.value

    def add_product_row(self, name: str, *, org_id: int | None = None) -> int:
        """A product row only (no image repository): enough to own devices."""
        org = org_id or self.org_id
        with self.session() as s:
            product = Product(org_id=org, name=name, release_threshold=1)
            s.add(product)
            s.flush()
            return product.id

    def add_devices(self, specs: list[dict[str, Any]], *, org_id: int | None = None) -> None:
        """Devices straight in the database: ``{"device_id", "product_id", ...}`` each.

        Optional keys: hardware_id, state, last_seen, created, tags, slots, revoked.
        """
        org = org_id or self.org_id
        now = self.clock()
        rows, tags, slots = [], [], []
        with self.session() as s:
            for spec in specs:
                rows.append(
                    {
                        "device_id": spec["device_id"],
                        "org_id": org,
                        "product_id": spec["product_id"],
                        "hardware_id": spec.get("hardware_id", "hw1"),
                        "cert_fingerprint": secrets.token_hex(32),
                        "cert_not_after": now + timedelta(days=3650),
                        "enrolled_via": EnrollmentMethod.PROVISIONING,
                        "state": spec.get("state", DeviceState.IDLE),
                        "last_seen": spec.get("last_seen"),
                        "created": spec.get("created", now),
                        "revoked": spec.get("revoked", False),
                    }
                )
            s.execute(sa.insert(Device), rows)
            found = s.execute(
                sa.select(Device.device_id, Device.id).where(
                    Device.device_id.in_([r["device_id"] for r in rows])
                )
            )
            ids = dict(found.all())
            for spec in specs:
                device = ids[spec["device_id"]]
                tags += [{"device_id": device, "tag": t} for t in spec.get("tags", ())]
                slots += [
                    {"device_id": device, "slot_class": c, "version": v}
                    for c, v in spec.get("slots", {}).items()
                ]
            if tags:
                s.execute(sa.insert(DeviceTag), tags)
            if slots:
                s.execute(sa.insert(DeviceSlot), slots)

    def state(self) -> dict[str, Any]:
        """Every row of every table, and every object-store key: to show nothing changed.

        Except ``api_tokens.last_used``: presenting a valid token is a use of
        it, even when the request is then refused.
        """
        out: dict[str, Any] = {}
        with self.db.engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                columns = [
                    c for c in table.c if (table.name, c.name) != ("api_tokens", "last_used")
                ]
                out[table.name] = sorted(map(repr, conn.execute(sa.select(*columns))))
        out["store"] = sorted(self.ctx.store.iter_keys(""))
        return out

    def audit_count(self) -> int:
        with self.session() as s:
            return s.scalar(sa.select(sa.func.count()).select_from(AuditEntry)) or 0

    # -- products

    def product_metadata(
        self,
        *,
        release_keys: int = 1,
        threshold: int = 1,
        online: dict[str, Key] | None = None,
        now: datetime | None = None,
        expiry: dict[str, timedelta] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], list[CryptoSigner]]:
        """Root and first targets signed offline, as ``skylift product create`` makes them.

        Returns root JSON, targets JSON and the release signers.
        """
        hub_key = self.ctx.online_signers[0].public_key
        keys = {"snapshot": hub_key, "timestamp": hub_key, **(online or {})}
        root_signer = signer_for(generate_private_key())
        releases = [signer_for(generate_private_key()) for _ in range(release_keys)]
        root, targets = offline_metadata(
            keys={
                "root": [root_signer.public_key],
                "targets": [s.public_key for s in releases],
                "snapshot": [keys["snapshot"]],
                "timestamp": [keys["timestamp"]],
            },
            thresholds={"targets": threshold},
            signers=[root_signer, *releases],
            now=now or self.clock(),
            expiry=expiry,
        )
        return json.loads(root), json.loads(targets), releases

    def create_product(self, name: str, **kwargs: Any) -> list[CryptoSigner]:
        """A product through the API; returns its release signers."""
        root, targets, releases = self.product_metadata(**kwargs)
        r = self.post("/products", json={"name": name, "root": root, "targets": targets})
        assert r.status_code == 201, r.text
        return releases


@contextmanager
def _running_hub(directory: Path, db: MigratedDatabase) -> Iterator[Hub]:
    result = init_hub(
        directory, organisation=ORG, admin_email=ADMIN_EMAIL, database_url=db.url,
        gateway_port=8443, api_port=8080,
    )  # fmt: skip
    clock = Clock()
    ctx = open_hub(result.config, clock=clock)
    engine = ctx.sessions.kw["bind"]
    app = make_api_app(ctx)
    try:
        with anyio.from_thread.start_blocking_portal() as portal:
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://hub"
            )
            hub = Hub(ctx, db, result.admin_token, clock, portal, client)
            hub.tokens["admin"] = result.admin_token
            try:
                yield hub
            finally:
                portal.call(client.aclose)
    finally:
        engine.dispose()


@pytest.fixture
def hub(tmp_path: Path, db: MigratedDatabase) -> Iterator[Hub]:
    """A new hub on a new database, per test and backend."""
    with _running_hub(tmp_path / "hub", db) as h:
        yield h


@contextmanager
def _module_database(request: pytest.FixtureRequest, backend: str, tmp: Path) -> Iterator[str]:
    if backend == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        path = tmp / "hub.db"
        path.write_bytes(template.read_bytes())
        yield f"sqlite:///{path}"
        return
    databases = request.getfixturevalue("_postgres_databases")
    url = databases.create(migrated=True)
    try:
        yield url
    finally:
        databases.drop(url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared_hub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hub]:
    """One hub per test module and backend, for tests that change nothing."""
    tmp = tmp_path_factory.mktemp("shared-hub")
    stack: AbstractContextManager[str] = _module_database(request, request.param, tmp)
    with stack as url:
        engine = make_engine(url)
        try:
            db = MigratedDatabase(backend=request.param, url=url, engine=engine)
            with _running_hub(tmp / "hub", db) as h:
                yield h
        finally:
            engine.dispose()
