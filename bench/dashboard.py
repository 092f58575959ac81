"""Server time of every dashboard page at 100k devices and 1M device events.

Builds a hub on SQLite (the embedded default) with ``--devices`` devices
(tags, slots, states, last-seen times spread over a week), ``--events``
device events, a deployment over half the fleet, an audit log and a month of
daily version counts; then requests each page in-process through the ASGI
app that ``skylift hub serve`` runs (no network, no TLS: the figure is the
server's work) and prints the median of ``--runs`` requests per page.

References measured in the same run, to read the figures against:

- a bare ``SELECT 1`` through the hub's session factory (the floor of any
  database round trip in this process);
- the login page: a template render and no query (the floor of any page).

Not a test: nothing is asserted. ``make bench-dashboard``; ``--quick`` for
10k devices and 100k events.
"""

from __future__ import annotations

import argparse
import functools
import random
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio.from_thread
import httpx
import sqlalchemy as sa

from skylift.hub.app import make_api_app
from skylift.hub.auth import hash_password
from skylift.hub.db.models import (
    AuditEntry,
    Deployment,
    DeploymentDevice,
    DeploymentPhase,
    DeploymentStatus,
    Device,
    DeviceEvent,
    DeviceSlot,
    DeviceState,
    DeviceTag,
    EnrollmentMethod,
    Organisation,
    Product,
    Release,
    Role,
    RolloutStatus,
    User,
    VersionCount,
)
from skylift.hub.setup import init_hub, open_hub

PASSWORD = "bench password 1234"  # noqa: S105 - a throwaway hub's user
_STATES = (
    [DeviceState.IDLE] * 80
    + [DeviceState.COMMITTED] * 14
    + [DeviceState.FAILED] * 3
    + [DeviceState.ROLLED_BACK, DeviceState.DOWNLOADING, DeviceState.INSTALLED]
)
_VERSIONS = ["1.0.0", "1.1.0", "1.2.0", "1.3.0"]


def _populate(engine: sa.Engine, devices: int, events: int, now: datetime) -> None:
    rng = random.Random(7)
    with engine.begin() as conn:
        org = conn.execute(sa.select(Organisation.id)).scalar_one()
        conn.execute(
            sa.insert(User),
            [
                {
                    "org_id": org,
                    "email": "bench@example.com",
                    "password_hash": hash_password(PASSWORD),
                    "role": Role.OPERATOR,
                    "created": now,
                    "disabled": False,
                }
            ],
        )
        product = conn.execute(
            sa.insert(Product)
            .values(org_id=org, name="gw", release_threshold=1, created=now)
            .returning(Product.id)
        ).scalar_one()
        release = conn.execute(
            sa.insert(Release)
            .values(
                product_id=product,
                version="1.3.0",
                target_path="1.3.0.head",
                length=1,
                hashes={"sha256": "0" * 64},
                custom={"hardware_ids": ["hw1"]},
                manifest_digest="0" * 64,
                payload_size=1,
                stored_size=1,
                created=now,
                created_by="bench",
            )
            .returning(Release.id)
        ).scalar_one()
        batch = 20_000
        for start in range(0, devices, batch):
            rows = []
            for i in range(start, min(devices, start + batch)):
                seen = now - timedelta(seconds=rng.randrange(7 * 86400)) if i % 10 else None
                rows.append(
                    {
                        "id": i + 1,
                        "device_id": f"gw-{i:06d}",
                        "org_id": org,
                        "product_id": product,
                        "hardware_id": f"hw{i % 3 + 1}",
                        "cert_fingerprint": secrets.token_hex(32),
                        "cert_not_after": now + timedelta(days=3650),
                        "enrolled_via": EnrollmentMethod.PROVISIONING,
                        "revoked": i % 500 == 0,
                        "state": _STATES[i % len(_STATES)],
                        "last_seen": seen,
                        "created": now - timedelta(days=30),
                    }
                )
            conn.execute(sa.insert(Device), rows)
            conn.execute(
                sa.insert(DeviceSlot),
                [
                    {
                        "device_id": r["id"],
                        "slot_class": "rootfs",
                        "version": _VERSIONS[min(3, int(rng.expovariate(1.0)))],
                        "updated": now,
                    }
                    for r in rows
                ],
            )
            conn.execute(
                sa.insert(DeviceTag),
                [{"device_id": r["id"], "tag": f"site:{r['id'] % 50}"} for r in rows]
                + [
                    {"device_id": r["id"], "tag": "ring=canary"} for r in rows if r["id"] % 100 == 0
                ],
            )
        per = max(1, events // devices)
        for start in range(0, devices, batch // per or 1):
            ev = []
            for i in range(start, min(devices, start + (batch // per or 1))):
                for n in range(per):
                    ev.append(
                        {
                            "device_id": i + 1,
                            "report_id": f"r{n}",
                            "kind": "state",
                            "state": DeviceState.DOWNLOADING if n % 5 else DeviceState.COMMITTED,
                            "progress": n * 10 % 100,
                            "reason": None,
                            "details": {"version": "1.3.0"},
                            "created": now - timedelta(minutes=per - n, seconds=i % 60),
                        }
                    )
            conn.execute(sa.insert(DeviceEvent), ev)
        dep = conn.execute(
            sa.insert(Deployment)
            .values(
                org_id=org,
                product_id=product,
                release_id=release,
                name="big",
                selector={},
                status=DeploymentStatus.ACTIVE,
                failure_gate_percent=5,
                min_soak_s=0,
                allow_downgrade=False,
                current_phase=1,
                created=now,
                created_by="bench",
                updated=now,
            )
            .returning(Deployment.id)
        ).scalar_one()
        conn.execute(
            sa.insert(DeploymentPhase),
            [
                {"deployment_id": dep, "phase": 0, "percent": 10, "started_at": now},
                {"deployment_id": dep, "phase": 1, "percent": 100, "started_at": now},
            ],
        )
        statuses = list(RolloutStatus)
        half = devices // 2
        for start in range(0, half, batch):
            conn.execute(
                sa.insert(DeploymentDevice),
                [
                    {
                        "deployment_id": dep,
                        "device_id": i + 1,
                        "phase": 0 if i < half // 10 else 1,
                        "status": statuses[i % len(statuses)],
                        "reason": "disk full" if i % 7 == 0 else None,
                        "updated": now,
                    }
                    for i in range(start, min(half, start + batch))
                ],
            )
        conn.execute(
            sa.insert(AuditEntry),
            [
                {
                    "org_id": org,
                    "actor": f"user{i % 7}@example.com",
                    "action": ("device.tags", "deployment.pause", "release.create")[i % 3],
                    "target_type": "device",
                    "target_id": f"gw-{i:06d}",
                    "details": {"n": i},
                    "created": now - timedelta(seconds=i),
                }
                for i in range(20_000)
            ],
        )
        conn.execute(
            sa.insert(VersionCount),
            [
                {
                    "org_id": org,
                    "day": (now - timedelta(days=d)).date(),
                    "slot_class": "rootfs",
                    "version": v,
                    "devices": devices // 4,
                }
                for d in range(1, 30)
                for v in _VERSIONS
            ],
        )
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="10k devices, 100k events")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.events = 10_000, 100_000
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="skylift-bench-dashboard-") as tmp:
        result = init_hub(
            Path(tmp) / "hub",
            organisation="bench",
            admin_email="admin@example.com",
            gateway_port=0,
            api_port=0,
        )
        ctx = open_hub(result.config)
        engine: sa.Engine = ctx.sessions.kw["bind"]
        started = time.perf_counter()
        _populate(engine, args.devices, args.events, now)
        with engine.connect() as conn:
            n_dev = conn.execute(sa.select(sa.func.count()).select_from(Device)).scalar_one()
            n_ev = conn.execute(sa.select(sa.func.count()).select_from(DeviceEvent)).scalar_one()
        print(
            f"database: SQLite, {n_dev} devices, {n_ev} events, 50% of the fleet in one "
            f"deployment, 20k audit entries (built in {time.perf_counter() - started:.0f} s)"
        )
        app = make_api_app(ctx)
        with anyio.from_thread.start_blocking_portal() as portal:
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="https://hub", timeout=60
            )

            def get(path: str) -> httpx.Response:
                return portal.call(
                    functools.partial(client.get, path, headers={"Accept": "text/html"})
                )

            def post(path: str, data: dict[str, str]) -> httpx.Response:
                return portal.call(functools.partial(client.post, path, data=data))

            import re

            login = get("/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)  # type: ignore[union-attr]
            r = post("/login", {"csrf": csrf, "email": "bench@example.com", "password": PASSWORD})
            assert r.status_code == 303, r.text

            def timed(fn: object, runs: int) -> float:
                samples = []
                for _ in range(runs):
                    t = time.perf_counter()
                    fn()  # type: ignore[operator]
                    samples.append((time.perf_counter() - t) * 1000)
                return statistics.median(samples)

            def select_one() -> None:
                with ctx.sessions() as s:
                    s.execute(sa.text("SELECT 1")).scalar_one()

            def login_page() -> None:
                assert get("/login").status_code == 200

            def count_fleet() -> None:
                from skylift.hub.dashboard.queries import fleet_overview

                with ctx.sessions() as s:
                    fleet_overview(s, 1, datetime.now(UTC))

            select_ms = timed(select_one, 200)
            # What the overview's figures cost when counted (the background loop
            # does it every few seconds while someone looks; pages read the result).
            counting_ms = timed(count_fleet, 5)
            trivial_ms = timed(login_page, args.runs * 3)
            middle = f"gw-{args.devices // 2:06d}"
            cursor_page = get("/devices")
            nxt = re.search(r'rel="next" href="([^"]+)"', cursor_page.text)
            page2 = nxt.group(1).replace("&amp;", "&") if nxt else "/devices"
            pages = [
                ("overview", "/"),
                ("overview, live part", "/overview/live"),
                ("devices, first page", "/devices"),
                ("devices, next page", page2),
                ("devices, search 'gw-0123'", "/devices?q=gw-0123"),
                (
                    "devices, tag + hardware + state",
                    "/devices?tags=site:7&hardware=hw2&state=failed",
                ),
                ("devices, seen in the last hour", "/devices?seen=1h"),
                ("devices, version 1.2.0", "/devices?version=1.2.0"),
                ("device detail (10 events)", f"/devices/{middle}"),
                ("device detail, live part", f"/devices/{middle}/live"),
                ("releases", "/releases"),
                ("deployments", "/deployments"),
                ("deployment (50k devices), live", "/deployments/1/live"),
                ("deployment (50k devices)", "/deployments/1"),
                ("new deployment form", "/deployments/new"),
                ("live count, whole fleet", "/deployments/new/count?release=gw/1.3.0"),
                ("live count, tag", "/deployments/new/count?release=gw/1.3.0&tags=site:3"),
                ("audit log", "/audit"),
                ("audit log, action filter", "/audit?action=deployment.pause"),
                ("keys", "/keys"),
            ]
            print(
                f"references: bare SELECT 1 {select_ms:.2f} ms; login page (render, no query) "
                f"{trivial_ms:.2f} ms"
            )
            print(f"{'page':40} {'median ms':>10} {'x login page':>13} {'x SELECT 1':>11}")
            worst = 0.0
            for name, path in pages:
                r = get(path)
                assert r.status_code == 200, (path, r.status_code, r.text[:300])
                ms = timed(lambda p=path: get(p), args.runs)  # type: ignore[misc]
                worst = max(worst, ms)
                print(f"{name:40} {ms:10.1f} {ms / trivial_ms:13.1f} {ms / select_ms:11.0f}")
            print(f"slowest page: {worst:.1f} ms (budget 200 ms)")
            print(
                f"overview figures counted (background, at most every 5 s while watched): "
                f"{counting_ms:.1f} ms"
            )
            portal.call(client.aclose)
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
