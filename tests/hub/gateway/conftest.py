"""A real hub's device gateway over real mutual TLS on 127.0.0.1, on SQLite and PostgreSQL.

- ``hub`` (package scope, once per database backend): ``init_hub`` on a
  migrated database of its own, a product ``acme-gw`` with an image
  repository (offline root and release key) holding release 1.0.0 (head,
  index, offsets, pack), a second product ``other-gw`` with release 9.9.9,
  and the gateway app (with its background loops) served by uvicorn over TLS
  with the hub's own server certificate, as ``skylift hub serve`` does.
- :class:`Hub` enrolls devices through the real endpoint and hands out
  httpx clients that present their certificates.

OpenSSL checks certificate validity against the real clock, so the hub
runs on it too. The last-seen flush interval is an hour unless a test
changes it: tests flush by hand and count what is written.
"""

from __future__ import annotations

import secrets
import shutil
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import urllib3
from securesystemslib.signer import CryptoSigner
from sqlalchemy import Engine, select
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.fetcher import FetcherInterface

from skylift.hub import ca
from skylift.hub.app import make_gateway_app
from skylift.hub.auth import issue_secret
from skylift.hub.content import version_segment
from skylift.hub.db.models import (
    DeploymentDevice,
    Device,
    DeviceEvent,
    DeviceSlot,
    Organisation,
    Product,
    ProvisioningKey,
    Release,
    SignerCA,
)
from skylift.hub.gateway.state import GatewayState, state_for
from skylift.hub.server import gateway_ssl_context
from skylift.hub.setup import init_hub, open_hub
from skylift.hub.tls import ServerThread, client_context, make_server
from skylift.hub.web import HubContext
from skylift.trust.keys import generate_private_key, signer_for
from skylift.trust.repository import offline_metadata, sign_next_targets

from ..conftest import BACKENDS

TIMEOUT_S = 5.0
PRODUCT = "acme-gw"
OTHER_PRODUCT = "other-gw"
VERSION = "1.0.0"
PACK_BYTES = 300_000


@dataclass(frozen=True)
class Enrolled:
    """A device that enrolled: its id, key and certificate files, and the hub's answer."""

    device_id: str
    cert: Path
    key: Path
    answer: dict[str, Any]


class MTLSFetcher(FetcherInterface):
    """python-tuf's fetcher port over urllib3 with a client certificate (as an agent would)."""

    def __init__(self, context: ssl.SSLContext, *, timeout_s: float = TIMEOUT_S) -> None:
        self._pool = urllib3.PoolManager(
            ssl_context=context, retries=False, timeout=urllib3.Timeout(timeout_s)
        )
        self.urls: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        response = self._pool.request("GET", url, preload_content=False)
        if response.status >= 400:
            response.drain_conn()
            response.release_conn()
            raise tuf_exceptions.DownloadHTTPError(f"HTTP {response.status}", response.status)
        return self._chunks(response)

    @staticmethod
    def _chunks(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from response.stream(64 * 1024)
        finally:
            response.release_conn()

    def close(self) -> None:
        self._pool.clear()


@dataclass
class Hub:
    """The running gateway and what tests need around it."""

    ctx: HubContext
    state: GatewayState
    thread: ServerThread
    tmp: Path
    org_id: int
    product_id: int
    other_product_id: int
    head: bytes
    pack: bytes
    release_signer: CryptoSigner
    image_root: bytes
    _clients: list[httpx.Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.thread.port}/device/v1"

    @property
    def ca_pem(self) -> bytes:
        return self.ctx.device_ca_pem

    @property
    def engine(self) -> Engine:
        engine = self.ctx.sessions.kw["bind"]
        assert isinstance(engine, Engine)
        return engine

    def tls(self, device: Enrolled | None = None) -> ssl.SSLContext:
        if device is None:
            return client_context(self.ca_pem)
        return client_context(self.ca_pem, device.cert, device.key)

    def client(self, device: Enrolled | None = None, **kwargs: Any) -> httpx.Client:
        """An HTTP/1.1 keep-alive client presenting ``device``'s certificate (none if None)."""
        client = httpx.Client(
            base_url=self.url, verify=self.tls(device), timeout=TIMEOUT_S, **kwargs
        )
        self._clients.append(client)
        return client

    def provisioning_key(
        self,
        *,
        product_id: int | None = None,
        max_uses: int | None = None,
        expires: datetime | None = None,
        revoked: bool = False,
    ) -> str:
        secret = issue_secret("pk")
        with self.ctx.sessions.begin() as session:
            session.add(
                ProvisioningKey(
                    org_id=self.org_id,
                    product_id=product_id or self.product_id,
                    name=f"key-{secret.prefix}",
                    key_hash=secret.digest,
                    prefix=secret.prefix,
                    max_uses=max_uses,
                    expires=expires,
                    revoked=revoked,
                )
            )
        return secret.value

    def enroll_body(
        self, device_id: str, key: ca.DevicePrivateKey, provisioning_key: str
    ) -> dict[str, Any]:
        return {
            "device_id": device_id,
            "product": PRODUCT,
            "hardware_id": "hw1",
            "csr": ca.make_csr(key, device_id).decode(),
            "provisioning_key": provisioning_key,
        }

    def enroll(self, device_id: str | None = None, provisioning_key: str | None = None) -> Enrolled:
        """Enroll a new device through ``POST /enroll``; its files are written for TLS."""
        device_id = device_id or f"dev-{secrets.token_hex(4)}"
        key = ca.generate_device_key()
        body = self.enroll_body(device_id, key, provisioning_key or self.provisioning_key())
        answer = self.client().post("/enroll", json=body)
        assert answer.status_code == 201, answer.text
        doc = answer.json()
        return self.write_identity(device_id, doc["certificate"].encode(), key, doc)

    def write_identity(
        self,
        device_id: str,
        cert_pem: bytes,
        key: ca.DevicePrivateKey,
        answer: dict[str, Any] | None = None,
    ) -> Enrolled:
        base = self.tmp / "devices" / f"{device_id}-{secrets.token_hex(2)}"
        base.mkdir(parents=True)
        (base / "cert.pem").write_bytes(cert_pem)
        (base / "key.pem").write_bytes(ca.private_key_pem(key))
        (base / "key.pem").chmod(0o600)
        return Enrolled(device_id, base / "cert.pem", base / "key.pem", answer or {})

    def device_row(self, device_id: str) -> Device:
        with self.ctx.sessions() as session:
            row = session.scalars(select(Device).where(Device.device_id == device_id)).one()
            session.expunge(row)
            return row

    def snapshot(self) -> dict[str, list[str]]:
        """What a refused request must not change: device-side tables and the key counters."""
        self.state.flush_last_seen()
        tables = (Device, DeviceEvent, DeviceSlot, DeploymentDevice, ProvisioningKey, SignerCA)
        with self.ctx.sessions() as session:
            return {
                model.__tablename__: sorted(
                    repr(tuple(row)) for row in session.execute(select(model.__table__)).all()
                )
                for model in tables
            }

    def set_config(self, **changes: Any) -> Callable[[], None]:
        """Change the hub's configuration at run time; returns the undo."""
        before = self.ctx.config
        self.ctx.config = replace(before, **changes)

        def undo() -> None:
            self.ctx.config = before

        return undo

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()


def _release(
    ctx: HubContext,
    *,
    product: str,
    product_id: int,
    version: str,
    root: bytes,
    signer: CryptoSigner,
    head: bytes,
    pack: bytes,
) -> None:
    """Publish ``version`` of ``product`` as ``release push`` leaves it: target, content, row."""
    now = datetime.now(UTC)
    current_version = ctx.images.load(product).versions["targets"]
    current = ctx.images.read(product, f"metadata/{current_version}.targets.json")
    custom = {"product": product, "version": version, "hardware_ids": ["hw1"]}
    targets = sign_next_targets(
        current, path=f"{version}.head", content=head, custom=custom,
        signers=[signer], root=root, now=now,
    )  # fmt: skip
    target = ctx.images.add_release(product, targets=targets, head=head)
    prefix = f"releases/{product}/{version_segment(version)}/"
    ctx.store.put(prefix + "head", head)
    ctx.store.put(prefix + "rootfs.pack", pack)
    ctx.store.put(prefix + "rootfs.offsets", (0).to_bytes(8, "big") + len(pack).to_bytes(8, "big"))
    ctx.store.put(prefix + "rootfs.index", b"index pages of " + version.encode())
    with ctx.sessions.begin() as session:
        session.add(
            Release(
                product_id=product_id,
                version=version,
                target_path=target.path,
                length=target.length,
                hashes=target.hashes,
                custom=target.custom,
                manifest_digest="0" * 64,
                payload_size=len(pack),
                stored_size=len(pack),
                created_by="test",
            )
        )


def _product(ctx: HubContext, org_id: int, name: str) -> tuple[int, bytes, CryptoSigner]:
    root_key, release = signer_for(generate_private_key()), signer_for(generate_private_key())
    online = ctx.online_signers[0].public_key
    root, targets = offline_metadata(
        keys={"root": [root_key.public_key], "targets": [release.public_key],
              "snapshot": [online], "timestamp": [online]},
        thresholds=None, signers=[root_key, release], now=datetime.now(UTC),
    )  # fmt: skip
    ctx.images.create(name, root=root, targets=targets)
    with ctx.sessions.begin() as session:
        product = Product(org_id=org_id, name=name)
        session.add(product)
        session.flush()
        return product.id, root, release


@pytest.fixture(scope="package", params=BACKENDS)
def hub_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated, empty database for the package's hub, on each backend."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        path = tmp_path_factory.mktemp("gateway-db") / "hub.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    databases = request.getfixturevalue("_postgres_databases")
    url: str = databases.create(migrated=True)
    try:
        yield url
    finally:
        databases.drop(url)


@pytest.fixture(scope="package")
def hub(hub_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("gateway")
    # The CA starts a month ago, so tests can have it issue certificates that expired already.
    result = init_hub(
        tmp / "hub", organisation="acme", admin_email="ops@acme.example",
        database_url=hub_database, gateway_port=0, api_port=0,
        now=datetime.now(UTC) - timedelta(days=30),
    )  # fmt: skip
    ctx = open_hub(replace(result.config, last_seen_flush_s=3600.0))
    with ctx.sessions() as session:
        org_id = session.scalars(select(Organisation.id)).one()
    product_id, root, release = _product(ctx, org_id, PRODUCT)
    other_id, other_root, other_release = _product(ctx, org_id, OTHER_PRODUCT)
    head = b"bundle head of acme-gw 1.0.0 " * 40
    pack = secrets.token_bytes(PACK_BYTES)
    _release(ctx, product=PRODUCT, product_id=product_id, version=VERSION,
             root=root, signer=release, head=head, pack=pack)  # fmt: skip
    _release(ctx, product=OTHER_PRODUCT, product_id=other_id, version="9.9.9",
             root=other_root, signer=other_release, head=b"other head", pack=b"other pack")  # fmt: skip
    server = make_server(
        make_gateway_app(ctx), host="127.0.0.1", port=0, ssl_context=gateway_ssl_context(ctx)
    )
    with ServerThread(server, startup_timeout_s=10, shutdown_timeout_s=5) as thread:
        hub = Hub(
            ctx=ctx, state=state_for(ctx), thread=thread, tmp=tmp, org_id=org_id,
            product_id=product_id, other_product_id=other_id, head=head, pack=pack,
            release_signer=release, image_root=root,
        )  # fmt: skip
        try:
            yield hub
        finally:
            hub.close_clients()
    ctx.sessions.kw["bind"].dispose()


@pytest.fixture(scope="package")
def device(hub: Hub) -> Enrolled:
    """One enrolled device shared by tests that only read."""
    return hub.enroll()


def factory_ca(common_name: str) -> tuple[bytes, bytes]:
    """An operator's own CA (a factory line's), valid from a year ago."""
    return ca.create_ca(common_name, now=datetime.now(UTC) - timedelta(days=365))
