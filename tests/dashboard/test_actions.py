"""Changes made through the dashboard, and who may make them.

Each action is the API's own code (the same audit entries, the same rules),
so these tests check what the dashboard adds: the form, the role and CSRF
checks, the one-line error on bad input, and that a refused request changes
nothing, whoever sends it and however.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from skylift.hub.db.models import (
    AuditEntry,
    Deployment,
    DeploymentDevice,
    DeploymentStatus,
    Device,
    DeviceTag,
)

from .conftest import Dashboard

DEVICES = [f"gw-{i:02d}" for i in range(10)]


def _fleet(dash: Dashboard) -> Dashboard:
    h = dash.hub
    h.add_devices(DEVICES, tags={"gw-00": ["ring=canary"]},
                  slots={d: {"rootfs": "1.0.0"} for d in DEVICES})  # fmt: skip
    r = h.deploy(version="1.1.0", selector={"tags": ["ring=canary"]}, phases=[{"percent": 100}])
    assert r.status_code == 201, r.text
    key = h.post("/products/gw/provisioning-keys", json={"name": "factory"})
    assert key.status_code == 201 and key.json()["id"] == 1
    return dash


@pytest.fixture
def fleet(released: Dashboard) -> Dashboard:
    """Ten devices on 1.0.0, gw-00 tagged ring=canary, deployment 1 of 1.1.0 active, key 1."""
    return _fleet(released)


@pytest.fixture(scope="module")
def world(shared: Dashboard) -> Dashboard:
    """:func:`fleet`, once per module and backend, for requests that must change nothing."""
    return _fleet(shared)


def _deployment(dash: Dashboard, deployment_id: int = 1) -> Deployment:
    return dash.hub.deployment_row(deployment_id)


def _audit(dash: Dashboard, action: str) -> list[AuditEntry]:
    return dash.hub.audit(action)


def _form(**overrides: str) -> dict[str, str]:
    form = {"name": "wave-2", "release": "gw/1.1.0", "tags": "", "hardware": "hw1",
            "versions": "1.0.0", "q": "", "devices": "", "phases": "50, 100",
            "failure_gate_percent": "20", "min_soak_min": "0"}  # fmt: skip
    form.update(overrides)
    return form


def test_an_operator_creates_a_two_phase_deployment_from_the_form(fleet: Dashboard) -> None:
    b = fleet.browser("operator@acme.example")
    page = b.get("/deployments/new?release=gw/1.1.0")
    assert page.status_code == 200 and 'value="gw/1.1.0" selected' in page.text
    count = b.get("/deployments/new/count?release=gw/1.1.0&hardware=hw1&versions=1.0.0")
    # gw-00 is in deployment 1 already, but it still matches the selection.
    assert count.json() == {"matched": 10, "current": 0, "text": "10 devices match"}
    chosen = DEVICES[1:9]
    r = b.post("/deployments", _form(devices="\n".join(chosen)))
    assert r.status_code == 303 and r.headers["location"] == "/deployments/2", r.text
    with fleet.hub.session() as s:
        phases = dict(s.execute(
            sa.select(Device.device_id, DeploymentDevice.phase)
            .join(Device, Device.id == DeploymentDevice.device_id)
            .where(DeploymentDevice.deployment_id == 2)
        ).all())  # fmt: skip
    assert sorted(phases) == chosen
    assert sorted(phases.values()) == [0] * 4 + [1] * 4  # 50 % of 8, then the rest
    shown = b.get("/deployments/2")
    assert "wave-2" in shown.text and "Deployment wave-2 created" in shown.text
    [entry] = _audit(fleet, "deployment.create")[1:]
    assert entry.actor == "operator@acme.example" and entry.details
    assert entry.details["phases"] == [{"percent": 50.0}, {"percent": 100.0}]


@pytest.mark.parametrize(
    ("overrides", "status", "message"),
    [
        ({"release": ""}, 400, "choose a release"),
        ({"phases": "fifty, 100"}, 400, "phase 'fifty' is neither a percentage nor tag:NAME"),
        ({"phases": "50"}, 400, 'the last phase must be {"percent": 100}'),
        ({"failure_gate_percent": "150"}, 400, "failure_gate_percent must be between 0 and 100"),
        ({"name": "no spaces allowed"}, 400, "name 'no spaces allowed' must match"),
        (
            {"tags": "ring=canary"},
            409,
            "selected device(s) are in another active or paused deployment: gw-00",
        ),
        ({"versions": "9.9.9"}, 409, "the selection has no device to update"),
        ({"devices": "gw-00 nosuch-1"}, 400, "no device nosuch-1 in product gw"),
    ],
    ids=["no-release", "bad-phase", "last-not-100", "gate", "name", "busy", "empty", "unknown-id"],
)
def test_bad_deployment_forms_say_why_and_change_nothing(
    world: Dashboard, overrides: dict[str, str], status: int, message: str
) -> None:
    fleet = world
    b = fleet.browser("operator@acme.example")
    b.get("/deployments/new")
    before = fleet.state()
    r = b.post("/deployments", _form(**overrides))
    assert r.status_code == status
    assert '<p class="error" role="alert" id="form-error">' in r.text
    error_line = html.unescape(r.text.split('id="form-error">', 1)[1].split("</p>", 1)[0])
    assert message in error_line and "\n" not in error_line
    # The form comes back as it was filled in.
    filled = _form(**overrides)
    assert f'value="{html.escape(filled["name"])}"' in r.text
    assert f'value="{filled["failure_gate_percent"]}"' in r.text
    assert fleet.state() == before


def test_pause_resume_and_abort_from_the_deployment_page(fleet: Dashboard) -> None:
    b = fleet.browser("operator@acme.example")
    page = b.get("/deployments/1")
    assert (
        'id="pause"' in page.text and 'id="abort"' in page.text and 'id="resume"' not in page.text
    )
    r = b.post("/deployments/1/pause", {"reason": "checking the canary's logs"})
    assert r.status_code == 303
    d = _deployment(fleet)
    assert d.status == DeploymentStatus.PAUSED and d.paused_reason == "checking the canary's logs"
    page = b.get("/deployments/1")
    assert "Why it paused:</strong> checking the canary&#39;s logs" in page.text
    assert 'id="resume"' in page.text and 'id="pause"' not in page.text
    assert b.post("/deployments/1/resume").status_code == 303
    assert _deployment(fleet).status == DeploymentStatus.ACTIVE
    b.get("/deployments/1")
    assert b.post("/deployments/1/abort").status_code == 303
    assert _deployment(fleet).status == DeploymentStatus.ABORTED
    # Final: no control is offered, and asking anyway is a 409 that changes nothing.
    page = b.get("/deployments/1")
    assert 'id="resume"' not in page.text and 'id="abort"' not in page.text
    before = fleet.state()
    r = b.post("/deployments/1/resume")
    assert r.status_code == 409 and "deployment 1 is aborted, not paused" in r.text
    assert fleet.state() == before
    actors = {(e.action, e.actor) for e in fleet.hub.audit("deployment.pause")
              + fleet.hub.audit("deployment.resume") + fleet.hub.audit("deployment.abort")}  # fmt: skip
    assert actors == {("deployment.pause", "operator@acme.example"),
                      ("deployment.resume", "operator@acme.example"),
                      ("deployment.abort", "operator@acme.example")}  # fmt: skip


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
def test_an_operator_tags_and_revokes_a_device(fleet: Dashboard) -> None:
    b = fleet.browser("operator@acme.example")
    b.get("/devices/gw-03")
    assert b.post("/devices/gw-03/tags", {"tags": "site:lab  ring=beta"}).status_code == 303
    with fleet.hub.session() as s:
        tags = s.scalars(sa.select(DeviceTag.tag).join(Device).where(Device.device_id == "gw-03"))
        assert sorted(tags) == ["ring=beta", "site:lab"]
    before = fleet.state()
    r = b.post("/devices/gw-03/tags", {"tags": "bad tag!"})
    assert r.status_code == 400 and "tag &#39;tag!&#39; must match" in r.text
    r = b.post("/devices/gw-03/revoke", {"reason": ""})
    assert r.status_code == 400 and "say why the device is revoked" in r.text
    assert fleet.state() == before
    r = b.post("/devices/gw-03/revoke", {"reason": "stolen from site B"})
    assert r.status_code == 303
    page = b.get("/devices/gw-03")
    assert "stolen from site B" in page.text and "Revoke device" not in page.text


# -- who may do what ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    id: str
    who: str  # an email, or "nobody"
    path: str
    status: int
    data: dict[str, str] | None = None
    csrf: str = "own"  # own, none, wrong
    origin: str | None = None
    message: str = ""


REFUSALS = [
    Refusal("viewer-pause", "viewer@acme.example", "/deployments/1/pause", 403,
            message="pausing a deployment needs the operator role"),
    Refusal("viewer-abort", "viewer@acme.example", "/deployments/1/abort", 403,
            message="aborting a deployment needs the operator role"),
    Refusal("viewer-create", "viewer@acme.example", "/deployments", 403, data=_form(),
            message="creating a deployment needs the operator role"),
    Refusal("viewer-tags", "viewer@acme.example", "/devices/gw-01/tags", 403,
            data={"tags": "x"}, message="tagging a device needs the operator role"),
    Refusal("viewer-revoke", "viewer@acme.example", "/devices/gw-01/revoke", 403,
            data={"reason": "x"}, message="revoking a device needs the operator role"),
    Refusal("operator-key", "operator@acme.example", "/keys/provisioning/1/revoke", 403,
            message="revoking a provisioning key needs the admin role"),
    Refusal("other-org-pause", "admin@other.example", "/deployments/1/pause", 404,
            message="no deployment 1"),
    Refusal("other-org-revoke", "admin@other.example", "/devices/gw-01/revoke", 404,
            data={"reason": "x"}, message="no device 'gw-01'"),
    Refusal("other-org-key", "admin@other.example", "/keys/provisioning/1/revoke", 404,
            message="no provisioning key 1"),
    Refusal("no-csrf", "admin@acme.example", "/deployments/1/abort", 403, csrf="none",
            message="the form has expired or was not sent by this dashboard"),
    Refusal("wrong-csrf", "admin@acme.example", "/deployments/1/abort", 403, csrf="wrong",
            message="the form has expired or was not sent by this dashboard"),
    Refusal("cross-site", "admin@acme.example", "/deployments/1/abort", 403,
            origin="https://evil.example", message="the form was sent from another site"),
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_the_server_refuses_and_nothing_changes(world: Dashboard, case: Refusal) -> None:
    fleet = world
    b = fleet.browser(case.who)
    b.get("/deployments/1")
    data = dict(case.data or {})
    if case.csrf == "wrong":
        data["csrf"] = "x" * 43
    headers = {"Origin": case.origin} if case.origin else {}
    before = fleet.state()
    r = b.post(case.path, data, csrf=case.csrf == "own", headers=headers)
    assert r.status_code == case.status, r.text
    alert = html.unescape(r.text.split('role="alert">', 1)[1].split("</p>", 1)[0])
    assert case.message in alert, alert
    assert fleet.state() == before


def test_a_viewer_sees_no_control_that_changes_anything(world: Dashboard) -> None:
    fleet = world
    b = fleet.browser("viewer@acme.example")
    for path in ("/", "/devices", "/devices/gw-00", "/releases", "/deployments",
                 "/deployments/1", "/audit", "/keys"):  # fmt: skip
        page = b.get(path)
        assert page.status_code == 200, path
        forms = page.text.count('method="post"')
        assert forms == 1 and 'action="/logout"' in page.text, path  # logging out only
        for word in (
            "New deployment",
            "Deploy…",
            'id="pause"',
            "Revoke device",
            ">Revoke<",
            "Save tags",
        ):
            assert word not in page.text, (path, word)
    assert b.get("/deployments/new").status_code == 403
    assert "Only admins see provisioning keys" in b.get("/keys").text


def test_logged_out_forms_go_to_the_login_page_and_change_nothing(world: Dashboard) -> None:
    fleet = world
    b = fleet.browser()
    before = fleet.state()
    r = b.post("/deployments/1/abort", {"csrf": "x" * 43}, csrf=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    assert fleet.state() == before
