"""The fleet through the API: filters, pages, one device, tags, revocation, deletion, events."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from skylift.hub.api.common import DELETED_TAG
from skylift.hub.db.models import (
    Deployment,
    DeploymentDevice,
    Device,
    DeviceEvent,
    DeviceSlot,
    DeviceState,
    DeviceTag,
    Release,
    RolloutStatus,
)

from .conftest import ADMIN_ACTOR, Hub

N = 200
PREFIXES = ("alpha", "Beta", "GAMMA", "delta")
STATES = list(DeviceState)


def _spec(i: int, base: datetime, products: dict[str, int]) -> dict[str, Any]:
    tags = [t for t, on in (("site:lab", i % 2 == 0), ("ring=canary", i % 7 == 0),
                            ("eu", i % 3 == 0)) if on]  # fmt: skip
    slots = {"rootfs": "1.0.0" if i < 100 else "1.1.0"}
    if i % 10 == 0:
        slots["app"] = "2.0"
    return {
        "device_id": f"{PREFIXES[i % 4]}-{i:04d}",
        "product_id": products["cam" if i % 5 == 0 else "gw"],
        "product": "cam" if i % 5 == 0 else "gw",
        "hardware_id": f"hw{i % 3}",
        "tags": tags,
        "slots": slots,
        "state": STATES[i % len(STATES)],
        "last_seen": None if i % 11 == 0 else base + timedelta(minutes=i),
    }


@pytest.fixture
def fleet(hub: Hub) -> tuple[Hub, list[dict[str, Any]], datetime]:
    products = {name: hub.add_product_row(name) for name in ("gw", "cam")}
    base = hub.clock().replace(microsecond=0) - timedelta(days=1)
    specs = [_spec(i, base, products) for i in range(N)]
    hub.add_devices(specs)  # the "product" key is for the expectations only
    # Another organisation's devices match every filter and must never show.
    other = hub.add_org("other")
    other_product = hub.add_product_row("othergw", org_id=other)
    hub.add_devices(
        [{**s, "device_id": f"x-{s['device_id']}", "product_id": other_product} for s in specs],
        org_id=other,
    )
    return hub, specs, base


def _all(hub: Hub, query: str, limit: int = 500) -> list[str]:
    """Every device id a query selects, following cursors."""
    ids: list[str] = []
    cursor: str | None = None
    while True:
        page = hub.get(f"/devices?limit={limit}&{query}" + (f"&cursor={cursor}" if cursor else ""))
        assert page.status_code == 200, page.text
        body = page.json()
        ids += [d["device_id"] for d in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return ids


def _t(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


Pred = Callable[[dict[str, Any]], bool]


def _filters(base: datetime) -> list[tuple[str, str, Pred]]:
    since, before = base + timedelta(minutes=50), base + timedelta(minutes=120)
    # The same instant as `since`, written with a +02:00 offset.
    since_cest = (since + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S") + "%2B02:00"

    def seen(lo: datetime | None, hi: datetime | None) -> Pred:
        def pred(s: dict[str, Any]) -> bool:
            t: datetime | None = s["last_seen"]
            return t is not None and (lo is None or t >= lo) and (hi is None or t < hi)

        return pred

    return [
        ("all", "", lambda s: True),
        ("tag", "tag=site:lab", lambda s: "site:lab" in s["tags"]),
        ("tags-and", "tag=site:lab&tag=ring%3Dcanary",
         lambda s: {"site:lab", "ring=canary"} <= set(s["tags"])),
        ("three-tags", "tag=site:lab&tag=ring%3Dcanary&tag=eu",
         lambda s: {"site:lab", "ring=canary", "eu"} <= set(s["tags"])),
        ("unknown-tag", "tag=nowhere", lambda s: False),
        ("product", "product=cam", lambda s: s["product"] == "cam"),
        ("unknown-product", "product=nothing", lambda s: False),
        ("other-orgs-product", "product=othergw", lambda s: False),
        ("hardware", "hardware=hw1", lambda s: s["hardware_id"] == "hw1"),
        ("version-rootfs", "version=1.1.0", lambda s: s["slots"]["rootfs"] == "1.1.0"),
        ("version-app", "version=2.0", lambda s: s["slots"].get("app") == "2.0"),
        ("state", "state=failed", lambda s: s["state"] == DeviceState.FAILED),
        ("q-case", "q=beta", lambda s: s["device_id"].startswith("Beta")),
        ("q-substring", "q=TA-00", lambda s: "ta-00" in s["device_id"].lower()),
        ("q-like-chars", "q=%25", lambda s: False),
        ("q-underscore", "q=a_", lambda s: False),
        ("seen-since", f"seen_since={_t(since)}", seen(since, None)),
        ("seen-before", f"seen_before={_t(before)}", seen(None, before)),
        ("seen-range", f"seen_since={_t(since)}&seen_before={_t(before)}", seen(since, before)),
        ("offset-time", f"seen_since={since_cest}", seen(since, None)),
        ("combined", "product=gw&tag=eu&version=1.0.0&hardware=hw0",
         lambda s: s["product"] == "gw" and "eu" in s["tags"]
         and s["slots"]["rootfs"] == "1.0.0" and s["hardware_id"] == "hw0"),
    ]  # fmt: skip


def test_filters_select_the_right_devices(
    fleet: tuple[Hub, list[dict[str, Any]], datetime],
) -> None:
    hub, specs, base = fleet
    for name, query, pred in _filters(base):
        expected = [s["device_id"] for s in specs if pred(s)]
        assert _all(hub, query) == expected, name
        assert expected or name in ("unknown-tag", "unknown-product", "other-orgs-product",
                                    "q-like-chars", "q-underscore"), f"{name} selects nothing"  # fmt: skip


def test_pages_return_every_device_once(fleet: tuple[Hub, list[dict[str, Any]], datetime]) -> None:
    hub, specs, _ = fleet
    hub.check_answers = False  # many pages; the schema is checked elsewhere
    seen = _all(hub, "", limit=7)
    assert seen == [s["device_id"] for s in specs]
    assert _all(hub, "tag=site:lab", limit=9) == [
        s["device_id"] for s in specs if "site:lab" in s["tags"]
    ]

    # Keyset pages survive changes between requests: nothing skipped, nothing twice.
    first = hub.get("/devices?limit=50").json()
    assert len(first["items"]) == 50
    hub.delete(f"/devices/{first['items'][10]['device_id']}")  # already sent
    hub.delete(f"/devices/{specs[120]['device_id']}")  # not yet sent
    with hub.session() as s:
        product = s.scalar(sa.select(Device.product_id).limit(1))
    hub.add_devices([{"device_id": "zz-new", "product_id": product}])
    rest, cursor = [], first["next_cursor"]
    while cursor:
        page = hub.get(f"/devices?limit=50&cursor={cursor}").json()
        rest += [d["device_id"] for d in page["items"]]
        cursor = page["next_cursor"]
    expected = [s["device_id"] for s in specs[50:] if s is not specs[120]] + ["zz-new"]
    assert rest == expected


def test_a_page_costs_a_fixed_number_of_queries(
    fleet: tuple[Hub, list[dict[str, Any]], datetime],
) -> None:
    hub, _, _ = fleet
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = hub.ctx.sessions.kw["bind"]
    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        for limit in (5, 200):
            statements.clear()
            assert len(hub.get(f"/devices?limit={limit}&tag=eu").json()["items"]) == min(limit, 67)
            # token lookup, the page, then product, tags and slots in one query each
            assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) <= 5
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


def _deploy(hub: Hub, device_pk: int, product_id: int, name: str, status: RolloutStatus) -> int:
    with hub.session() as s:
        release = Release(
            product_id=product_id, version=name, target_path=f"{name}.head", length=1,
            hashes={"sha256": "0" * 64}, custom={}, manifest_digest="0" * 64, payload_size=1,
            stored_size=1, created_by="test",
        )  # fmt: skip
        s.add(release)
        s.flush()
        dep = Deployment(
            org_id=hub.org_id, product_id=product_id, release_id=release.id, name=name,
            selector={"devices": ["x"]}, failure_gate_percent=10, min_soak_s=0, created_by="t",
        )  # fmt: skip
        s.add(dep)
        s.flush()
        s.add(DeploymentDevice(deployment_id=dep.id, device_id=device_pk, phase=0, status=status,
                               reason="hook failed" if status == RolloutStatus.FAILED else None))  # fmt: skip
        return dep.id


def test_show_device(fleet: tuple[Hub, list[dict[str, Any]], datetime]) -> None:
    hub, specs, _ = fleet
    spec = specs[10]
    with hub.session() as s:
        device = s.scalars(sa.select(Device).where(Device.device_id == spec["device_id"])).one()
        pk, product_id, fingerprint = device.id, device.product_id, device.cert_fingerprint
    first = _deploy(hub, pk, product_id, "r1", RolloutStatus.FAILED)
    second = _deploy(hub, pk, product_id, "r2", RolloutStatus.COMMITTED)

    d = hub.get(f"/devices/{spec['device_id']}").json()
    assert d["device_id"] == spec["device_id"] and d["product"] == "cam"
    assert d["slots"] == {"app": "2.0", "rootfs": "1.0.0"}
    assert d["tags"] == sorted(spec["tags"])
    assert d["state"] == str(spec["state"]) and d["last_seen"] == _t(spec["last_seen"])
    assert d["certificate"]["fingerprint"] == fingerprint
    assert d["enrolled_via"] == "provisioning" and d["revoked"] is False
    assert d["deployments"] == [
        {"id": second, "name": "r2", "status": "active", "phase": 0,
         "device_status": "committed", "device_reason": None},
        {"id": first, "name": "r1", "status": "active", "phase": 0,
         "device_status": "failed", "device_reason": "hook failed"},
    ]  # fmt: skip
    listed = hub.get(f"/devices?q={spec['device_id']}").json()["items"]
    assert listed == [{k: v for k, v in d.items() if k != "deployments"}]
    for missing in ("nobody", "x-" + spec["device_id"], "a" * 200, "bad%20id"):
        assert hub.get(f"/devices/{missing}").status_code == 404, missing


def test_tags_are_replaced(fleet: tuple[Hub, list[dict[str, Any]], datetime]) -> None:
    hub, specs, _ = fleet
    hub.tokens["operator"] = hub.add_token("operator", name="ci-tagger")
    device = specs[0]["device_id"]  # tagged site:lab, ring=canary, eu
    r = hub.put(f"/devices/{device}/tags", token="operator",
                json={"tags": ["site:lab", "ring=beta", "ring=beta", "Zone_1.a"]})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["tags"] == ["Zone_1.a", "ring=beta", "site:lab"]
    assert hub.get(f"/devices/{device}").json()["tags"] == ["Zone_1.a", "ring=beta", "site:lab"]
    assert device in _all(hub, "tag=ring%3Dbeta") and device not in _all(hub, "tag=eu")
    entry = hub.get("/audit?action=device.tags").json()["items"][0]
    assert entry["actor"] == "ci-tagger" and entry["target_id"] == device
    assert entry["details"] == {
        "tags": ["Zone_1.a", "ring=beta", "site:lab"],
        "added": ["Zone_1.a", "ring=beta"],
        "removed": ["eu", "ring=canary"],
    }
    # The same tags again change nothing and record nothing.
    audits = hub.audit_count()
    assert (
        hub.put(
            f"/devices/{device}/tags", json={"tags": ["site:lab", "Zone_1.a", "ring=beta"]}
        ).status_code
        == 200
    )
    assert hub.audit_count() == audits
    # Up to 64, and none.
    tags = [f"t{i}" for i in range(64)]
    assert len(hub.put(f"/devices/{device}/tags", json={"tags": tags}).json()["tags"]) == 64
    assert hub.put(f"/devices/{device}/tags", json={"tags": []}).json()["tags"] == []


def test_revoke_device(fleet: tuple[Hub, list[dict[str, Any]], datetime]) -> None:
    hub, specs, _ = fleet
    device = specs[3]["device_id"]
    hub.tokens["operator"] = hub.add_token("operator", name="security")
    r = hub.post(f"/devices/{device}/revoke", token="operator", json={"reason": "reported stolen"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["revoked"] is True and d["revoke_reason"] == "reported stolen" and d["revoked_at"]
    with hub.session() as s:
        row = s.scalars(sa.select(Device).where(Device.device_id == device)).one()
        assert row.revoked and row.revoked_at is not None
    # Again: the first time and reason stand, nothing is recorded.
    audits = hub.audit_count()
    again = hub.post(f"/devices/{device}/revoke", json={"reason": "other"}).json()
    assert (again["revoke_reason"], again["revoked_at"]) == ("reported stolen", d["revoked_at"])
    assert hub.audit_count() == audits
    entry = hub.get("/audit?action=device.revoke").json()["items"][0]
    assert (entry["actor"], entry["target_id"], entry["details"]) == (
        "security",
        device,
        {"reason": "reported stolen"},
    )
    # Revoked devices are still listed (and say so).
    assert hub.get(f"/devices?q={device}").json()["items"][0]["revoked"] is True


def test_delete_keeps_the_id_reserved(fleet: tuple[Hub, list[dict[str, Any]], datetime]) -> None:
    hub, specs, _ = fleet
    device = specs[4]["device_id"]
    with hub.session() as s:
        row = s.scalars(sa.select(Device).where(Device.device_id == device)).one()
        pk, product_id = row.id, row.product_id
        s.add(DeviceEvent(device_id=pk, report_id="r1", kind="state", state=DeviceState.IDLE))
    assert hub.delete(f"/devices/{device}").status_code == 204

    # Gone from every list, lookup and change...
    assert device not in _all(hub, "")
    assert device not in _all(hub, f"q={device}")
    for method, path, body in (("GET", "", None), ("GET", "/events", None),
                               ("PUT", "/tags", {"tags": []}), ("POST", "/revoke", {"reason": "x"}),
                               ("DELETE", "", None)):  # fmt: skip
        r = hub.call(method, f"/devices/{device}{path}", json=body)
        assert r.status_code == 404, (method, path)
    # ... but the row stays, revoked, without what described the device ...
    with hub.session() as s:
        row = s.get_one(Device, pk)
        assert row.revoked and row.revoke_reason == "deleted"
        assert s.scalars(sa.select(DeviceTag.tag).where(DeviceTag.device_id == pk)).all() == [
            DELETED_TAG
        ]
        for table in (DeviceSlot, DeviceEvent):
            assert (
                s.scalar(sa.select(sa.func.count()).select_from(table).where(table.device_id == pk))
                == 0
            )
    # ... so the id can never be enrolled again: the database itself refuses it.
    with pytest.raises(sa.exc.IntegrityError):
        hub.add_devices([{"device_id": device, "product_id": product_id}])
    entry = hub.get("/audit?action=device.delete").json()["items"][0]
    assert entry["actor"] == ADMIN_ACTOR and entry["target_id"] == device
    assert entry["details"] == {"product": "gw", "hardware_id": "hw1", "was_revoked": False}


def test_events_newest_first_in_pages(fleet: tuple[Hub, list[dict[str, Any]], datetime]) -> None:
    hub, specs, base = fleet
    device = specs[5]["device_id"]
    with hub.session() as s:
        pk = s.scalars(sa.select(Device.id).where(Device.device_id == device)).one()
        other = s.scalars(
            sa.select(Device.id).where(Device.device_id == specs[6]["device_id"])
        ).one()
        for i in range(25):
            # Groups of five share a timestamp: the id orders them.
            s.add(DeviceEvent(device_id=pk, report_id=f"r{i}", kind="progress",
                              state=DeviceState.DOWNLOADING, progress=i * 4,
                              created=base + timedelta(seconds=i // 5),
                              details={"n": i}))  # fmt: skip
        s.add(DeviceEvent(device_id=other, report_id="r0", kind="state", created=base))
    seen: list[int] = []
    cursor = None
    while True:
        page = hub.get(
            f"/devices/{device}/events?limit=10" + (f"&cursor={cursor}" if cursor else "")
        ).json()
        seen += [e["details"]["n"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(24, -1, -1))
    latest = hub.get(f"/devices/{device}/events?limit=1").json()["items"][0]
    assert (
        latest["report_id"] == "r24"
        and latest["progress"] == 96
        and latest["state"] == "downloading"
    )
