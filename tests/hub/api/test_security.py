"""Refused requests: the right status, a one-line error, and nothing changed anywhere.

One hub per backend serves the whole table: organisation "acme" (the hub's)
with a product, a device, a provisioning key, a signer CA and tokens of each
role; organisation "other" with its own product, device and tokens. Every
row is a request that must be refused; before and after it, every row of
every table and every object-store key are compared.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from skylift.hub import ca
from skylift.hub.api.common import encode_cursor

from .conftest import Hub


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    token: str | None  # a name in World.tokens, or a raw Authorization value with "raw:"
    status: int
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class World:
    hub: Hub
    ids: dict[str, int]


@pytest.fixture(scope="module")
def world(shared_hub: Hub) -> World:
    h = shared_hub
    h.create_product("gw")
    key = h.post("/products/gw/provisioning-keys", json={"name": "factory"}).json()
    cert, _ = ca.create_ca("Acme factory CA", now=h.clock() - timedelta(days=1))
    signer = h.post("/signer-cas", json={"name": "factory", "certificate": cert.decode()}).json()
    product_id = _product_id(h, "gw")
    h.add_devices([{"device_id": "acme-1", "product_id": product_id, "tags": ["lab"]}])

    other = h.add_org("other")
    other_product = h.add_product_row("othergw", org_id=other)
    h.add_devices([{"device_id": "other-1", "product_id": other_product}], org_id=other)
    h.tokens |= {
        "viewer": h.add_token("viewer"),
        "operator": h.add_token("operator"),
        "revoked": h.add_token("admin", revoked=True),
        "expired": h.add_token("admin", expires=h.clock() - timedelta(seconds=1)),
        "other-operator": h.add_token("operator", org_id=other),
        "other-admin": h.add_token("admin", org_id=other),
        # Well-formed, never issued.
        "unknown": "sk_abcdefgh_" + "A" * 43,
    }
    token_id = h.get("/tokens").json()["items"][0]["id"]
    return World(h, {"key": key["id"], "ca": signer["id"], "token": token_id})


def _product_id(h: Hub, name: str) -> int:
    from sqlalchemy import select

    from skylift.hub.db.models import Product

    with h.session() as s:
        return s.scalars(select(Product.id).where(Product.name == name)).one()


def _b64(doc: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


BIG = b'{"tags": ["' + b"a" * (1024 * 1024) + b'"]}'
NEW_KEY = {"json": {"name": "k2"}}
TAGS = {"json": {"tags": ["x"]}}
REVOKE = {"json": {"reason": "stolen"}}

CASES = [
    # -- credentials: 401
    Case("no-token-list", "GET", "/devices", None, 401),
    Case("no-token-tags", "PUT", "/devices/acme-1/tags", None, 401, TAGS),
    Case("no-token-product", "POST", "/products", None, 401, {"json": {"name": "x"}}),
    Case("no-token-hub", "GET", "/hub", None, 401),
    Case("basic-auth", "GET", "/devices", "raw:Basic YWRtaW46YWRtaW4=", 401),
    Case("malformed-token", "GET", "/devices", "raw:Bearer not-a-token", 401),
    Case("empty-bearer", "GET", "/devices", "raw:Bearer ", 401),
    Case("provisioning-key-as-token", "GET", "/devices", "raw:Bearer pk_abcdefgh_" + "A" * 43, 401),
    Case("unknown-token", "GET", "/devices", "unknown", 401),
    Case("revoked-token-read", "GET", "/devices", "revoked", 401),
    Case("revoked-token-write", "PUT", "/devices/acme-1/tags", "revoked", 401, TAGS),
    Case("expired-token-read", "GET", "/audit", "expired", 401),
    Case("expired-token-write", "POST", "/tokens", "expired", 401,
         {"json": {"name": "x", "role": "admin"}}),
    # Credentials are checked before the body: no validation feedback to strangers.
    Case("no-token-oversized", "PUT", "/devices/acme-1/tags", None, 401, {"content": BIG}),
    # -- roles: 403
    Case("viewer-provisioning-key", "POST", "/products/gw/provisioning-keys", "viewer", 403, NEW_KEY),
    Case("viewer-tags", "PUT", "/devices/acme-1/tags", "viewer", 403, TAGS),
    Case("viewer-revoke", "POST", "/devices/acme-1/revoke", "viewer", 403, REVOKE),
    Case("viewer-tokens", "GET", "/tokens", "viewer", 403),
    Case("operator-provisioning-key", "POST", "/products/gw/provisioning-keys", "operator", 403,
         NEW_KEY),
    Case("operator-list-keys", "GET", "/products/gw/provisioning-keys", "operator", 403),
    Case("operator-delete-device", "DELETE", "/devices/acme-1", "operator", 403),
    Case("operator-create-token", "POST", "/tokens", "operator", 403,
         {"json": {"name": "x", "role": "viewer"}}),
    Case("operator-product", "POST", "/products", "operator", 403, {"json": {"name": "x"}}),
    Case("operator-signer-ca", "POST", "/signer-cas", "operator", 403,
         {"json": {"name": "x", "certificate": "x"}}),
    Case("viewer-malformed-body", "PUT", "/devices/acme-1/tags", "viewer", 403, {"content": b"{"}),
    # -- another organisation's things: 404, never 403
    Case("other-show-device", "GET", "/devices/acme-1", "other-operator", 404),
    Case("other-device-events", "GET", "/devices/acme-1/events", "other-operator", 404),
    Case("other-tag-device", "PUT", "/devices/acme-1/tags", "other-operator", 404, TAGS),
    Case("other-revoke-device", "POST", "/devices/acme-1/revoke", "other-operator", 404, REVOKE),
    Case("other-delete-device", "DELETE", "/devices/acme-1", "other-admin", 404),
    Case("other-show-product", "GET", "/products/gw", "other-operator", 404),
    Case("other-image-file", "GET", "/products/gw/image/metadata/root.json", "other-operator", 404),
    Case("other-new-key", "POST", "/products/gw/provisioning-keys", "other-admin", 404, NEW_KEY),
    Case("other-list-keys", "GET", "/products/gw/provisioning-keys", "other-admin", 404),
    Case("other-revoke-key", "DELETE", "/provisioning-keys/{key}", "other-admin", 404),
    Case("other-revoke-ca", "DELETE", "/signer-cas/{ca}", "other-admin", 404),
    Case("other-revoke-token", "DELETE", "/tokens/{token}", "other-admin", 404),
    Case("other-ca-for-product", "POST", "/signer-cas", "other-admin", 404,
         {"json": {"name": "x", "product": "gw", "certificate": "{cert}"}}),
    # And the same answers for things that exist nowhere.
    Case("nowhere-device", "GET", "/devices/nobody", "operator", 404),
    Case("nowhere-product", "GET", "/products/nothing", "operator", 404),
    Case("nowhere-token", "DELETE", "/tokens/999999", "admin", 404),
    Case("huge-id", "DELETE", "/tokens/99999999999999999999999", "admin", 404),
    Case("int8-id", "DELETE", "/provisioning-keys/1099511627776", "admin", 404),
    Case("bad-device-id", "GET", "/devices/..%2f..", "viewer", 404),
    # -- bodies: 413 and 400
    Case("oversized-tags", "PUT", "/devices/acme-1/tags", "operator", 413, {"content": BIG}),
    Case("oversized-product", "POST", "/products", "admin", 413, {"content": BIG}),
    Case("lying-content-length", "PUT", "/devices/acme-1/tags", "operator", 400,
         {"content": b'{"tags": []}', "headers": {"Content-Length": "x"}}),
    Case("malformed-json", "PUT", "/devices/acme-1/tags", "operator", 400, {"content": b'{"tags": ['}),
    Case("not-utf8", "PUT", "/devices/acme-1/tags", "operator", 400, {"content": b'{"tags": ["\xff"]}'}),
    Case("deep-json", "PUT", "/devices/acme-1/tags", "operator", 400, {"content": b"[" * 500_000}),
    Case("json-not-object", "PUT", "/devices/acme-1/tags", "operator", 400, {"json": ["x"]}),
    Case("unknown-field-tags", "PUT", "/devices/acme-1/tags", "operator", 400,
         {"json": {"tags": [], "mode": "add"}}),
    Case("unknown-field-token", "POST", "/tokens", "admin", 400,
         {"json": {"name": "x", "role": "viewer", "org": 2}}),
    Case("unknown-field-key", "POST", "/products/gw/provisioning-keys", "admin", 400,
         {"json": {"name": "k", "uses": 0}}),
    Case("missing-field", "POST", "/devices/acme-1/revoke", "operator", 400, {"json": {}}),
    Case("empty-reason", "POST", "/devices/acme-1/revoke", "operator", 400, {"json": {"reason": " "}}),
    Case("bad-tag", "PUT", "/devices/acme-1/tags", "operator", 400, {"json": {"tags": ["a b"]}}),
    Case("reserved-tag", "PUT", "/devices/acme-1/tags", "admin", 400, {"json": {"tags": ["~deleted"]}}),
    Case("too-many-tags", "PUT", "/devices/acme-1/tags", "operator", 400,
         {"json": {"tags": [f"t{i}" for i in range(65)]}}),
    Case("tags-not-list", "PUT", "/devices/acme-1/tags", "operator", 400, {"json": {"tags": "lab"}}),
    Case("tag-not-string", "PUT", "/devices/acme-1/tags", "operator", 400, {"json": {"tags": [1]}}),
    Case("bool-as-int", "POST", "/products/gw/provisioning-keys", "admin", 400,
         {"json": {"name": "k", "max_uses": True}}),
    Case("zero-uses", "POST", "/products/gw/provisioning-keys", "admin", 400,
         {"json": {"name": "k", "max_uses": 0}}),
    Case("naive-time", "POST", "/products/gw/provisioning-keys", "admin", 400,
         {"json": {"name": "k", "expires": "2099-01-01T00:00:00"}}),
    Case("past-time", "POST", "/tokens", "admin", 400,
         {"json": {"name": "k", "role": "viewer", "expires": "2001-01-01T00:00:00Z"}}),
    Case("bad-role", "POST", "/tokens", "admin", 400, {"json": {"name": "k", "role": "root"}}),
    Case("bad-name", "POST", "/tokens", "admin", 400, {"json": {"name": "-x", "role": "viewer"}}),
    Case("control-chars", "POST", "/devices/acme-1/revoke", "operator", 400,
         {"json": {"reason": "a\nb"}}),
    Case("not-a-ca", "POST", "/signer-cas", "admin", 400,
         {"json": {"name": "x", "certificate": "not a pem"}}),
    Case("duplicate-key-name", "POST", "/products/gw/provisioning-keys", "admin", 409,
         {"json": {"name": "factory"}}),
    Case("duplicate-ca", "POST", "/signer-cas", "admin", 409,
         {"json": {"name": "again", "certificate": "{cert}"}}),
    # -- queries: 400
    Case("unknown-query", "GET", "/devices?tags=lab", "viewer", 400),
    Case("repeated-query", "GET", "/devices?state=idle&state=failed", "viewer", 400),
    Case("bad-state", "GET", "/devices?state=asleep", "viewer", 400),
    Case("limit-zero", "GET", "/devices?limit=0", "viewer", 400),
    Case("limit-high", "GET", "/devices?limit=501", "viewer", 400),
    Case("limit-text", "GET", "/devices?limit=ten", "viewer", 400),
    Case("garbage-cursor", "GET", "/devices?cursor=%%%", "viewer", 400),
    Case("forged-cursor", "GET", f"/devices?cursor={_b64(['devices', '1'])}", "viewer", 400),
    Case("negative-cursor", "GET", f"/devices?cursor={_b64(['devices', -1])}", "viewer", 400),
    Case("audit-cursor-on-devices", "GET", f"/devices?cursor={encode_cursor('audit', [1, 1])}",
         "viewer", 400),
    Case("devices-cursor-on-events", "GET",
         f"/devices/acme-1/events?cursor={encode_cursor('devices', [1])}", "viewer", 400),
    Case("int8-cursor", "GET", f"/devices?cursor={encode_cursor('devices', [2**40])}", "viewer", 400),
    Case("far-cursor", "GET", f"/audit?cursor={encode_cursor('audit', [2**62, 1])}", "viewer", 400),
    Case("bad-time", "GET", "/devices?seen_since=yesterday", "viewer", 400),
    Case("overflow-time", "GET", "/devices?seen_since=9999-12-31T23:00:00-02:00", "viewer", 400),
    Case("year-zero-time", "GET", "/audit?since=0001-01-01T00:00:00%2B01:00", "viewer", 400),
    Case("audit-bad-since", "GET", "/audit?since=2026-13-01T00:00:00Z", "viewer", 400),
    Case("query-on-show", "GET", "/devices/acme-1?verbose=1", "viewer", 400),
    Case("query-on-change", "PUT", "/devices/acme-1/tags?mode=add", "operator", 400, TAGS),
    Case("query-on-delete", "DELETE", "/devices/acme-1?force=1", "admin", 400),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_refused_and_nothing_changed(world: World, case: Case) -> None:
    h = world.hub
    kwargs = dict(case.kwargs)
    cert = h.get("/signer-cas").json()["items"][0]
    if "json" in kwargs and "{cert}" in json.dumps(kwargs["json"]):
        pem = _ca_pem(h)
        kwargs["json"] = {k: pem if v == "{cert}" else v for k, v in kwargs["json"].items()}
    path = case.path.format(key=world.ids["key"], ca=cert["id"], token=world.ids["token"])
    headers = dict(kwargs.pop("headers", {}))
    token: str | None = case.token
    if token is not None and token.startswith("raw:"):
        headers["Authorization"] = token.removeprefix("raw:")
        token = None

    before = h.state()
    r = h.call(case.method, path, token=token, headers=headers, **kwargs)

    assert r.status_code == case.status, r.text
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"]
    if case.status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert h.state() == before


def _ca_pem(h: Hub) -> str:
    from sqlalchemy import select

    from skylift.hub.db.models import SignerCA

    with h.session() as s:
        return s.scalars(select(SignerCA.cert_pem)).first() or ""


def test_other_organisations_filters_select_nothing(world: World) -> None:
    h = world.hub
    mine = h.get("/devices", token="other-operator").json()["items"]
    assert [d["device_id"] for d in mine] == ["other-1"]
    for query in ("product=gw", "tag=lab", "q=acme"):
        assert h.get(f"/devices?{query}", token="other-operator").json()["items"] == []
    products = h.get("/products", token="other-operator").json()["items"]
    assert [p["name"] for p in products] == ["othergw"]
    assert h.get("/signer-cas", token="other-admin").json()["items"] == []
    assert h.get("/audit", token="other-admin").json()["items"] == []
    tokens = h.get("/tokens", token="other-admin").json()["items"]
    assert {t["role"] for t in tokens} == {"operator", "admin"} and len(tokens) == 2


def test_every_role_reads(world: World) -> None:
    h = world.hub
    for token in ("viewer", "operator", "admin"):
        for path in ("/hub", "/products", "/products/gw", "/devices", "/devices/acme-1",
                     "/devices/acme-1/events", "/signer-cas", "/audit"):  # fmt: skip
            assert h.get(path, token=token).status_code == 200, (token, path)
