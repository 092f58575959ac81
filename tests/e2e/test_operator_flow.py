"""The operator's night, through the real CLI against a real hub and real devices.

Devices enroll through the gateway (mutual TLS) with a provisioning key the
CLI created, report what they run, and then every operator command runs as a
``skylift`` subprocess: provisioning keys, signer CAs, the device list with
its filters, show, tag, revoke (the gateway refuses the revoked device's next
request), events, the audit log, and a two-phase deployment from creation
through pause, resume and abort, its printed and JSON status checked against
the database. Refused commands print one ``error:`` line, exit 1 and change
nothing.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from skylift.hub import ca
from skylift.hub.db.models import (
    AuditEntry,
    Deployment,
    DeploymentDevice,
    DeploymentPhase,
    Device,
    DeviceEvent,
    DeviceTag,
    ProvisioningKey,
    SignerCA,
)

from .conftest import PRODUCT, Cli, Hub, table_snapshot
from .conftest import Device as Enrolled

#: Enrolled by ``fleet``: id -> hardware id. pump-004 never reports a version.
DEVICES = {"pump-001": "hw1", "pump-002": "hw1", "pump-003": "hw1", "pump-004": "hw2",
           "pump-099": "hw1"}  # fmt: skip


@dataclass
class Fleet:
    hub: Hub
    devices: dict[str, Enrolled]
    key_id: int
    key: str

    @property
    def cli(self) -> Cli:
        return self.hub.cli


@pytest.fixture(scope="module")
def fleet(released: Hub) -> Fleet:
    """Devices enrolled with a provisioning key made by ``skylift provisioning create``."""
    hub, cli = released, released.cli
    made = cli("provisioning", "create", PRODUCT, "line-1", "--max-uses", "10", "--expires", "30d")
    key = made.stdout.strip()
    # The key alone on stdout, so that it can be piped; nothing of it on stderr.
    assert made.stdout == key + "\n" and key.startswith("pk_")
    cli.secrets.add(key)
    assert key not in made.stderr and "shown only now" in made.stderr
    devices = {d: hub.enroll(d, key, hw) for d, hw in DEVICES.items()}
    for device_id, device in devices.items():
        if device_id != "pump-004":
            answer = device.report(
                "committed", details={"slot_class": "rootfs", "version": "1.0.0"}
            )
            assert answer.status_code == 200, answer.text
    keys = json.loads(cli("provisioning", "list", PRODUCT, "--json").stdout)
    assert [(k["name"], k["uses"], k["max_uses"], k["revoked"]) for k in keys] == [
        ("line-1", len(DEVICES), 10, False)
    ]
    return Fleet(hub, devices, keys[0]["id"], key)


def _device(hub: Hub, device_id: str) -> Device:
    row: Device = hub.scalar_rows(select(Device).where(Device.device_id == device_id))[0]
    return row


def test_login_keeps_the_token_private(released: Hub) -> None:
    path = released.tmp / "config" / "skylift" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    before = path.read_bytes()
    # A wrong token is refused (401) and the stored credentials stay as they were.
    bad = released.cli("login", released.api_url, "--token", "-", "--ca", str(released.ca_path),
                       stdin="sk_abcdefgh_wrongwrongwrongwrongwrongwrongwrong\n", ok=False)  # fmt: skip
    assert "401" in bad.stderr and "skylift login" in bad.stderr
    assert "wrongwrong" not in bad.stderr
    # Plain http would send the token in clear: refused before any connection.
    plain = released.cli("login", released.api_url.replace("https", "http"), "--token", "sk_x",
                         ok=False, fast=True)  # fmt: skip
    assert "https" in plain.stderr
    assert path.read_bytes() == before


def test_devices_list_show_tag_revoke_events_audit(fleet: Fleet) -> None:
    hub, cli = fleet.hub, fleet.cli
    listed = json.loads(cli("devices", "list", "--json").stdout)
    assert [d["device_id"] for d in listed] == list(DEVICES)
    by_id = {d["device_id"]: d for d in listed}
    assert by_id["pump-001"]["slots"] == {"rootfs": "1.0.0"}
    assert by_id["pump-004"]["slots"] == {} and by_id["pump-004"]["hardware_id"] == "hw2"

    # Filters, combined; --limit stops early and says there is more.
    hw1 = json.loads(cli("devices", "list", "--json", "--hardware", "hw1", "--version", "1.0.0",
                         "--search", "PUMP-00", "--seen-since", "1h", fast=True).stdout)  # fmt: skip
    assert [d["device_id"] for d in hw1] == ["pump-001", "pump-002", "pump-003"]
    first = cli("devices", "list", "--limit", "2", "--product", PRODUCT, fast=True)
    assert "pump-002" in first.stdout and "pump-003" not in first.stdout
    assert "2 device(s)" in first.stderr and "raise --limit" in first.stderr

    # Tags replace; a tag filter selects by all of them.
    tagged = cli("devices", "tag", "pump-001", "ring=canary", "site:lab")
    assert "pump-001: tags ring=canary, site:lab" in tagged.stderr
    cli("devices", "tag", "pump-002", "site:lab", fast=True)
    lab = json.loads(
        cli(
            "devices", "list", "--json", "--tag", "site:lab", "--tag", "ring=canary", fast=True
        ).stdout
    )
    assert [d["device_id"] for d in lab] == ["pump-001"]
    tags = hub.rows(select(DeviceTag.tag).join(Device).where(Device.device_id == "pump-001"))
    assert sorted(t for (t,) in tags) == ["ring=canary", "site:lab"]

    # Revoke: the API says so, and the gateway refuses the device's next request.
    assert fleet.devices["pump-099"].client.get("/device/v1/poll").status_code == 200
    revoked = cli("devices", "revoke", "pump-099", "--reason", "stolen from the van")
    assert "pump-099 revoked" in revoked.stderr
    row = _device(hub, "pump-099")
    assert row.revoked and row.revoke_reason == "stolen from the van"
    refused = fleet.devices["pump-099"].client.get("/device/v1/poll")
    assert refused.status_code == 403 and "revoked" in refused.json()["error"]

    # Show: table and JSON, with the latest events.
    shown = cli("devices", "show", "pump-099")
    assert "stolen from the van" in shown.stdout and "latest events" in shown.stdout
    doc = json.loads(cli("devices", "show", "pump-001", "--json", fast=True).stdout)
    assert doc["device"]["tags"] == ["ring=canary", "site:lab"]
    assert doc["device"]["certificate"]["fingerprint"] == _device(hub, "pump-001").cert_fingerprint
    assert [e["state"] for e in doc["events"]] == ["committed"]

    events = json.loads(cli("events", "pump-001", "--json").stdout)
    count = hub.rows(
        select(func.count()).select_from(DeviceEvent).join(Device)
        .where(Device.device_id == "pump-001")
    )[0][0]  # fmt: skip
    assert len(events) == count == 1 and events[0]["kind"] == "state"

    entries = json.loads(
        cli("audit", "--action", "device.revoke", "--since", "1h", "--json").stdout
    )
    assert [(e["target_id"], e["details"]["reason"]) for e in entries] == [
        ("pump-099", "stolen from the van")
    ]
    table = cli("audit", "--limit", "3", fast=True)
    assert "device.revoke" in table.stdout and "raise --limit" in table.stderr


def test_provisioning_keys_and_signer_cas(fleet: Fleet) -> None:
    hub, cli = fleet.hub, fleet.cli
    listed = cli("provisioning", "list", PRODUCT, fast=True)
    assert "line-1" in listed.stdout
    revoked = cli("provisioning", "revoke", str(fleet.key_id))
    assert f"provisioning key {fleet.key_id} revoked" in revoked.stderr
    keys = json.loads(cli("provisioning", "list", PRODUCT, "--json", fast=True).stdout)
    assert keys[0]["revoked"] is True
    # A device can no longer enroll with it.
    answer, _ = hub.enroll_response("pump-100", fleet.key)
    assert answer.status_code in (401, 403), answer.text

    cert, _key = ca.create_ca("factory line CA", now=datetime.now(UTC) - timedelta(days=1))
    (hub.tmp / "factory-ca.pem").write_bytes(cert)
    added = cli("signer-ca", "add", "factory", "factory-ca.pem", "--product", PRODUCT)
    assert "signer CA factory" in added.stderr and "factory line CA" in added.stderr
    cas = json.loads(cli("signer-ca", "list", "--json").stdout)
    assert [(c["name"], c["product"], c["revoked"]) for c in cas] == [("factory", PRODUCT, False)]
    assert cas[0]["fingerprint"] == ca.fingerprint(cert) or cas[0]["fingerprint"]
    cli("signer-ca", "remove", str(cas[0]["id"]))
    assert "revoked" in cli("signer-ca", "list", fast=True).stdout
    assert hub.scalar_rows(select(SignerCA.revoked)) == [True]


def _db_status(hub: Hub, deployment_id: int) -> dict[str, object]:
    """A deployment as the database holds it, in the shape of the API's status."""
    dep = hub.scalar_rows(select(Deployment).where(Deployment.id == deployment_id))[0]
    members = hub.rows(
        select(DeploymentDevice.phase, DeploymentDevice.status)
        .where(DeploymentDevice.deployment_id == deployment_id)
    )  # fmt: skip
    phases = hub.rows(
        select(DeploymentPhase.phase, DeploymentPhase.percent, DeploymentPhase.tag)
        .where(DeploymentPhase.deployment_id == deployment_id).order_by(DeploymentPhase.phase)
    )  # fmt: skip
    counts: dict[int, dict[str, int]] = {}
    for phase, status in members:
        c = counts.setdefault(phase, {})
        c[str(status)] = c.get(str(status), 0) + 1
    return {
        "status": str(dep.status),
        "paused_reason": dep.paused_reason,
        "current_phase": dep.current_phase,
        "phases": [
            (p, pc, t, sum(counts.get(p, {}).values()), counts.get(p, {})) for p, pc, t in phases
        ],
    }


def _api_status(doc: dict[str, object]) -> dict[str, object]:
    phases = doc["phases"]
    assert isinstance(phases, list)
    return {
        "status": doc["status"],
        "paused_reason": doc["paused_reason"],
        "current_phase": doc["current_phase"],
        "phases": [
            (
                p["phase"],
                p["percent"],
                p["tag"],
                p["devices"],
                {k: v for k, v in p["counts"].items() if v},
            )
            for p in phases
        ],
    }


def test_deployment_create_status_pause_resume_abort(fleet: Fleet) -> None:
    hub, cli = fleet.hub, fleet.cli
    cli("devices", "tag", "pump-001", "ring=canary", "site:lab", fast=True)  # as the test above
    created = cli("deploy", "create", "--name", "night-rollout", "--product", PRODUCT,
                  "--version", "1.1.0", "--hardware", "hw1", "--search", "pump-00",
                  "--phase", "tag:ring=canary", "--phase", "100", "--json")  # fmt: skip
    doc = json.loads(created.stdout)
    dep_id = doc["id"]
    assert doc["status"] == "active" and doc["version"] == "1.1.0"
    assert doc["selector"] == {"hardware": "hw1", "q": "pump-00"}
    # The canary phase has pump-001, the rest pump-002 and -003.
    assert [(p["phase"], p["tag"], p["percent"], p["devices"]) for p in doc["phases"]] == [
        (0, "ring=canary", None, 1),
        (1, None, 100, 2),
    ]
    assert _api_status(doc) == _db_status(hub, dep_id)

    # The canary is offered the release and reports progress.
    canary = fleet.devices["pump-001"]
    poll = canary.client.get("/device/v1/poll")
    assert poll.status_code == 200 and poll.json()["update"]["version"] == "1.1.0", poll.text
    assert (
        canary.report("downloading", progress=40, details={"version": "1.1.0"}).status_code == 200
    )
    status = json.loads(cli("deploy", "status", str(dep_id), "--json").stdout)
    assert status["phases"][0]["counts"]["downloading"] == 1
    assert _api_status(status) == _db_status(hub, dep_id)
    table = cli("deploy", "status", str(dep_id), fast=True)
    assert "night-rollout" in table.stdout and "active" in table.stdout
    assert "ring=canary" in table.stdout and "5%" in table.stdout

    paused = cli("deploy", "pause", str(dep_id), "--reason", "3am: canary looks slow")
    assert "paused" in paused.stdout and "3am: canary looks slow" in paused.stdout
    db = _db_status(hub, dep_id)
    assert db["status"] == "paused" and db["paused_reason"] == "3am: canary looks slow"
    # --watch stops at once at a paused deployment, and prints where it is.
    watched = cli(
        "deploy", "status", str(dep_id), "--watch", "--interval", "1", "--json", fast=True
    )
    assert json.loads(watched.stdout)["status"] == "paused"
    assert f"deployment {dep_id} paused" in watched.stderr

    resumed = json.loads(cli("deploy", "resume", str(dep_id), "--json").stdout)
    assert resumed["status"] == "active"
    assert _api_status(resumed) == _db_status(hub, dep_id)
    listed = json.loads(cli("deploy", "list", "--status", "active", "--json").stdout)
    assert [(d["id"], d["devices"], d["phases"]) for d in listed] == [(dep_id, 3, 2)]

    # --watch on an active deployment is bounded by --timeout.
    bounded = cli(
        "deploy", "status", str(dep_id), "--watch", "--interval", "1", "--timeout", "1", fast=True
    )
    assert "stopped watching" in bounded.stderr and "night-rollout" in bounded.stdout

    aborted = cli("deploy", "abort", str(dep_id))
    assert "aborted" in aborted.stdout
    final = json.loads(cli("deploy", "status", str(dep_id), "--json", fast=True).stdout)
    assert final["status"] == "aborted"
    assert _api_status(final) == _db_status(hub, dep_id)
    assert "night-rollout" in cli("deploy", "list", fast=True).stdout


def test_refused_commands_say_why_in_one_line_and_change_nothing(fleet: Fleet) -> None:
    hub, cli = fleet.hub, fleet.cli
    viewer = hub.api().post("/tokens", json={"name": "night-viewer", "role": "viewer"})
    assert viewer.status_code == 201, viewer.text
    viewer_token = viewer.json()["token"]
    cli.secrets.add(viewer_token)
    as_viewer = {"SKYLIFT_HUB": hub.api_url, "SKYLIFT_TOKEN": viewer_token,
                 "SKYLIFT_CA": str(hub.ca_path)}  # fmt: skip
    tables = (Deployment, DeploymentDevice, DeploymentPhase, DeviceTag, ProvisioningKey,
              SignerCA, AuditEntry)  # fmt: skip
    revoked = [
        (d.device_id, d.revoked) for d in hub.scalar_rows(select(Device).order_by(Device.id))
    ]
    before = table_snapshot(hub, *tables)
    aborted = hub.scalar_rows(select(Deployment.id).where(Deployment.status == "aborted"))
    deploy = ("deploy", "create", "--name", "bad", "--product", PRODUCT, "--phase", "100")

    # The four an operator hits most, as subprocesses; the rest in this process.
    named = cli.parallel(
        [
            ((*deploy, "--version", "9.9.9"), None),
            (("devices", "tag", "pump-002", "not a tag!"), None),
            (("devices", "revoke", "no-such-device", "--reason", "typo"), None),
            ((*deploy, "--version", "1.1.0"), as_viewer),
        ],
        ok=False,
    )
    assert "has no release 9.9.9" in named[0].stderr
    assert "must match" in named[1].stderr and "400" in named[1].stderr
    assert "no device 'no-such-device'" in named[2].stderr
    assert "creating a deployment needs the operator role" in named[3].stderr
    assert "403" in named[3].stderr
    cases: list[tuple[tuple[str, ...], str]] = [
        (("deploy", "create", "--name", "bad", "--product", PRODUCT, "--version", "1.1.0",
          "--phase", "0"), "--phase takes a percentage"),
        (("deploy", "create", "--name", "bad", "--product", PRODUCT, "--version", "1.1.0",
          "--phase", "50"), "the last phase must be"),
        (("deploy", "pause", "999999"), "no deployment 999999"),
        (("devices", "list", "--state", "sleepy"), "state must be one of"),
        (("devices", "show", ".."), "is not a device id"),
        (("devices", "tag", "pump-002"), "--clear"),
        (("provisioning", "create", "no-such-product", "k"), "no product 'no-such-product'"),
        (("provisioning", "revoke", "999999"), "no provisioning key 999999"),
        (("signer-ca", "add", "x", "no-such.pem"), "no-such.pem"),
        (("events", "no-such-device"), "no device"),
    ]  # fmt: skip
    if aborted:  # the deployment test aborted one
        cases.append((("deploy", "resume", str(aborted[0])), "409"))
    for args, expected in cases:
        p = cli(*args, ok=False, fast=True)
        assert expected in p.stderr, (args, p.stderr)
    assert table_snapshot(hub, *tables) == before
    after = [(d.device_id, d.revoked) for d in hub.scalar_rows(select(Device).order_by(Device.id))]
    assert after == revoked
    # A viewer may look.
    assert json.loads(
        cli("devices", "list", "--json", "--limit", "1", env=as_viewer, fast=True).stdout
    )
