"""``POST /device/v1/enroll``: a provisioning key and a CSR for a certificate, refused cleanly."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import select, update
from tuf.api.metadata import Metadata, Root

from skylift.hub import ca
from skylift.hub.auth import hash_secret
from skylift.hub.db.models import Device, EnrollmentMethod, ProvisioningKey

from .conftest import PRODUCT, Hub


def test_enroll_then_use_the_certificate(hub: Hub) -> None:
    key = hub.provisioning_key(max_uses=2)
    device = hub.enroll("enroll-happy-1", provisioning_key=key)
    answer = device.answer
    assert set(answer) == {"certificate", "ca", "director_root", "image_root", "poll_interval_s"}
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert ca.device_id_of(cert) == "enroll-happy-1"
    assert answer["ca"].encode() == hub.ca_pem
    assert answer["poll_interval_s"] == hub.ctx.config.poll_interval_s
    # the roots a device pins: the director's and its product's image repository's version 1
    director_root = Metadata[Root].from_bytes(json.dumps(answer["director_root"]).encode())
    assert director_root.signed.version == 1
    assert answer["image_root"] == json.loads(hub.image_root)
    row = hub.device_row("enroll-happy-1")
    assert row.enrolled_via is EnrollmentMethod.PROVISIONING
    assert row.cert_fingerprint == ca.fingerprint(cert)
    assert row.hardware_id == "hw1"
    assert hub.ctx.director.has_device("enroll-happy-1")
    with hub.ctx.sessions() as session:
        uses = session.scalar(
            select(ProvisioningKey.uses).where(ProvisioningKey.key_hash == hash_secret(key))
        )
    assert uses == 1
    # the certificate works at once, for every route
    client = hub.client(device)
    assert client.get("/poll").status_code == 200
    assert client.get("/image/metadata/timestamp.json").status_code == 200
    assert client.get("/director/enroll-happy-1/metadata/timestamp.json").status_code == 200


def test_a_key_enrolls_at_most_max_uses_devices(hub: Hub) -> None:
    key = hub.provisioning_key(max_uses=1)
    hub.enroll("max-uses-1", provisioning_key=key)
    before = hub.snapshot()
    body = hub.enroll_body("max-uses-2", ca.generate_device_key(), key)
    answer = hub.client().post("/enroll", json=body)
    assert answer.status_code == 401
    assert "used up" in answer.json()["error"]
    assert hub.snapshot() == before
    assert not hub.ctx.director.has_device("max-uses-2")


def _revoked_device(hub: Hub) -> str:
    device = hub.enroll()
    with hub.ctx.sessions.begin() as session:
        session.execute(
            update(Device)
            .where(Device.device_id == device.device_id)
            .values(revoked=True, revoked_at=datetime.now(UTC), revoke_reason="stolen")
        )
    return device.device_id


def _deleted_device(hub: Hub) -> str:
    # Whatever the API does on delete, the director repository stays: the id is spent.
    device = hub.enroll()
    with hub.ctx.sessions.begin() as session:
        session.delete(
            session.scalars(select(Device).where(Device.device_id == device.device_id)).one()
        )
    return device.device_id


Case = Callable[[Hub, dict[str, Any]], bytes | None]
"""Changes the good body in place, or returns raw bytes to send instead."""


def _set(**fields: Any) -> Case:
    def case(hub: Hub, body: dict[str, Any]) -> None:
        body.update(fields)

    return case


def _key(**kwargs: Any) -> Case:
    def case(hub: Hub, body: dict[str, Any]) -> None:
        if kwargs.pop("other_product", False):
            kwargs["product_id"] = hub.other_product_id
        body["provisioning_key"] = hub.provisioning_key(**kwargs)

    return case


def _device_id(make: Callable[[Hub], str]) -> Case:
    def case(hub: Hub, body: dict[str, Any]) -> None:
        body["device_id"] = make(hub)

    return case


def _drop(name: str) -> Case:
    def case(hub: Hub, body: dict[str, Any]) -> None:
        del body[name]

    return case


def _raw(data: bytes) -> Case:
    return lambda hub, body: data


def _bad_csr(hub: Hub, body: dict[str, Any]) -> None:
    body["csr"] = _tampered_csr()


EXPIRED = datetime.now(UTC) - timedelta(seconds=1)
REFUSALS: list[tuple[str, Case, int, str]] = [
    ("wrong key", _set(provisioning_key="pk_abcdefgh_" + "A" * 43), 401, "unknown"),
    ("malformed key", _set(provisioning_key="sk_nope"), 401, "malformed"),
    ("revoked key", _key(revoked=True), 401, "revoked"),
    ("expired key", _key(expires=EXPIRED), 401, "expired"),
    ("other product's key", _key(other_product=True), 403, "does not enroll"),
    ("unknown product", _set(product="no-such-product"), 403, "does not enroll"),
    ("existing id", _device_id(lambda h: h.enroll().device_id), 409, "taken"),
    ("revoked id", _device_id(_revoked_device), 409, "taken"),
    ("deleted id", _device_id(_deleted_device), 409, "taken"),
    ("bad device id", _set(device_id="../etc"), 400, "invalid device id"),
    ("device id with ':'", _set(device_id="a:b"), 400, "use 1-128 characters"),
    ("device id not a string", _set(device_id=7), 400, "device_id"),
    ("bad hardware id", _set(hardware_id="hw 1"), 400, "hardware_id"),
    ("product in capitals", _set(product=PRODUCT.upper()), 400, "product"),
    ("unknown field", _set(admin=True), 400, "unknown field"),
    ("missing field", _drop("csr"), 400, "csr"),
    ("CSR not a CSR", _set(csr="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"), 400, "CSR"),
    ("CSR altered", _bad_csr, 400, "CSR"),
    ("malformed JSON", _raw(b'{"device_id": '), 400, "not valid JSON"),
    ("not an object", _raw(b"[1, 2]"), 400, "JSON object"),
    ("oversized body", _raw(b'{"pad": "' + b"x" * 70_000 + b'"}'), 413, "limit"),
]


def _tampered_csr() -> str:
    pem = ca.make_csr(ca.generate_device_key(), "tampered").decode()
    lines = pem.splitlines()
    middle = len(lines) // 2
    line = lines[middle]
    lines[middle] = line[:10] + ("A" if line[10] != "A" else "B") + line[11:]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("make", "status", "message"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
def test_refused_enrollments_change_nothing(
    hub: Hub, make: Case, status: int, message: str
) -> None:
    key = ca.generate_device_key()
    body = hub.enroll_body(
        "refused-" + message.replace(" ", "-")[:20].strip("-"), key, hub.provisioning_key()
    )
    raw = make(hub, body)
    device_id = body.get("device_id")
    checkable = isinstance(device_id, str) and ca.DEVICE_ID.fullmatch(device_id) is not None
    existed = checkable and hub.ctx.director.has_device(device_id)
    before = hub.snapshot()
    client = hub.client()
    if raw is not None:
        answer = client.post("/enroll", content=raw, headers={"Content-Type": "application/json"})
    else:
        answer = client.post("/enroll", json=body)
    assert answer.status_code == status, answer.text
    assert list(answer.json()) == ["error"]
    assert message in answer.json()["error"]
    assert "\n" not in answer.json()["error"]
    assert body["provisioning_key"] not in answer.text  # never echo a secret
    assert hub.snapshot() == before
    if checkable and not existed:
        assert not hub.ctx.director.has_device(device_id)  # nothing issued, nothing published


def test_enroll_needs_no_client_certificate_but_accepts_one(hub: Hub, device: Any) -> None:
    # An already enrolled agent re-enrolling (e.g. a factory reset) gets the same refusal.
    answer = hub.client(device).post(
        "/enroll",
        json=hub.enroll_body(device.device_id, ca.generate_device_key(), hub.provisioning_key()),
    )
    assert answer.status_code == 409
