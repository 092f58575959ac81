"""Who may talk to the gateway: each refusal has the right status and changes nothing.

The enrollment refusals (wrong, revoked, expired, used-up key; taken id;
bad id; malformed, oversized bodies) are the table in ``test_enroll.py``;
malformed and oversized reports are in ``test_reports.py``.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import anyio
import httpx
import pytest
from cryptography import x509
from sqlalchemy import func, select, update

from skylift.hub import ca
from skylift.hub.app import make_api_app
from skylift.hub.auth import issue_secret
from skylift.hub.db.models import ApiToken, Device, EnrollmentMethod, Role, SignerCA

from .conftest import PRODUCT, VERSION, Enrolled, Hub, factory_ca

ROUTES = [
    ("GET", "/poll"),
    ("GET", "/image/metadata/timestamp.json"),
    ("GET", "/director/{me}/metadata/timestamp.json"),
    ("GET", f"/releases/{VERSION}/rootfs.pack"),
    ("POST", "/reports"),
]
REPORT = {"reports": [{"report_id": "should-not-be-stored", "kind": "x", "state": "failed"}]}


def _request(client: httpx.Client, method: str, path: str, device_id: str) -> httpx.Response:
    body = REPORT if method == "POST" else None
    return client.request(method, path.format(me=device_id), json=body)


@contextmanager
def _unchanged(hub: Hub) -> Iterator[None]:
    before = hub.snapshot()
    yield
    assert hub.snapshot() == before


def _hub_issued(
    hub: Hub, device_id: str, *, now: datetime, days: float
) -> tuple[bytes, ca.DevicePrivateKey]:
    """A certificate from the hub's own device CA, not obtained by enrolling."""
    key = ca.generate_device_key()
    cert = ca.issue_device_cert(
        hub.ctx.device_ca_pem, hub.ctx.device_ca_key_pem, ca.make_csr(key, device_id),
        device_id=device_id, now=now, valid_for=timedelta(days=days),
    )  # fmt: skip
    return cert, key


def _register(hub: Hub, device_id: str, cert_pem: bytes) -> None:
    """Put a device row for ``cert_pem`` in the database, as enrollment would."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    with hub.ctx.sessions.begin() as session:
        session.add(
            Device(
                device_id=device_id, org_id=hub.org_id, product_id=hub.product_id,
                hardware_id="hw1", cert_fingerprint=ca.fingerprint(cert),
                cert_not_after=cert.not_valid_after_utc, enrolled_via=EnrollmentMethod.PROVISIONING,
            )
        )  # fmt: skip
    hub.ctx.director.ensure(device_id)


def _handshake_refused(hub: Hub, device: Enrolled) -> None:
    with pytest.raises(httpx.TransportError):
        # TLS 1.3: the client learns of the refusal when it reads the answer.
        hub.client(device).get("/poll")


# -- no certificate, someone else's CA, expired ---------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[p for _, p in ROUTES])
def test_no_client_certificate_is_401(hub: Hub, device: Enrolled, method: str, path: str) -> None:
    with _unchanged(hub):
        answer = _request(hub.client(), method, path, device.device_id)
        assert answer.status_code == 401
        assert "client certificate" in answer.json()["error"]


def test_a_certificate_from_another_ca_fails_the_handshake(hub: Hub) -> None:
    stranger_cert, stranger_key = factory_ca("Stranger CA")
    key = ca.generate_device_key()
    cert = ca.issue_device_cert(
        stranger_cert, stranger_key, ca.make_csr(key, "stranger-1"), device_id="stranger-1",
        now=datetime.now(UTC),
    )  # fmt: skip
    with _unchanged(hub):
        _handshake_refused(hub, hub.write_identity("stranger-1", cert, key))


def test_an_expired_certificate_fails_the_handshake(hub: Hub) -> None:
    cert, key = _hub_issued(hub, "expired-1", now=datetime.now(UTC) - timedelta(days=10), days=1)
    _register(hub, "expired-1", cert)
    with _unchanged(hub):
        _handshake_refused(hub, hub.write_identity("expired-1", cert, key))


def test_a_certificate_that_expires_after_the_handshake_is_refused_by_the_app(hub: Hub) -> None:
    """The TLS layer checked it once (and resumption never would again): the app checks each request."""
    cert, key = _hub_issued(hub, "expiring-1", now=datetime.now(UTC), days=1)
    _register(hub, "expiring-1", cert)
    client = hub.client(hub.write_identity("expiring-1", cert, key))
    assert client.get("/poll").status_code == 200
    real = hub.ctx.clock
    hub.ctx.clock = lambda: real() + timedelta(days=2)
    try:
        with _unchanged(hub):
            answer = client.get("/poll")  # same connection, cached identity
            assert answer.status_code == 403
            assert "expired" in answer.json()["error"]
    finally:
        hub.ctx.clock = real


# -- devices the hub does not know, or no longer trusts -------------------------------------------


def test_a_hub_certificate_naming_an_unknown_device_is_403(hub: Hub) -> None:
    cert, key = _hub_issued(hub, "never-enrolled", now=datetime.now(UTC), days=1)
    with _unchanged(hub):
        answer = hub.client(hub.write_identity("never-enrolled", cert, key)).get("/poll")
        assert answer.status_code == 403
        assert "not registered" in answer.json()["error"]


def test_another_certificate_for_an_enrolled_id_is_403(hub: Hub, device: Enrolled) -> None:
    cert, key = _hub_issued(hub, device.device_id, now=datetime.now(UTC), days=1)
    with _unchanged(hub):
        answer = hub.client(hub.write_identity(device.device_id, cert, key)).get("/poll")
        assert answer.status_code == 403
        assert "not the one registered" in answer.json()["error"]


def test_a_device_revoked_in_the_database_is_refused_within_a_second(hub: Hub) -> None:
    device = hub.enroll()
    client = hub.client(device)
    assert client.get("/poll").status_code == 200  # identity cached, connection kept alive
    with hub.ctx.sessions.begin() as session:
        session.execute(
            update(Device)
            .where(Device.device_id == device.device_id)
            .values(revoked=True, revoked_at=datetime.now(UTC), revoke_reason="stolen")
        )
    revoked_at = time.monotonic()
    while (answer := client.get("/poll")).status_code == 200:
        assert time.monotonic() - revoked_at < 5, "revocation never took effect"
        time.sleep(0.02)
    latency = time.monotonic() - revoked_at
    assert answer.status_code == 403
    assert latency < 2.5, latency  # sync loop: about one second
    before = hub.snapshot()  # the polls answered before the refusal did record last_seen
    for method, path in ROUTES:
        assert _request(client, method, path, device.device_id).status_code == 403
    assert hub.client(device).get("/poll").status_code == 403  # and on a new connection
    assert hub.snapshot() == before


@pytest.mark.parametrize("how", ["revoke", "delete"])
def test_a_device_revoked_through_the_api_is_refused_on_its_very_next_request(
    hub: Hub, how: str
) -> None:
    device = hub.enroll()
    client = hub.client(device)
    assert client.get("/poll").status_code == 200  # identity and poll answer cached
    secret = issue_secret("sk")
    with hub.ctx.sessions.begin() as session:
        session.add(
            ApiToken(
                org_id=hub.org_id, name=f"admin-{secret.prefix}", role=Role.ADMIN,
                token_hash=secret.digest, prefix=secret.prefix,
            )
        )  # fmt: skip
    path = f"/api/v1/devices/{quote(device.device_id, safe='')}"

    async def call_api() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=make_api_app(hub.ctx)),
            base_url="http://hub",
            headers={"Authorization": f"Bearer {secret.value}"},
        ) as api:
            if how == "revoke":
                return await api.post(f"{path}/revoke", json={"reason": "stolen"})
            return await api.delete(path)

    answer = anyio.run(call_api)
    assert answer.status_code == (200 if how == "revoke" else 204), answer.text
    # The same process serves both: no wait for the one-second sync loop.
    refused = client.get("/poll")
    assert refused.status_code == 403, refused.text


def test_a_device_may_not_read_another_devices_director_metadata(
    hub: Hub, device: Enrolled
) -> None:
    other = hub.enroll()
    client = hub.client(device)
    with _unchanged(hub):
        for rel in ("metadata/timestamp.json", "metadata/1.root.json", "metadata/none.json"):
            answer = client.get(f"/director/{other.device_id}/{rel}")
            assert answer.status_code == 403
            assert device.device_id in answer.json()["error"]


# -- signer CAs: devices certified on the factory line --------------------------------------------


def _signer_ca(hub: Hub, name: str, *, product_id: int | None) -> tuple[bytes, bytes, int]:
    cert, key = factory_ca(f"{name} factory CA")
    with hub.ctx.sessions.begin() as session:
        row = SignerCA(
            org_id=hub.org_id, product_id=product_id, name=name, cert_pem=cert.decode(),
            fingerprint=ca.ca_info(cert)["fingerprint"],
        )  # fmt: skip
        session.add(row)
        session.flush()
        signer_id = row.id
    hub.state.sync()  # what the sync loop does within a second; also loads it into TLS
    return cert, key, signer_id


def _factory_device(hub: Hub, signer: tuple[bytes, bytes, int], device_id: str) -> Enrolled:
    key = ca.generate_device_key()
    cert = ca.issue_device_cert(
        signer[0],
        signer[1],
        ca.make_csr(key, device_id),
        device_id=device_id,
        now=datetime.now(UTC),
    )
    return hub.write_identity(device_id, cert, key)


def test_a_factory_device_registers_on_first_connection(hub: Hub) -> None:
    signer = _signer_ca(hub, "line-1", product_id=hub.product_id)
    device = _factory_device(hub, signer, "factory-1")
    client = hub.client(device, headers={"X-Skylift-Hardware": "hw-rev-b"})
    answer = client.get("/poll")
    assert answer.status_code == 200, answer.text
    row = hub.device_row("factory-1")
    assert (row.enrolled_via, row.hardware_id, row.product_id) == (
        EnrollmentMethod.SIGNER_CA, "hw-rev-b", hub.product_id,
    )  # fmt: skip
    assert hub.ctx.director.has_device("factory-1")
    assert client.get("/image/metadata/1.root.json").content == hub.image_root
    # the signer CA is revoked: its devices are refused on their next request
    with hub.ctx.sessions.begin() as session:
        session.execute(update(SignerCA).where(SignerCA.id == signer[2]).values(revoked=True))
    hub.state.sync()
    with _unchanged(hub):
        refused = client.get("/poll")
        assert refused.status_code == 403
        assert "not a trusted CA" in refused.json()["error"]


def test_factory_devices_that_cannot_be_registered_are_403(hub: Hub, device: Enrolled) -> None:
    anywhere = _signer_ca(hub, "line-any", product_id=None)
    with hub.ctx.sessions() as session:
        devices = session.scalar(select(func.count()).select_from(Device))
    # A CA for every product of the organisation: the device must say which.
    unnamed = hub.client(_factory_device(hub, anywhere, "factory-unnamed")).get("/poll")
    assert unnamed.status_code == 403
    assert "X-Skylift-Product" in unnamed.json()["error"]
    # The id of a device enrolled with a provisioning key: not this certificate's.
    taken = hub.client(
        _factory_device(hub, anywhere, device.device_id), headers={"X-Skylift-Product": PRODUCT}
    )
    assert taken.get("/poll").status_code == 403
    with hub.ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Device)) == devices
    named = hub.client(
        _factory_device(hub, anywhere, "factory-named"), headers={"X-Skylift-Product": PRODUCT}
    )
    assert named.get("/poll").status_code == 200
    assert hub.device_row("factory-named").hardware_id == "unknown"


# -- behind a TLS-terminating proxy ---------------------------------------------------------------


def test_behind_a_trusted_proxy_only_the_forwarded_certificate_counts(
    hub: Hub, device: Enrolled
) -> None:
    undo = hub.set_config(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    try:
        forwarded = {"X-Client-Cert": quote(device.cert.read_text())}
        assert hub.client().get("/poll", headers=forwarded).status_code == 200
        with _unchanged(hub):
            # the proxy saw no certificate: its own TLS certificate is not the device's
            assert hub.client(device).get("/poll").status_code == 401
            assert hub.client().get("/poll", headers={"X-Client-Cert": ""}).status_code == 401
            garbage = hub.client().get("/poll", headers={"X-Client-Cert": "not-a-pem"})
            assert garbage.status_code == 400
    finally:
        undo()
    # from anyone not a trusted proxy the header is ignored
    assert hub.client().get("/poll", headers=forwarded).status_code == 401
