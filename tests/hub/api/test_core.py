"""GET /hub, API tokens, and the audit log (every change, with actor and details)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from tuf.api.metadata import Metadata, Root

from skylift.hub import ca
from skylift.hub.api.common import rfc3339
from skylift.hub.auth import hash_secret
from skylift.hub.db.models import ApiToken, AuditEntry
from skylift.hub.db.models import Role as DbRole

from .conftest import ADMIN_ACTOR, ORG, Hub


def test_hub_describes_keys_root_and_gateway(hub: Hub) -> None:
    info = hub.get("/hub", token=hub.add_token("viewer")).json()
    key = hub.ctx.online_signers[0].public_key
    expected = {"keyid": key.keyid, **key.to_dict()}
    assert info["online_keys"] == {"snapshot": expected, "timestamp": expected}
    assert (info["name"], info["organisation"], info["role"]) == (ORG, ORG, "viewer")
    root = Metadata[Root].from_dict(info["director_root"])
    assert root.signed.version == 1
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
    assert root.signed.roles["targets"].keyids == [key.keyid]
    assert info["gateway_url"] == "https://127.0.0.1:8443"


def test_tokens_shown_once_used_and_revoked(hub: Hub) -> None:
    r = hub.post("/tokens", json={"name": "ci", "role": "operator"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["token"].startswith(f"sk_{made['prefix']}_") and made["role"] == "operator"
    with hub.session() as s:
        stored = s.get_one(ApiToken, made["id"])
        assert stored.token_hash == hash_secret(made["token"]) and stored.user_id is None

    listed = hub.get("/tokens")
    assert made["token"] not in listed.text and "token" not in listed.json()["items"][1]
    assert [t["name"] for t in listed.json()["items"]] == [f"{ADMIN_ACTOR}", "ci"]

    # The new token works, with its role and no more.
    assert hub.get("/devices", token=made["token"]).status_code == 200
    assert (
        hub.post("/tokens", token=made["token"], json={"name": "x", "role": "viewer"}).status_code
        == 403
    )

    assert hub.delete(f"/tokens/{made['id']}").status_code == 204
    assert hub.get("/devices", token=made["token"]).status_code == 401
    audits = hub.audit_count()
    assert hub.delete(f"/tokens/{made['id']}").status_code == 204
    assert hub.audit_count() == audits
    assert hub.get("/tokens").json()["items"][1]["revoked"] is True


def test_token_last_used_is_kept_to_the_minute(hub: Hub) -> None:
    made = hub.post("/tokens", json={"name": "ci", "role": "viewer"}).json()

    def last_used() -> str | None:
        items = {t["id"]: t for t in hub.get("/tokens").json()["items"]}
        value = items[made["id"]]["last_used"]
        assert value is None or isinstance(value, str)
        return value

    assert last_used() is None
    assert hub.get("/devices", token=made["token"]).status_code == 200
    first = last_used()
    assert first is not None
    assert abs(datetime.fromisoformat(first) - hub.clock()) < timedelta(seconds=30)
    assert hub.get("/devices", token=made["token"]).status_code == 200
    assert last_used() == first  # within the minute: no write
    hub.clock.offset += timedelta(minutes=2)
    assert hub.get("/devices", token=made["token"]).status_code == 200
    later = last_used()
    assert later is not None and datetime.fromisoformat(later) > datetime.fromisoformat(first)


def test_tokens_expire(hub: Hub) -> None:
    expires = hub.clock() + timedelta(hours=1)
    made = hub.post(
        "/tokens", json={"name": "temp", "role": "viewer", "expires": rfc3339(expires)}
    ).json()
    assert made["expires"] == rfc3339(expires)
    assert hub.get("/hub", token=made["token"]).status_code == 200
    hub.clock.offset = timedelta(hours=2)
    r = hub.get("/hub", token=made["token"])
    assert r.status_code == 401 and "expired" in r.json()["error"]


def test_each_role_can_be_given_by_an_admin(hub: Hub) -> None:
    for role in ("viewer", "operator", "admin"):
        made = hub.post("/tokens", json={"name": role, "role": role}).json()
        assert hub.get("/hub", token=made["token"]).json()["role"] == role


_ID_NAMES = {"provisioning_key": "key", "signer_ca": "ca", "token": "token"}


def _changes(hub: Hub) -> list[tuple[str, str, dict[str, Any], str, str, dict[str, Any]]]:
    """(method, path, body, action, target id, details) for every change the API makes."""
    cert, _ = ca.create_ca("Audit CA", now=hub.clock() - timedelta(days=1))
    return [
        ("POST", "/products/gw/provisioning-keys", {"name": "k", "max_uses": 3},
         "provisioning_key.create", "{key}",
         {"product": "gw", "name": "k", "max_uses": 3, "expires": None}),
        ("DELETE", "/provisioning-keys/{key}", {}, "provisioning_key.revoke", "{key}", {"name": "k"}),
        ("POST", "/signer-cas", {"name": "fab", "certificate": cert.decode()}, "signer_ca.create",
         "{ca}", {"name": "fab", "product": None}),
        ("DELETE", "/signer-cas/{ca}", {}, "signer_ca.revoke", "{ca}", {"name": "fab"}),
        ("PUT", "/devices/d1/tags", {"tags": ["a"]}, "device.tags", "d1",
         {"tags": ["a"], "added": ["a"], "removed": []}),
        ("POST", "/devices/d1/revoke", {"reason": "lost"}, "device.revoke", "d1",
         {"reason": "lost"}),
        ("DELETE", "/devices/d1", {}, "device.delete", "d1",
         {"product": "gw", "was_revoked": True}),
        ("POST", "/tokens", {"name": "bot", "role": "viewer"}, "token.create", "{token}",
         {"name": "bot", "role": "viewer", "expires": None}),
        ("DELETE", "/tokens/{token}", {}, "token.revoke", "{token}", {"name": "bot"}),
    ]  # fmt: skip


def test_every_change_is_audited_with_actor_and_details(hub: Hub) -> None:
    hub.create_product("gw")
    with hub.session() as s:
        product = s.scalar(sa.text("SELECT id FROM products"))
    hub.add_devices([{"device_id": "d1", "product_id": product}])
    hub.tokens["alice"] = hub.add_token("admin", name="alice")
    ids: dict[str, str] = {}
    for method, path, body, action, target, details in _changes(hub):
        r = hub.call(method, path.format(**ids), token="alice", json=body or None)
        assert r.status_code in (200, 201, 204), (action, r.text)
        if r.status_code == 201:
            ids[_ID_NAMES[action.split(".")[0]]] = str(r.json()["id"])
        entry = hub.get("/audit?limit=1").json()["items"][0]
        assert entry["action"] == action and entry["actor"] == "alice", action
        assert entry["target_id"] == target.format(**ids), action
        assert details.items() <= entry["details"].items(), (action, entry["details"])
    # Refused changes wrote nothing (the security table checks many more).
    audits = hub.audit_count()
    hub.put("/devices/d1/tags", token="alice", json={"tags": ["a"]})
    assert hub.audit_count() == audits
    with hub.session() as s:
        assert (
            s.scalar(
                sa.select(sa.func.count())
                .select_from(AuditEntry)
                .where(AuditEntry.actor == "alice")
            )
            == 9
        )


def test_audit_filters_and_pages(hub: Hub) -> None:
    hub.tokens["bob"] = hub.add_token("admin", name="bob")
    base = hub.clock()
    with hub.session() as s:
        for i in range(30):
            s.add(AuditEntry(org_id=hub.org_id, actor="bob" if i % 3 else "carol",
                             action="device.tags" if i % 2 else "device.revoke",
                             target_type="device", target_id=f"d{i}", details={"i": i},
                             created=base - timedelta(minutes=30 - i // 2)))  # fmt: skip
        s.add(AuditEntry(org_id=hub.org_id + 99, actor="bob", action="device.tags",
                         target_type="device", target_id="elsewhere", created=base))  # fmt: skip

    def collect(query: str) -> list[int]:
        out: list[int] = []
        cursor = None
        while True:
            page = hub.get(
                f"/audit?limit=4&{query}" + (f"&cursor={cursor}" if cursor else "")
            ).json()
            out += [e["details"]["i"] for e in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return out

    assert collect("") == list(range(29, -1, -1))
    assert collect("actor=carol") == [i for i in range(29, -1, -1) if i % 3 == 0]
    assert collect("action=device.revoke&actor=bob") == [
        i for i in range(29, -1, -1) if i % 2 == 0 and i % 3
    ]
    since = rfc3339(base - timedelta(minutes=20))
    assert collect(f"since={since}") == [i for i in range(29, -1, -1) if 30 - i // 2 <= 20]
    assert collect("actor=nobody") == []


def test_openapi_needs_no_token(hub: Hub) -> None:
    r = hub.get("/openapi.json", token=None)
    assert r.status_code == 200 and r.json()["openapi"] == "3.1.0"


def test_concurrent_read_then_write_transactions_all_commit(hub: Hub) -> None:
    """Each worker reads, pauses, then writes: on SQLite a deferred BEGIN fails
    such upgrades at once with "database is locked"; the hub's must wait."""
    errors: list[BaseException] = []
    start = threading.Barrier(6)
    org_id = hub.org_id

    def worker(n: int) -> None:
        try:
            start.wait(timeout=10)
            with hub.ctx.transaction() as session:
                session.scalar(sa.select(sa.func.count()).select_from(ApiToken))
                time.sleep(0.05)  # another writer gets in between
                session.add(
                    ApiToken(
                        org_id=org_id, name=f"race-{n}", role=DbRole.VIEWER,
                        token_hash=f"{n:064x}", prefix=f"race{n:04d}",
                    )
                )  # fmt: skip
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    with hub.session() as s:
        names = s.scalars(sa.select(ApiToken.name).where(ApiToken.name.like("race-%"))).all()
    assert sorted(names) == [f"race-{n}" for n in range(6)]
