"""``POST /device/v1/reports``: stored once, device state and rollout rows moved, bad input refused."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from skylift.hub import bandwidth
from skylift.hub.api.deployments import deployment_status
from skylift.hub.db.models import (
    Deployment,
    DeploymentDevice,
    DeploymentStatus,
    DeviceEvent,
    DeviceSlot,
    DeviceState,
    Release,
    RolloutStatus,
)

from .conftest import VERSION, Enrolled, Hub


def _deployment(
    hub: Hub, device: Enrolled, status: DeploymentStatus = DeploymentStatus.ACTIVE
) -> int:
    """A deployment of release 1.0.0 holding ``device`` in phase 0; its id."""
    row = hub.device_row(device.device_id)
    with hub.ctx.sessions.begin() as session:
        release_id = session.scalar(
            select(Release.id).where(
                Release.product_id == hub.product_id, Release.version == VERSION
            )
        )
        assert release_id is not None
        deployment = Deployment(
            org_id=hub.org_id, product_id=hub.product_id, release_id=release_id,
            name=f"rollout-{device.device_id}-{status}", selector={}, status=status,
            failure_gate_percent=10.0, min_soak_s=0, created_by="test",
        )  # fmt: skip
        session.add(deployment)
        session.flush()
        session.add(DeploymentDevice(deployment_id=deployment.id, device_id=row.id, phase=0))
        return deployment.id


def _rollout_status(hub: Hub, deployment_id: int) -> tuple[RolloutStatus, str | None]:
    with hub.ctx.sessions() as session:
        row = session.scalars(
            select(DeploymentDevice).where(DeploymentDevice.deployment_id == deployment_id)
        ).one()
        return row.status, row.reason


def _events(hub: Hub, device: Enrolled) -> list[str]:
    pk = hub.device_row(device.device_id).id
    with hub.ctx.sessions() as session:
        return list(
            session.scalars(
                select(DeviceEvent.report_id)
                .where(DeviceEvent.device_id == pk)
                .order_by(DeviceEvent.id)
            )
        )


def test_reports_are_stored_once(hub: Hub) -> None:
    device = hub.enroll()
    client = hub.client(device)
    reports = [
        {"report_id": "r-1", "kind": "update", "state": "downloading", "progress": 40,
         "device_time": "2026-11-23T19:00:00Z", "details": {"version": VERSION}},
        {"report_id": "r-2", "kind": "update", "state": "installed", "progress": 100},
    ]  # fmt: skip
    first = client.post("/reports", json={"reports": reports})
    assert first.status_code == 200, first.text
    assert first.json() == {"stored": 2, "duplicates": 0}
    again = client.post("/reports", json={"reports": reports})
    assert again.json() == {"stored": 0, "duplicates": 2}
    mixed = client.post(
        "/reports", json={"reports": [*reports, {"report_id": "r-3", "kind": "heartbeat"}]}
    )
    assert mixed.json() == {"stored": 1, "duplicates": 2}
    # the same id twice in one batch counts once
    twice = client.post("/reports", json={"reports": [{"report_id": "r-4", "kind": "x"}] * 2})
    assert twice.json() == {"stored": 1, "duplicates": 1}
    assert _events(hub, device) == ["r-1", "r-2", "r-3", "r-4"]
    row = hub.device_row(device.device_id)
    assert row.state is DeviceState.INSTALLED  # from the newest report with a state
    assert row.progress == 100
    assert row.last_report_at is not None


def test_the_same_report_id_of_two_devices_is_two_reports(hub: Hub) -> None:
    a, b = hub.enroll(), hub.enroll()
    report = {"reports": [{"report_id": "boot-1", "kind": "boot"}]}
    assert hub.client(a).post("/reports", json=report).json() == {"stored": 1, "duplicates": 0}
    assert hub.client(b).post("/reports", json=report).json() == {"stored": 1, "duplicates": 0}


def test_reports_move_the_rollout_and_the_slot(hub: Hub) -> None:
    device = hub.enroll()
    client = hub.client(device)
    active = _deployment(hub, device)
    aborted = _deployment(hub, device, DeploymentStatus.ABORTED)

    def report(n: int, state: str, reason: str | None = None, **details: Any) -> None:
        doc: dict[str, Any] = {"report_id": f"step-{n}", "kind": "update", "state": state}
        if reason:
            doc["reason"] = reason
        if details:
            doc["details"] = details
        assert client.post("/reports", json={"reports": [doc]}).status_code == 200

    steps = [
        ("downloading", None, {}, RolloutStatus.DOWNLOADING),
        ("installing", None, {}, RolloutStatus.DOWNLOADING),
        ("trial", None, {}, RolloutStatus.INSTALLED),
        ("committed", None, {"slot_class": "rootfs", "version": VERSION}, RolloutStatus.COMMITTED),
        ("downloading", None, {}, RolloutStatus.COMMITTED),  # a late report cannot take it back
        ("failed", "hook post-install exited 3", {}, RolloutStatus.FAILED),
    ]
    for n, (state, reason, details, expected) in enumerate(steps):
        report(n, state, reason, **details)
        assert _rollout_status(hub, active)[0] is expected, state
    assert _rollout_status(hub, active) == (RolloutStatus.FAILED, "hook post-install exited 3")
    assert _rollout_status(hub, aborted) == (RolloutStatus.PENDING, None)  # only live deployments
    row = hub.device_row(device.device_id)
    assert (row.state, row.state_reason) == (DeviceState.FAILED, "hook post-install exited 3")
    with hub.ctx.sessions() as session:
        slots = session.execute(
            select(DeviceSlot.slot_class, DeviceSlot.version).where(DeviceSlot.device_id == row.id)
        ).all()
    assert [tuple(s) for s in slots] == [("rootfs", VERSION)]


def test_a_report_naming_another_version_leaves_this_rollout_alone(hub: Hub) -> None:
    device = hub.enroll()
    deployment = _deployment(hub, device)
    doc = {"report_id": "v2", "kind": "update", "state": "failed", "details": {"version": "2.0.0"}}
    assert hub.client(device).post("/reports", json={"reports": [doc]}).status_code == 200
    assert _rollout_status(hub, deployment)[0] is RolloutStatus.PENDING


def _report(**fields: Any) -> dict[str, Any]:
    return {"report_id": "ok-1", "kind": "update", **fields}


BAD: list[tuple[str, Any, int]] = [
    ("bad report id", {"reports": [_report(report_id="a b")]}, 400),
    ("long report id", {"reports": [_report(report_id="a" * 65)]}, 400),
    ("no kind", {"reports": [{"report_id": "x"}]}, 400),
    ("long kind", {"reports": [_report(kind="k" * 33)]}, 400),
    ("unknown state", {"reports": [_report(state="exploded")]}, 400),
    ("progress over 100", {"reports": [_report(progress=101)]}, 400),
    ("progress a bool", {"reports": [_report(progress=True)]}, 400),
    ("progress a float", {"reports": [_report(progress=1.5)]}, 400),
    ("long reason", {"reports": [_report(reason="r" * 2001)]}, 400),
    ("details not an object", {"reports": [_report(details=[1])]}, 400),
    ("details too big", {"reports": [_report(details={"log": "x" * 17_000})]}, 400),
    ("bad device time", {"reports": [_report(device_time="yesterday")]}, 400),
    ("naive device time", {"reports": [_report(device_time="2026-11-23T19:00:00")]}, 400),
    ("unknown field", {"reports": [_report(admin=True)]}, 400),
    (
        "bad slot class",
        {"reports": [_report(state="committed", details={"slot_class": "../x", "version": "1"})]},
        400,
    ),
    ("not a list", {"reports": {"report_id": "x"}}, 400),
    ("extra top-level field", {"reports": [], "more": 1}, 400),
    ("too many", {"reports": [_report(report_id=f"n{i}") for i in range(101)]}, 400),
    # a good report followed by a bad one: nothing of the batch is stored
    ("one bad in a batch", {"reports": [_report(report_id="good"), _report(report_id="")]}, 400),
]


@pytest.mark.parametrize(("body", "status"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_malformed_reports_store_nothing(
    hub: Hub, device: Enrolled, body: Any, status: int
) -> None:
    before = hub.snapshot()
    answer = hub.client(device).post("/reports", json=body)
    assert answer.status_code == status, answer.text
    assert list(answer.json()) == ["error"]
    assert hub.snapshot() == before


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"reports": [', 400),
        (b"null", 400),
        (b'{"reports": ["' + b"x" * (1024 * 1024) + b'"]}', 413),
    ],
    ids=["malformed JSON", "not an object", "over 1 MiB"],
)
def test_unreadable_bodies_store_nothing(
    hub: Hub, device: Enrolled, content: bytes, status: int
) -> None:
    before = hub.snapshot()
    answer = hub.client(device).post(
        "/reports", content=content, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == status
    assert hub.snapshot() == before


def test_installed_and_committed_reports_account_the_bytes_downloaded(hub: Hub) -> None:
    devices = [hub.enroll() for _ in range(4)]
    deployment = _deployment(hub, devices[0])
    with hub.ctx.sessions.begin() as session:
        for d in devices[1:]:
            pk = hub.device_row(d.device_id).id
            session.add(DeploymentDevice(deployment_id=deployment, device_id=pk, phase=0))

    def send(device: Enrolled, n: int, state: str, details: dict[str, Any]) -> None:
        doc = {"report_id": f"bw-{n}", "kind": "update", "state": state,
               "details": {"version": VERSION, **details}}  # fmt: skip
        answer = hub.client(device).post("/reports", json={"reports": [doc]})
        assert answer.status_code == 200, answer.text

    send(devices[0], 1, "installed", {"downloaded_bytes": 1000, "image_bytes": 8000})
    send(devices[0], 2, "committed", {"downloaded_bytes": 1200, "image_bytes": 8000,
                                      "slot_class": "rootfs"})  # fmt: skip
    send(devices[1], 1, "committed", {"downloaded_bytes": 3000, "image_bytes": 8000,
                                      "slot_class": "rootfs"})  # fmt: skip
    # The device's word, but not in range or not integers: kept as an event, not counted.
    send(devices[2], 1, "installed", {"downloaded_bytes": "lots", "image_bytes": 8000})
    send(devices[2], 2, "installed", {"downloaded_bytes": -1, "image_bytes": 8000})
    send(devices[2], 3, "installed", {"downloaded_bytes": 2**61, "image_bytes": 8000})
    send(devices[2], 4, "downloading", {"downloaded_bytes": 5, "image_bytes": 8000})
    # A device that rolled back sends its installed report with the rest after its reboot:
    # only the newest moves the rollout, but the download was spent all the same.
    batch = [
        {"report_id": "rb-1", "kind": "update", "state": "installed",
         "details": {"version": VERSION, "downloaded_bytes": 500, "image_bytes": 8000}},
        {"report_id": "rb-2", "kind": "update", "state": "rolled_back", "reason": "health check",
         "details": {"version": VERSION}},
    ]  # fmt: skip
    assert hub.client(devices[3]).post("/reports", json={"reports": batch}).status_code == 200

    with hub.ctx.sessions() as session:
        totals = bandwidth.for_deployment(session, deployment)
        release_id = session.scalar(
            select(Deployment.release_id).where(Deployment.id == deployment)
        )
        assert release_id is not None
        per_release = bandwidth.by_release(session, [release_id, 10**9])
        status = deployment_status(session, session.get_one(Deployment, deployment))
    expected = {"devices": 3, "downloaded_bytes": 4700, "image_bytes": 24000,
                "saved_bytes": 19300, "saved_percent": 80.4}  # fmt: skip
    assert totals == expected
    assert status["bandwidth"] == expected
    assert per_release[release_id]["downloaded_bytes"] >= 4700  # other tests' deployments too
    assert per_release[10**9] == {"devices": 0, "downloaded_bytes": 0, "image_bytes": 0,
                                  "saved_bytes": 0, "saved_percent": None}  # fmt: skip
