"""What the pages show: figures that agree with the fleet, filters, keyset pages, no N+1."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
import sqlalchemy as sa

from skylift.hub.db.models import (
    DeltaStatus,
    DeploymentDevice,
    Device,
    DeviceEvent,
    DeviceState,
    Release,
    ReleaseDelta,
    VersionCount,
)

from .conftest import Dashboard, Exploded

N = 120


def _spec(i: int) -> dict[str, object]:
    state = (DeviceState.FAILED if i < 5 else DeviceState.ROLLED_BACK if i < 8
             else DeviceState.COMMITTED)  # fmt: skip
    return {"state": state, "hw": "hw2" if i >= 100 else "hw1",
            "tags": ["site:lab"] if i % 2 == 0 else [],
            "slots": {"rootfs": "1.0.0"} if i < 60 else {"rootfs": "1.1.0"} if i < 90 else {}}  # fmt: skip


@pytest.fixture(scope="module")
def fleet(shared: Dashboard) -> Dashboard:
    h = shared.hub
    now = h.clock()
    ids = [f"dev-{i:03d}" for i in range(N)]
    for hw in ("hw1", "hw2"):
        chosen = [d for i, d in enumerate(ids) if _spec(i)["hw"] == hw]
        h.add_devices(chosen, hardware=hw,
                      tags={d: _spec(int(d[4:]))["tags"] for d in chosen},  # type: ignore[misc]
                      slots={d: _spec(int(d[4:]))["slots"] for d in chosen})  # type: ignore[misc]  # fmt: skip
    h.add_devices(["dev-revoked"], revoked=("dev-revoked",))
    with h.session() as s:
        pks = dict(s.execute(sa.select(Device.device_id, Device.id)).all())
        for i, d in enumerate(ids):
            seen = (
                now - timedelta(minutes=10)
                if i < 30
                else now - timedelta(hours=5)
                if i < 60
                else None
            )
            s.execute(sa.update(Device).where(Device.id == pks[d])
                      .values(state=_spec(i)["state"], last_seen=seen))  # fmt: skip
        # dev-001's timeline: 60 reports, the newest a rollback with hook output.
        for n in range(60):
            s.add(DeviceEvent(device_id=pks["dev-001"], report_id=f"r{n}", kind="state",
                              state=DeviceState.DOWNLOADING, progress=n, created=now - timedelta(minutes=60 - n)))  # fmt: skip
        s.add(DeviceEvent(device_id=pks["dev-001"], report_id="rb", kind="state",
                          state=DeviceState.ROLLED_BACK, reason="health_check hook exited with status 1",
                          details={"version": "1.1.0", "hook_output": "sensor <b>bus</b> timeout"},
                          created=now))  # fmt: skip
        org = h.org_id()
        for days, counts in ((2, {"1.0.0": 90}), (1, {"1.0.0": 70, "1.1.0": 20})):
            for version, n in counts.items():
                s.add(VersionCount(org_id=org, day=(now - timedelta(days=days)).date(),
                                   slot_class="rootfs", version=version, devices=n))  # fmt: skip
    r = h.deploy(version="1.1.0", selector={"devices": ["dev-060"]}, phases=[{"percent": 100}],
                 allow_downgrade=True)  # fmt: skip
    assert r.status_code == 409  # runs 1.1.0 already: nothing to update
    r = h.deploy(version="1.1.0", selector={"devices": ["dev-010", "dev-011"]},
                 phases=[{"percent": 100}])  # fmt: skip
    assert r.status_code == 201, r.text
    return shared


@pytest.fixture(scope="module")
def viewer(fleet: Dashboard) -> object:
    return fleet.browser("viewer@acme.example")


def _figure(page: str, name: str) -> int:
    found = re.search(rf'data-figure="{name}">(\d+)<', page)
    assert found, name
    return int(found.group(1))


def _device_ids(page: str) -> list[str]:
    return re.findall(r'<td><a href="/devices/([^"]+)">', page)


def test_overview_figures_agree_with_the_fleet(fleet: Dashboard, viewer: object) -> None:
    page = viewer.get("/").text  # type: ignore[attr-defined]
    assert _figure(page, "devices") == N  # the revoked one is counted apart
    assert (_figure(page, "seen-hour"), _figure(page, "seen-day")) == (30, 60)
    assert (_figure(page, "failed"), _figure(page, "rolled-back")) == (5, 3)
    assert re.search(r">1 revoked<|<span class=\"figure\">1</span> revoked", page)
    rows = re.findall(
        r"<tr><td>rootfs</td><td><a [^>]+>([^<]+)</a></td><td class=\"num\">(\d+)</td>", page
    )
    assert rows == [("1.0.0", "60"), ("1.1.0", "30")]
    # The chart: two days of history and today, a line per version, the legend.
    assert page.count('<polyline class="line') == 2 and "1.1.0 33% now" in page
    assert "rollout-1" in page  # the deployment in progress
    live = viewer.get("/overview/live")  # type: ignore[attr-defined]
    assert (
        live.status_code == 200 and "<html" not in live.text and _figure(live.text, "devices") == N
    )


def test_device_search_filters_and_keyset_pages(fleet: Dashboard, viewer: object) -> None:
    get = viewer.get  # type: ignore[attr-defined]
    page = get("/devices?q=DEV-01").text
    assert _device_ids(page) == [f"dev-{i:03d}" for i in range(10, 20)]
    assert "<strong>10</strong> devices match" in page
    page = get("/devices?tags=site:lab&hardware=hw2").text
    assert _device_ids(page) == [f"dev-{i:03d}" for i in range(100, 120, 2)]
    assert _device_ids(get("/devices?state=rolled_back").text) == ["dev-005", "dev-006", "dev-007"]
    assert _device_ids(get("/devices?state=revoked").text) == ["dev-revoked"]
    assert "<strong>61</strong> devices match" in get("/devices?seen=never").text
    assert len(_device_ids(get("/devices?version=1.1.0").text)) == 30
    # Every device once, in order, over pages of 50.
    seen, url = [], "/devices"
    for _ in range(5):
        page = get(url).text
        seen += _device_ids(page)
        nxt = re.search(r'<a rel="next" href="([^"]+)">', page)
        if nxt is None:
            break
        url = html.unescape(nxt.group(1))
    assert len(seen) == N + 1 and len(set(seen)) == N + 1 and seen[:N] == sorted(seen[:N])


@pytest.mark.parametrize(
    ("query", "message"),
    [("state=bogus", "state must be one of"), ("colour=red", "unknown query parameter 'colour'"),
     ("cursor=AAAA", "cursor is not valid for this list"), ("tags=bad%21tag", "must match")],
)  # fmt: skip
def test_bad_filters_are_one_line_400s(
    fleet: Dashboard, viewer: object, query: str, message: str
) -> None:
    r = viewer.get(f"/devices?{query}")  # type: ignore[attr-defined]
    assert r.status_code == 400
    alert = html.unescape(r.text.split('role="alert">', 1)[1].split("</p>", 1)[0])
    assert message in alert and "\n" not in alert


def test_device_page_shows_reasons_hook_output_and_pages_its_timeline(
    fleet: Dashboard, viewer: object
) -> None:
    get = viewer.get  # type: ignore[attr-defined]
    page = get("/devices/dev-001").text
    assert "health_check hook exited with status 1" in page
    assert "sensor &lt;b&gt;bus&lt;/b&gt; timeout" in page  # escaped, never markup
    assert page.count('<li class="event') == 50
    older = html.unescape(re.search(r'<a href="([^"]+)">Older reports', page).group(1))  # type: ignore[union-attr]
    rest = get(older).text
    assert rest.count('<li class="event') == 11 and "Older reports" not in rest
    assert "data-paused" in rest  # an older page is not replaced by live updates
    page = get("/devices/dev-010").text
    assert '<a href="/deployments/1">rollout-1</a>' in page
    assert get("/devices/their-1").status_code == 404


def test_devices_of_another_organisation_are_not_found(fleet: Dashboard) -> None:
    b = fleet.browser("admin@other.example")
    assert b.get("/devices/dev-001").status_code == 404
    assert "<strong>0</strong> devices match" in b.get("/devices").text
    assert b.get("/deployments/1").status_code == 404


def test_release_page_shows_the_delta_a_device_saves(
    fleet: Dashboard, viewer: object, v1: Exploded, v2: Exploded
) -> None:
    page = viewer.get("/releases").text  # type: ignore[attr-defined]
    full = sum(len(stored) for _, stored in v2.chunks.values())
    fetched = sum(len(stored) for d, (_, stored) in v2.chunks.items() if d not in v1.chunks)
    assert 0 < fetched < full
    assert f'data-saved="{full - fetched}"' in page
    assert "from 1.0.0: fetches" in page and "hw1" in page and "rootfs → rootfs" in page
    from skylift.hub.dashboard.queries import ReleaseCache  # noqa: F401 - cached: the same again

    assert viewer.get("/releases").text.count("data-saved=") == 1  # type: ignore[attr-defined]


def test_audit_log_filters(fleet: Dashboard, viewer: object) -> None:
    get = viewer.get  # type: ignore[attr-defined]
    page = get("/audit?action=deployment.create").text
    assert page.count("<td>deployment.create</td>") == 1
    assert "<td>release.create</td>" not in page
    page = get("/audit?target=deployment:1").text
    assert "deployment.create" in page
    r = get("/audit?target=nonsense")
    assert r.status_code == 400 and "target must be TYPE:ID" in r.text


@contextmanager
def _statements(dash: Dashboard) -> Iterator[list[str]]:
    engine = dash.hub.ctx.sessions.kw["bind"]
    seen: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


@pytest.mark.parametrize(
    ("few", "many"),
    [("/devices?state=rolled_back", "/devices?hardware=hw2"), ("/devices/dev-119", "/devices/dev-001"),
     ("/audit?action=deployment.create", "/audit")],
)  # fmt: skip
def test_pages_cost_the_same_queries_for_one_row_or_fifty(
    fleet: Dashboard, viewer: object, few: str, many: str
) -> None:
    counts = []
    for path in (few, many):
        with _statements(fleet) as seen:
            assert viewer.get(path).status_code == 200  # type: ignore[attr-defined]
        counts.append(len(seen))
    assert counts[0] == counts[1] <= 12, counts


def test_deployment_and_release_pages_show_what_the_fleet_downloaded(
    fleet: Dashboard, viewer: object
) -> None:
    get = viewer.get  # type: ignore[attr-defined]
    assert "No device has reported what it downloaded yet." in get("/deployments/1").text
    with fleet.hub.ctx.sessions.begin() as s:
        rows = s.scalars(
            sa.select(DeploymentDevice)
            .where(DeploymentDevice.deployment_id == 1)
            .order_by(DeploymentDevice.device_id)
            .limit(2)
        ).all()
        assert len(rows) == 2
        for row, down in zip(rows, (1_000_000, 3_000_000), strict=True):
            row.downloaded_bytes, row.image_bytes = down, 16_000_000
    try:
        page = get("/deployments/1").text
        assert 'data-bandwidth-devices="2"' in page
        assert 'data-saved="28000000"' in page and "(87.5%)" in page
        assert 'data-fleet-devices="2"' in get("/releases").text
    finally:
        with fleet.hub.ctx.sessions.begin() as s:
            s.execute(
                sa.update(DeploymentDevice)
                .where(DeploymentDevice.deployment_id == 1)
                .values(downloaded_bytes=None, image_bytes=None)
            )


def test_release_page_lists_the_per_pair_deltas(released: Dashboard) -> None:
    h = released.hub
    with h.session() as s:
        ids = dict(s.execute(sa.select(Release.version, Release.id)).all())
        common = {"release_id": ids["1.1.0"], "from_release_id": ids["1.0.0"]}
        s.add(ReleaseDelta(**common, payload="rootfs", from_sha256="a" * 64, from_size=4096,
                           status=DeltaStatus.READY, length=12_345, sha256="b" * 64,
                           plan_bytes=1_100_000, attempts=1))  # fmt: skip
        s.add(ReleaseDelta(**common, payload="app", from_sha256="c" * 64, from_size=4096,
                           status=DeltaStatus.FAILED, error="the pack <rootfs.pack> is missing",
                           attempts=2))  # fmt: skip
    page = released.browser("viewer@acme.example").get("/releases").text
    assert page.count('data-delta="ready"') == 1 and page.count('data-delta="failed"') == 1
    assert "from 1.0.0 (rootfs):" in page and "<strong>12.1 KiB</strong> instead of 1.0 MiB" in page
    assert "failed (2 attempts)" in page
    # The error is the hub's one line, escaped.
    assert "the pack &lt;rootfs.pack&gt; is missing" in page and "<rootfs.pack>" not in page
    # The first release has none.
    assert page.count('<span class="muted">none</span>') == 1
