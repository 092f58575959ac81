"""Products from offline-signed metadata, image files, provisioning keys, signer CAs."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets

from skylift.hub import ca
from skylift.hub.auth import hash_secret
from skylift.hub.db.models import Product, ProvisioningKey, ReleaseKey, SignerCA
from skylift.trust.keys import generate_private_key, signer_for
from skylift.trust.repository import offline_metadata, sign_next_targets

from .conftest import ADMIN_ACTOR, Hub


def _json_variants(data: bytes) -> dict[str, bytes]:
    doc = json.loads(data)
    return {
        "compact": json.dumps(doc, separators=(",", ":")).encode(),
        "indented": json.dumps(doc, indent=4, sort_keys=False).encode(),
        "non-ascii-kept": json.dumps(doc, ensure_ascii=False).encode(),
        "reordered": json.dumps(dict(reversed(list(doc.items())))).encode(),
    }


def test_signatures_survive_a_json_round_trip() -> None:
    """What the API relies on: python-tuf verifies the canonical form, not the bytes sent."""
    from datetime import UTC, datetime

    root_key, release = signer_for(generate_private_key()), signer_for(generate_private_key())
    online = signer_for(generate_private_key()).public_key
    root, targets = offline_metadata(
        keys={"root": [root_key.public_key], "targets": [release.public_key],
              "snapshot": [online], "timestamp": [online]},
        thresholds=None, signers=[root_key, release], now=datetime.now(UTC),
    )  # fmt: skip
    for name, data in _json_variants(root).items():
        md = Metadata[Root].from_bytes(data)
        md.signed.verify_delegate("root", md.signed_bytes, md.signatures)  # raises if not
        assert data != root or name == "compact"
    trusted = Metadata[Root].from_bytes(root).signed
    for data in _json_variants(targets).values():
        t = Metadata[Targets].from_bytes(data)
        trusted.verify_delegate("targets", t.signed_bytes, t.signatures)
    # A changed byte inside "signed" is still caught after a round trip.
    tampered = json.loads(targets)
    tampered["signed"]["version"] = 2
    t = Metadata[Targets].from_bytes(json.dumps(tampered).encode())
    with pytest.raises(UnsignedMetadataError, match="signed by 0/1 keys"):
        trusted.verify_delegate("targets", t.signed_bytes, t.signatures)


def test_create_product_then_release_against_the_stored_metadata(hub: Hub) -> None:
    releases = hub.create_product("gw", release_keys=2, threshold=2)
    product = hub.get("/products/gw").json()
    assert product["release_threshold"] == 2
    assert sorted(product["release_keys"]) == sorted(s.public_key.keyid for s in releases)
    assert hub.get("/products").json()["items"] == [product]

    # The files are served as stored, and they verify as a TUF repository.
    root = hub.get("/products/gw/image/metadata/1.root.json")
    assert root.headers["content-type"] == "application/json"
    assert root.content == hub.ctx.images.read("gw", "metadata/1.root.json")
    md = Metadata[Root].from_bytes(root.content)
    md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
    timestamp = hub.get("/products/gw/image/metadata/timestamp.json").json()
    assert timestamp["signed"]["_type"] == "timestamp"
    hub_key = hub.ctx.online_signers[0].public_key.keyid
    assert [s["keyid"] for s in timestamp["signatures"]] == [hub_key]
    for missing in ("metadata/2.root.json", "metadata/nope.json", "other/x", "targets/x"):
        assert hub.get(f"/products/gw/image/{missing}").status_code == 404, missing

    # A release signed offline against what the hub stored is accepted: the
    # JSON round trip of root and targets broke no signature.
    current = hub.get("/products/gw/image/metadata/1.targets.json").content
    head = b"bundle head bytes"
    nxt = sign_next_targets(
        current, path="1.0.0.head", content=head, custom={"product": "gw"},
        signers=releases, root=root.content, now=hub.clock(),
    )  # fmt: skip
    target = hub.ctx.images.add_release("gw", targets=nxt, head=head)
    assert target.path == "1.0.0.head"

    entries = hub.get("/audit?action=product.create").json()["items"]
    assert len(entries) == 1
    assert entries[0]["actor"] == ADMIN_ACTOR and entries[0]["target_id"] == "gw"
    assert entries[0]["details"]["release_threshold"] == 2


def _refusals(hub: Hub) -> list[tuple[str, dict[str, Any], int, str]]:
    """(case, body, status, words in the error) for product creation."""
    stranger = signer_for(generate_private_key()).public_key
    root, targets, _ = hub.product_metadata()
    wrong_snapshot, t1, _ = hub.product_metadata(online={"snapshot": stranger})
    wrong_timestamp, t2, _ = hub.product_metadata(online={"timestamp": stranger})
    expired, t3, _ = hub.product_metadata(
        now=hub.clock() - timedelta(days=800), expiry={"root": timedelta(days=1)}
    )
    _, foreign_targets, _ = hub.product_metadata()  # signed by other release keys
    bad_sig = json.loads(json.dumps(root))
    bad_sig["signed"]["version"] = 1
    bad_sig["signed"]["expires"] = "2099-01-01T00:00:00Z"  # no longer what was signed
    return [
        ("snapshot-not-hub", {"name": "p", "root": wrong_snapshot, "targets": t1}, 400,
         "GET /api/v1/hub"),
        ("timestamp-not-hub", {"name": "p", "root": wrong_timestamp, "targets": t2}, 400,
         "online key"),
        ("root-expired", {"name": "p", "root": expired, "targets": t3}, 400, "expired"),
        ("root-tampered", {"name": "p", "root": bad_sig, "targets": targets}, 400, "signature"),
        ("targets-other-keys", {"name": "p", "root": root, "targets": foreign_targets}, 400,
         "targets"),
        ("root-not-tuf", {"name": "p", "root": {"a": 1}, "targets": targets}, 400, "root"),
        ("targets-is-root", {"name": "p", "root": root, "targets": root}, 400, "targets"),
        ("root-not-object", {"name": "p", "root": "x", "targets": targets}, 400, "object"),
        ("upper-case-name", {"name": "GW", "root": root, "targets": targets}, 400, "name"),
        ("long-name", {"name": "g" * 64, "root": root, "targets": targets}, 400, "name"),
        ("dotdot-name", {"name": "..", "root": root, "targets": targets}, 400, "name"),
        ("missing-targets", {"name": "p", "root": root}, 400, "targets"),
        ("extra-field", {"name": "p", "root": root, "targets": targets, "threshold": 1}, 400,
         "unknown field"),
        ("exists", {"name": "gw", "root": root, "targets": targets}, 409, "exists"),
    ]  # fmt: skip


def test_refused_products_change_nothing(hub: Hub) -> None:
    hub.create_product("gw")
    for case, body, status, words in _refusals(hub):
        before = hub.state()
        r = hub.post("/products", json=body)
        assert r.status_code == status, (case, r.text)
        assert words.lower() in r.json()["error"].lower(), (case, r.text)
        assert hub.state() == before, case


def test_product_names_are_hub_wide(hub: Hub) -> None:
    hub.create_product("gw")
    other = hub.add_org("other")
    hub.tokens["other"] = hub.add_token("admin", org_id=other)
    root, targets, _ = hub.product_metadata()
    before = hub.state()
    r = hub.post("/products", token="other", json={"name": "gw", "root": root, "targets": targets})
    assert r.status_code == 409 and "taken on this hub" in r.json()["error"]
    assert hub.state() == before
    # ... and reading it from the other organisation is still a 404.
    assert hub.get("/products/gw", token="other").status_code == 404


def test_product_rows_hold_the_release_keys(hub: Hub) -> None:
    releases = hub.create_product("gw", release_keys=3, threshold=2)
    with hub.session() as s:
        product = s.scalars(sa.select(Product)).one()
        keys = s.scalars(sa.select(ReleaseKey).where(ReleaseKey.product_id == product.id)).all()
        assert product.release_threshold == 2
        assert {k.keyid: k.public_key for k in keys} == {
            r.public_key.keyid: r.public_key.to_dict() for r in releases
        }


def test_provisioning_keys(hub: Hub) -> None:
    hub.create_product("gw")
    expires = (hub.clock() + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = hub.post("/products/gw/provisioning-keys",
                 json={"name": "factory-1", "max_uses": 1000, "expires": expires})  # fmt: skip
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["key"].startswith(f"pk_{created['prefix']}_")
    assert (created["max_uses"], created["expires"], created["uses"]) == (1000, expires, 0)
    hub.post("/products/gw/provisioning-keys", json={"name": "factory-2"})

    with hub.session() as s:
        stored = s.scalars(sa.select(ProvisioningKey).order_by(ProvisioningKey.id)).all()
        assert stored[0].key_hash == hash_secret(created["key"])
    listed = hub.get("/products/gw/provisioning-keys")
    assert created["key"] not in listed.text and "key" not in listed.json()["items"][0]
    assert [k["name"] for k in listed.json()["items"]] == ["factory-1", "factory-2"]

    assert hub.delete(f"/provisioning-keys/{created['id']}").status_code == 204
    audits = hub.audit_count()
    assert hub.delete(f"/provisioning-keys/{created['id']}").status_code == 204  # idempotent
    assert hub.audit_count() == audits
    assert [k["revoked"] for k in hub.get("/products/gw/provisioning-keys").json()["items"]] == [
        True,
        False,
    ]
    assert hub.delete("/provisioning-keys/12345").status_code == 404
    assert hub.post("/products/nope/provisioning-keys", json={"name": "x"}).status_code == 404
    actions = [e["action"] for e in hub.get("/audit").json()["items"]]
    assert actions[:3] == [
        "provisioning_key.revoke",
        "provisioning_key.create",
        "provisioning_key.create",
    ]


def test_signer_cas(hub: Hub) -> None:
    hub.create_product("gw")
    now = hub.clock()
    cert, key = ca.create_ca("Acme Factory CA", now=now - timedelta(days=1))
    r = hub.post(
        "/signer-cas", json={"name": "factory", "product": "gw", "certificate": cert.decode()}
    )
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["subject"] == "CN=Acme Factory CA" and made["product"] == "gw"
    der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    assert made["fingerprint"] == hashlib.sha256(der).hexdigest() and not made["revoked"]
    other, _ = ca.create_ca("Any product CA", now=now - timedelta(days=1))
    assert (
        hub.post("/signer-cas", json={"name": "any", "certificate": other.decode()}).status_code
        == 201
    )
    assert [(c["name"], c["product"]) for c in hub.get("/signer-cas").json()["items"]] == [
        ("factory", "gw"),
        ("any", None),
    ]

    leaf, _ = ca.issue_server_cert(cert, key, hostnames=["hub.example"], ips=[], now=now)
    old, _ = ca.create_ca("Old CA", now=now - timedelta(days=30), valid_for=timedelta(days=2))
    refusals = [
        ({"name": "leaf", "certificate": leaf.decode()}, 400, "not a CA"),
        ({"name": "two", "certificate": (cert + other).decode()}, 400, "found 2"),
        ({"name": "old", "certificate": old.decode()}, 400, "expired"),
        ({"name": "again", "certificate": cert.decode()}, 409, "registered"),
        ({"name": "factory", "certificate": old.decode()}, 400, "expired"),
        ({"name": "x", "product": "nope", "certificate": other.decode()}, 404, "no product"),
        ({"name": "x", "certificate": cert.decode() + "\x00"}, 400, "control"),
    ]
    for body, status, words in refusals:
        before = hub.state()
        r = hub.post("/signer-cas", json=body)
        assert r.status_code == status and words in r.json()["error"], (body["name"], r.text)
        assert hub.state() == before

    assert hub.delete(f"/signer-cas/{made['id']}").status_code == 204
    with hub.session() as s:
        assert s.scalars(sa.select(SignerCA.revoked).where(SignerCA.id == made["id"])).one()
    assert hub.get("/signer-cas").json()["items"][0]["revoked"] is True
    assert hub.delete("/signer-cas/999").status_code == 404
