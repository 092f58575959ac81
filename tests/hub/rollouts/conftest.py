"""A hub on each database with a product, real bundles pushed the way the CLI pushes them.

- ``hub``: a new hub per test (``init_hub`` on the ``db`` fixture: SQLite and
  PostgreSQL), driven through ``make_api_app(open_hub(...))`` with
  Starlette's TestClient, without the app's lifespan: no background loop
  runs unless a test starts one, and tests call ``rollouts.tick`` themselves
  with the hub's movable clock.
- ``released``: that hub with product ``gw`` and its release ``1.0.0``.
- ``module_hub``: one such hub per module and backend, for tables of
  refusals (each must change nothing, so one hub serves them all).
- Bundles are built by the real writer (module-scoped, signed by
  :data:`RELEASE`), exploded into head, index pages and stored chunks, and
  pushed: ``chunks/missing``, ``PUT chunks/{digest}``, targets signed
  offline with ``sign_next_targets``, ``POST products/{name}/releases``.

Every answer is checked against the OpenAPI document
(``tests/hub/api/conftest.py``'s ``check_against_document``).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
import sqlalchemy as sa
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from skylift.bundle import (
    ChunkData,
    IndexPageData,
    PayloadSource,
    TrustedKeys,
    read_body,
    read_head,
    write_bundle,
)
from skylift.chunks import ChunkingParams
from skylift.hub.app import make_api_app
from skylift.hub.auth import issue_secret
from skylift.hub.db.models import (
    ApiToken,
    AuditEntry,
    Deployment,
    DeploymentDevice,
    Device,
    DeviceSlot,
    DeviceTag,
    EnrollmentMethod,
    Organisation,
    Product,
    Release,
    Role,
    RolloutStatus,
)
from skylift.hub.setup import init_hub, open_hub
from skylift.hub.web import HubContext
from skylift.trust.keys import generate_private_key, signer_for
from skylift.trust.repository import offline_metadata, sign_next_targets

from ..api.conftest import check_against_document
from ..conftest import BACKENDS, MigratedDatabase

sys.path.insert(0, str(Path(__file__).parents[2]))
from bundle.conftest import realistic_payload  # image-like content, shared

BASE = "/api/v1"
ORG = "acme"
PRODUCT = "gw"
#: The product's offline keys: the same for every test, so bundles are built once.
ROOT = signer_for(generate_private_key())
RELEASE = signer_for(generate_private_key())
STRANGER = signer_for(generate_private_key())
CREATED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


class Clock:
    """Real time plus an offset that tests move forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


# -- bundles --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exploded:
    """What ``skylift release push`` sends of one bundle."""

    version: str
    head: bytes
    indexes: dict[str, bytes]
    chunks: dict[str, tuple[int, bytes]]  # digest -> (codec, stored)
    custom: dict[str, Any]


_CDC_16K = ChunkingParams.cdc(16384)


def make_bundle(
    version: str,
    image: bytes,
    *,
    signers: list[CryptoSigner] | None = None,
    product: str = PRODUCT,
    chunking: ChunkingParams | None = _CDC_16K,
) -> Exploded:
    """A real bundle with a ``rootfs`` payload, exploded (``chunking`` None: the writer's default)."""
    out = io.BytesIO()
    with tempfile.TemporaryFile() as spool:
        write_bundle(
            out,
            product=product,
            version=version,
            compatible=("hw1",),
            payloads=[PayloadSource("rootfs", io.BytesIO(image), chunking=chunking)],
            hooks=[],
            signers=signers or [RELEASE],
            spool=spool,
            created=CREATED,
        )
    bundle = out.getvalue()
    stream = io.BytesIO(bundle)
    head = read_head(stream)
    head.verify(TrustedKeys(tuple(s.public_key for s in signers or [RELEASE])))
    indexes: dict[str, bytearray] = {}
    chunks: dict[str, tuple[int, bytes]] = {}
    for ev in read_body(stream, head):
        if isinstance(ev, IndexPageData):
            indexes.setdefault(ev.payload.name, bytearray()).extend(ev.page)
        elif isinstance(ev, ChunkData):
            chunks[ev.entry.hexdigest] = (ev.entry.codec, ev.stored)
    m = head.manifest
    custom = {
        "product": m.product,
        "version": m.version,
        "hardware_ids": list(m.compatible),
        "payloads": {
            p.name: {"size": p.size, "sha256": p.sha256, "slot_class": p.slot_class}
            for p in m.payloads
        },
    }
    return Exploded(
        version, bundle[: head.length], {k: bytes(v) for k, v in indexes.items()}, chunks, custom
    )


IMAGE = realistic_payload(300_000, seed=5)


@pytest.fixture(scope="session")
def v1() -> Exploded:
    return make_bundle("1.0.0", IMAGE)


@pytest.fixture(scope="session")
def v2() -> Exploded:
    return make_bundle("1.1.0", IMAGE[:150_000] + b"a small change" + IMAGE[150_000:])


# -- the hub --------------------------------------------------------------------------------------


@dataclass
class Hub:
    """A hub, a client for its management API, tokens by name, its database."""

    ctx: HubContext
    client: httpx.AsyncClient
    portal: Any
    clock: Clock
    tokens: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, path: str, *, who: str = "admin", **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if who:
            headers.setdefault("Authorization", f"Bearer {self.tokens.get(who, who)}")
        request = functools.partial(self.client.request, method, BASE + path, headers=headers, **kw)
        response: httpx.Response = self.portal.call(request)
        check_against_document(method, BASE + path, response)
        return response

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.call("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.call("POST", path, **kw)

    def session(self) -> Any:
        return self.ctx.sessions.begin()

    # -- organisations, tokens, devices straight in the database

    def org_id(self, name: str = ORG) -> int:
        with self.session() as s:
            return int(s.scalars(sa.select(Organisation.id).where(Organisation.name == name)).one())

    def add_org(self, name: str) -> int:
        with self.session() as s:
            org = Organisation(name=name)
            s.add(org)
            s.flush()
            return org.id

    def add_token(self, role: str, *, org_id: int | None = None) -> str:
        secret = issue_secret("sk")
        with self.session() as s:
            s.add(
                ApiToken(
                    org_id=org_id or self.org_id(),
                    name=f"{role}-{secret.prefix}",
                    role=Role(role),
                    token_hash=secret.digest,
                    prefix=secret.prefix,
                )
            )
        return secret.value

    def product_id(self, name: str = PRODUCT) -> int:
        with self.session() as s:
            return int(s.scalars(sa.select(Product.id).where(Product.name == name)).one())

    def add_devices(
        self,
        ids: list[str],
        *,
        product: str = PRODUCT,
        tags: dict[str, list[str]] | None = None,
        slots: dict[str, dict[str, str]] | None = None,
        hardware: str = "hw1",
        revoked: tuple[str, ...] = (),
        org_id: int | None = None,
    ) -> None:
        product_id = self.product_id(product)
        with self.session() as s:
            for device_id in ids:
                device = Device(
                    device_id=device_id,
                    org_id=org_id or self.org_id(),
                    product_id=product_id,
                    hardware_id=hardware,
                    cert_fingerprint=secrets.token_hex(32),
                    cert_not_after=self.clock() + timedelta(days=3650),
                    enrolled_via=EnrollmentMethod.PROVISIONING,
                    revoked=device_id in revoked,
                )
                device.tags = [DeviceTag(tag=t) for t in (tags or {}).get(device_id, [])]
                device.slots = [
                    DeviceSlot(slot_class=c, version=v)
                    for c, v in (slots or {}).get(device_id, {}).items()
                ]
                s.add(device)

    def report(
        self,
        deployment: int,
        device_ids: list[str],
        status: RolloutStatus,
        reason: str | None = None,
    ) -> None:
        """What the gateway's report handler does with device reports."""
        with self.session() as s:
            pks = s.scalars(sa.select(Device.id).where(Device.device_id.in_(device_ids))).all()
            assert len(pks) == len(device_ids)
            s.execute(
                sa.update(DeploymentDevice)
                .where(
                    DeploymentDevice.deployment_id == deployment,
                    DeploymentDevice.device_id.in_(pks),
                )
                .values(status=status, reason=reason)
            )

    def phase_of(self, deployment: int) -> dict[str, int]:
        """device id -> phase, for one deployment."""
        with self.session() as s:
            rows = s.execute(
                sa.select(Device.device_id, DeploymentDevice.phase)
                .join(Device, Device.id == DeploymentDevice.device_id)
                .where(DeploymentDevice.deployment_id == deployment)
            )
            return dict(rows.all())

    def assigned(self, device_id: str) -> str | None:
        """The director target path the device is told to install, if any."""
        target = self.ctx.director.assigned(device_id)
        return None if target is None else target.path

    def audit(self, action: str) -> list[AuditEntry]:
        with self.session() as s:
            rows = s.scalars(
                sa.select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id)
            ).all()
            s.expunge_all()
            return list(rows)

    def deployment_row(self, deployment: int) -> Deployment:
        with self.session() as s:
            row = s.get(Deployment, deployment)
            assert row is not None
            s.expunge(row)
            return row

    # -- products and releases, as the CLI does them

    def create_product(self, name: str = PRODUCT, *, who: str = "admin") -> httpx.Response:
        online = self.ctx.online_signers[0].public_key
        root, targets = offline_metadata(
            keys={
                "root": [ROOT.public_key],
                "targets": [RELEASE.public_key],
                "snapshot": [online],
                "timestamp": [online],
            },
            thresholds=None,
            signers=[ROOT, RELEASE],
            now=self.clock(),
        )
        return self.post(
            "/products",
            who=who,
            json={"name": name, "root": json.loads(root), "targets": json.loads(targets)},
        )

    def upload(self, bundle: Exploded, *, product: str = PRODUCT) -> int:
        """Upload the chunks the hub lacks; how many."""
        r = self.post("/chunks/missing", json={"digests": sorted(bundle.chunks)})
        assert r.status_code == 200, r.text
        missing = r.json()["missing"]
        for digest in missing:
            codec, stored = bundle.chunks[digest]
            put = self.call(
                "PUT",
                f"/chunks/{digest}",
                content=stored,
                headers={
                    "Content-Type": "application/octet-stream",
                    "X-Skylift-Codec": str(codec),
                },
            )
            assert put.status_code == 201, put.text
        return len(missing)

    def targets_version(self, product: str = PRODUCT) -> int:
        return self.ctx.images.load(product).versions["targets"]

    def next_targets(
        self,
        bundle: Exploded,
        *,
        product: str = PRODUCT,
        signers: list[CryptoSigner] | None = None,
        path: str | None = None,
        content: bytes | None = None,
        custom: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The next targets, signed offline (what ``release push`` signs)."""
        current = self.ctx.images.read(
            product, f"metadata/{self.targets_version(product)}.targets.json"
        )
        root = self.ctx.images.read(product, "metadata/root.json")
        data = sign_next_targets(
            current,
            path=path or f"{bundle.version}.head",
            content=bundle.head if content is None else content,
            custom=bundle.custom if custom is None else custom,
            signers=signers or [RELEASE],
            root=root,
            now=self.clock(),
        )
        return dict(json.loads(data))

    def forged_targets(self, bundle: Exploded, signer: CryptoSigner) -> dict[str, Any]:
        """The next targets as they should be, but signed by ``signer`` alone."""
        md = Metadata.from_dict(self.next_targets(bundle))
        md.signatures.clear()
        md.sign(signer)
        return md.to_dict()

    def release_body(self, bundle: Exploded, **targets: Any) -> dict[str, Any]:
        return {
            "targets": self.next_targets(bundle, **targets),
            "head": base64.b64encode(bundle.head).decode(),
            "indexes": {n: base64.b64encode(d).decode() for n, d in bundle.indexes.items()},
        }

    def push(self, bundle: Exploded, *, product: str = PRODUCT) -> httpx.Response:
        self.upload(bundle, product=product)
        return self.post(f"/products/{product}/releases", json=self.release_body(bundle))

    # -- deployments

    def deploy(self, who: str = "admin", **overrides: Any) -> httpx.Response:
        body: dict[str, Any] = {
            "name": "rollout-1",
            "product": PRODUCT,
            "version": "1.0.0",
            "selector": {},
            "phases": [{"percent": 50}, {"percent": 100}],
            "failure_gate_percent": 10,
            "min_soak_s": 600,
        }
        body.update(overrides)
        return self.post("/deployments", json=body, who=who)

    def releases(self) -> list[Release]:
        with self.session() as s:
            rows = s.scalars(sa.select(Release).order_by(Release.id)).all()
            s.expunge_all()
            return list(rows)


@contextmanager
def _running_hub(directory: Path, database_url: str) -> Iterator[Hub]:
    result = init_hub(
        directory, organisation=ORG, admin_email="ops@acme.example", database_url=database_url
    )
    clock = Clock()
    ctx = open_hub(result.config, clock=clock)
    engine: sa.Engine = ctx.sessions.kw["bind"]
    app = make_api_app(ctx)
    try:
        with anyio.from_thread.start_blocking_portal() as portal:
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://hub"
            )
            h = Hub(ctx, client, portal, clock, {"admin": result.admin_token})
            h.tokens["viewer"] = h.add_token("viewer")
            h.tokens["operator"] = h.add_token("operator")
            try:
                yield h
            finally:
                portal.call(client.aclose)
    finally:
        engine.dispose()


@pytest.fixture
def hub(tmp_path: Path, db: MigratedDatabase) -> Iterator[Hub]:
    """A new hub per test, with viewer and operator tokens besides the admin's."""
    with _running_hub(tmp_path / "hub", db.url) as h:
        yield h


@pytest.fixture(scope="module", params=BACKENDS)
def module_hub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, v1: Exploded
) -> Iterator[Hub]:
    """One hub per test module and backend, with product ``gw`` and release 1.0.0.

    For tables of requests that must change nothing.
    """
    tmp = tmp_path_factory.mktemp("rollouts")
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
            assert h.create_product().status_code == 201
            assert h.push(v1).status_code == 201
            yield h
    finally:
        if drop is not None:
            drop(url)


@pytest.fixture
def released(hub: Hub, v1: Exploded) -> Hub:
    """The hub with product ``gw`` and its release 1.0.0."""
    assert hub.create_product().status_code == 201
    r = hub.push(v1)
    assert r.status_code == 201, r.text
    return hub


def counts(status: dict[str, Any]) -> list[dict[str, int]]:
    """Per phase ``counts`` of a deployment status answer."""
    return [p["counts"] for p in status["phases"]]
