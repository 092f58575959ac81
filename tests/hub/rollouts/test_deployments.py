"""Deployments through the API, and the rollout engine's ticks, on SQLite and PostgreSQL.

Device reports are simulated by writing ``deployment_devices`` rows, as the
gateway's report handler does; time moves with the hub's clock.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa

from skylift.hub import rollouts
from skylift.hub.app import make_api_app
from skylift.hub.db.models import DeploymentStatus, DirectorTargets, RolloutStatus
from skylift.hub.rollouts import PhasePlan, plan_phases

from .conftest import PRODUCT, Exploded, Hub, counts, make_bundle

C, F, R, D, INST = (
    RolloutStatus.COMMITTED,
    RolloutStatus.FAILED,
    RolloutStatus.ROLLED_BACK,
    RolloutStatus.DOWNLOADING,
    RolloutStatus.INSTALLED,
)
DEVICES = [f"dev-{i:02d}" for i in range(20)]


def _phases(h: Hub, deployment: int) -> tuple[list[str], list[str]]:
    by = h.phase_of(deployment)
    return sorted(d for d, p in by.items() if p == 0), sorted(d for d, p in by.items() if p == 1)


@pytest.fixture
def fleet(released: Hub) -> Hub:
    released.add_devices(DEVICES)
    return released


def test_phases_advance_after_soak_and_quorum(fleet: Hub) -> None:
    h = fleet
    r = h.deploy(who="operator")
    assert r.status_code == 201, r.text
    status = r.json()
    dep = status["id"]
    assert status["status"] == "active" and status["current_phase"] == 0
    assert [p["devices"] for p in status["phases"]] == [10, 10]
    assert status["phases"][0]["started_at"] is not None
    assert status["phases"][1]["started_at"] is None
    first, second = _phases(h, dep)
    # Phase 0 is offered the release; phase 1 is not touched.
    assert {h.assigned(d) for d in first} == {"1.0.0.head"}
    assert {h.assigned(d) for d in second} == {None}
    with h.session() as s:  # the cross-process signal for the gateways
        assert s.scalar(sa.select(sa.func.count()).select_from(DirectorTargets)) == 10

    assert rollouts.tick(h.ctx) == []  # nothing reported yet
    h.report(dep, first[:9], C)
    assert rollouts.tick(h.ctx) == []  # soaking
    h.clock.advance(600)
    assert rollouts.tick(h.ctx) == [f"deployment {dep} phase 1 started"]  # 9 of 10: quorum
    assert rollouts.tick(h.ctx) == []  # idempotent
    status = h.get(f"/deployments/{dep}").json()
    assert status["current_phase"] == 1
    assert status["phases"][0]["completed_at"] is not None
    assert {h.assigned(d) for d in first + second} == {"1.0.0.head"}

    h.report(dep, second, C)
    h.clock.advance(599)
    assert rollouts.tick(h.ctx) == []
    h.clock.advance(1)
    assert rollouts.tick(h.ctx) == [f"deployment {dep} completed"]
    status = h.get(f"/deployments/{dep}").json()
    assert status["status"] == "completed"
    assert counts(status) == [
        {"pending": 1, "downloading": 0, "installed": 0, "committed": 9, "failed": 0,
         "rolled_back": 0},
        {"pending": 0, "downloading": 0, "installed": 0, "committed": 10, "failed": 0,
         "rolled_back": 0},
    ]  # fmt: skip
    assert [e.actor for e in h.audit("deployment.advance")] == ["rollout"]
    assert [e.actor for e in h.audit("deployment.complete")] == ["rollout"]


def test_failures_over_the_gate_pause_resume_acknowledges_them(fleet: Hub) -> None:
    h = fleet
    dep = h.deploy(failure_gate_percent=10).json()["id"]
    first, second = _phases(h, dep)
    h.report(dep, first[:1], F, "disk full")
    h.report(dep, first[1:2], R, "health check failed: exit 3")
    h.report(dep, first[2:3], D)
    h.report(dep, first[3:5], C)
    changes = rollouts.tick(h.ctx)
    reason = "phase 0: 20.0% failed (gate 10%): disk full (1), health check failed: exit 3 (1)"
    assert changes == [f"deployment {dep} paused: {reason}"]
    status = h.get(f"/deployments/{dep}", who="viewer").json()
    assert status["status"] == "paused"
    assert status["paused_reason"] == reason
    assert status["phases"][0]["failure_rate_percent"] == 20.0
    # Devices that had not begun are withdrawn; the others keep it, to finish.
    assert {h.assigned(d) for d in first[5:]} == {None}
    assert {h.assigned(d) for d in first[:5]} == {"1.0.0.head"}
    assert {h.assigned(d) for d in second} == {None}
    (auto,) = h.audit("deployment.auto_pause")
    assert auto.actor == "rollout" and auto.details is not None
    assert auto.details["reason"] == reason and auto.details["withdrawn"] == 5
    h.clock.advance(10_000)
    assert rollouts.tick(h.ctx) == []  # paused: nothing moves

    r = h.post(f"/deployments/{dep}/resume", who="operator", json={})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "active" and r.json()["paused_reason"] is None
    assert {h.assigned(d) for d in first} == {"1.0.0.head"}
    (entry,) = h.audit("deployment.resume")
    assert entry.details is not None and entry.details["failures"] == 2
    # The two failures are acknowledged: no pause for them again.
    assert rollouts.tick(h.ctx) == []
    assert h.get(f"/deployments/{dep}").json()["status"] == "active"
    # A third failure while over the gate pauses again.
    h.report(dep, first[5:6], F, "disk full")
    assert rollouts.tick(h.ctx)[0].startswith(f"deployment {dep} paused: phase 0: 30.0% failed")
    assert len(h.audit("deployment.auto_pause")) == 2


def test_operator_pause_and_abort(fleet: Hub) -> None:
    h = fleet
    dep = h.deploy(phases=[{"percent": 50}, {"percent": 100}], min_soak_s=0).json()["id"]
    first, second = _phases(h, dep)
    h.report(dep, first, C)
    assert rollouts.tick(h.ctx) == [f"deployment {dep} phase 1 started"]
    h.report(dep, second[:2], C)
    h.report(dep, second[2:3], F, "boom")
    h.report(dep, second[3:4], INST)

    r = h.post(f"/deployments/{dep}/pause", json={"reason": "weekend freeze"}, who="operator")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "paused" and r.json()["paused_reason"] == "weekend freeze"
    assert h.post(f"/deployments/{dep}/pause").json()["paused_reason"] == "weekend freeze"
    assert len(h.audit("deployment.pause")) == 1  # pausing twice changes nothing
    assert {h.assigned(d) for d in second[4:]} == {None}

    r = h.post(f"/deployments/{dep}/abort", who="operator")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "aborted"
    # Committed devices keep what they run; no other device is offered it any longer.
    assert {h.assigned(d) for d in first + second[:2]} == {"1.0.0.head"}
    assert {h.assigned(d) for d in second[2:]} == {None}
    (entry,) = h.audit("deployment.abort")
    assert entry.details is not None and entry.details["withdrawn"] == 8
    assert h.post(f"/deployments/{dep}/abort").status_code == 200  # again: nothing changes
    assert len(h.audit("deployment.abort")) == 1
    for action in ("resume", "pause"):
        r = h.post(f"/deployments/{dep}/{action}")
        assert r.status_code == 409
        assert "aborted" in r.json()["error"]
    assert rollouts.tick(h.ctx) == []


def test_status_counts_are_exact(fleet: Hub) -> None:
    h = fleet
    dep = h.deploy(phases=[{"percent": 25}, {"percent": 60}, {"percent": 100}],
                   failure_gate_percent=100).json()["id"]  # fmt: skip
    by = h.phase_of(dep)
    first = sorted(d for d, p in by.items() if p == 0)
    assert [sum(1 for p in by.values() if p == n) for n in range(3)] == [5, 7, 8]
    for devices, status in ((first[:1], D), (first[1:2], INST), (first[2:3], C), (first[3:4], F)):
        h.report(dep, devices, status, "why" if status is F else None)
    phases = h.get(f"/deployments/{dep}").json()["phases"]
    assert phases[0]["counts"] == {"pending": 1, "downloading": 1, "installed": 1,
                                   "committed": 1, "failed": 1, "rolled_back": 0}  # fmt: skip
    assert phases[0]["failure_rate_percent"] == 20.0
    assert phases[2]["counts"]["pending"] == 8 and phases[2]["failure_rate_percent"] == 0
    listed = h.get("/deployments", who="viewer").json()["items"]
    assert [(d["id"], d["devices"], d["status"]) for d in listed] == [(dep, 20, "active")]
    assert h.get("/deployments?status=paused").json()["items"] == []


def test_membership_is_the_planned_one(fleet: Hub) -> None:
    h = fleet
    dep = h.deploy(phases=[{"percent": 10}, {"percent": 100}]).json()["id"]
    with h.session() as s:
        from skylift.hub.db.models import Device

        pks = dict(s.execute(sa.select(Device.id, Device.device_id)).all())
    plan = plan_phases(dep, pks, {}, [PhasePlan(percent=10), PhasePlan(percent=100)])
    assert h.phase_of(dep) == {pks[pk]: p for pk, p in plan.items()}
    assert sum(1 for p in plan.values() if p == 0) == 2


def test_tag_phases(fleet: Hub) -> None:
    h = fleet
    h.add_devices(["lab-1", "lab-2"], tags={"lab-1": ["ring:canary"], "lab-2": ["ring:canary"]})
    h.add_devices(["nobody-has-it"], hardware="hw2")
    r = h.deploy(
        selector={"hardware": "hw1"},
        phases=[{"tag": "ring:canary"}, {"tag": "ring:none"}, {"percent": 100}],
        min_soak_s=0,
    )
    assert r.status_code == 201, r.text
    dep = r.json()["id"]
    assert [p["devices"] for p in r.json()["phases"]] == [2, 0, 20]
    assert [p["tag"] for p in r.json()["phases"]] == ["ring:canary", "ring:none", None]
    assert h.assigned("lab-1") == h.assigned("lab-2") == "1.0.0.head"
    assert {h.assigned(d) for d in DEVICES} == {None}
    h.report(dep, ["lab-1", "lab-2"], C)
    # The empty tag phase passes in the same tick.
    assert rollouts.tick(h.ctx) == [
        f"deployment {dep} phase 1 started",
        f"deployment {dep} phase 2 started",
    ]
    assert {h.assigned(d) for d in DEVICES} == {"1.0.0.head"}
    assert h.assigned("nobody-has-it") is None


def test_selection_skips_revoked_and_current_and_refuses_downgrades(
    released: Hub, v2: Exploded
) -> None:
    h = released
    h.add_devices(["a", "b", "c", "d"], revoked=("b",),
                  slots={"c": {"rootfs": "1.0.0"}, "d": {"rootfs": "0.9", "app": "7.0"}})  # fmt: skip
    r = h.deploy(phases=[{"percent": 100}])
    assert r.status_code == 201, r.text
    assert sorted(h.phase_of(r.json()["id"])) == ["a", "d"]  # app is not a slot 1.0.0 writes
    (entry,) = h.audit("deployment.create")
    assert entry.details is not None and entry.details["skipped"] == {"current": 1, "revoked": 1}
    # A device that runs 1.1.0 would go back to 1.0.0: refused unless allowed.
    assert h.push(v2).status_code == 201
    h.add_devices(["e"], slots={"e": {"rootfs": "1.1.0"}})
    r = h.deploy(selector={"devices": ["e"]}, phases=[{"percent": 100}])
    assert r.status_code == 409
    assert "e (1.1.0)" in r.json()["error"] and "allow_downgrade" in r.json()["error"]
    r = h.deploy(selector={"devices": ["e"]}, phases=[{"percent": 100}], allow_downgrade=True)
    assert r.status_code == 201, r.text
    # Nothing left to update: refused.
    r = h.deploy(selector={"devices": ["c"]}, phases=[{"percent": 100}])
    assert r.status_code == 409
    assert "1 run 1.0.0 already" in r.json()["error"]


def test_a_device_follows_one_live_deployment(fleet: Hub) -> None:
    h = fleet
    first = h.deploy(selector={"devices": DEVICES[:5]}).json()["id"]
    r = h.deploy(selector={"devices": DEVICES[3:8]})
    assert r.status_code == 409
    assert "dev-03, dev-04" in r.json()["error"]
    assert h.deploy(selector={"devices": DEVICES[5:8]}).status_code == 201
    assert h.post(f"/deployments/{first}/pause").status_code == 200
    assert h.deploy(selector={"devices": DEVICES[3:4]}).status_code == 409  # paused is live
    assert h.post(f"/deployments/{first}/abort").status_code == 200
    assert h.deploy(selector={"devices": DEVICES[3:4]}).status_code == 201


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "r", "product": PRODUCT, "version": "1.0.0", "selector": {},
        "phases": [{"percent": 100}], "failure_gate_percent": 5, "min_soak_s": 0,
    }  # fmt: skip
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


INVALID = [
    ("no-phases", _body(phases=[]), "1 to 10 phases"),
    ("eleven-phases", _body(phases=[{"percent": p} for p in range(9, 101, 9)]), "1 to 10 phases"),
    ("not-increasing", _body(phases=[{"percent": 50}, {"percent": 50}, {"percent": 100}]), "increase"),
    ("last-not-100", _body(phases=[{"percent": 50}]), "last phase"),
    ("last-is-a-tag", _body(phases=[{"percent": 100}, {"tag": "x"}]), "last phase"),
    ("percent-zero", _body(phases=[{"percent": 0}, {"percent": 100}]), "above 0"),
    ("percent-over", _body(phases=[{"percent": 101}]), "between 0 and 100"),
    ("percent-and-tag", _body(phases=[{"percent": 100, "tag": "x"}]), "phase 0 must be"),
    ("percent-text", _body(phases=[{"percent": "100"}]), "percent must be a number"),
    ("bad-tag", _body(phases=[{"tag": "no spaces"}, {"percent": 100}]), "tag"),
    ("tag-twice", _body(phases=[{"tag": "a"}, {"tag": "a"}, {"percent": 100}]), "has a phase"),
    ("gate-negative", _body(failure_gate_percent=-1), "failure_gate_percent"),
    ("gate-over", _body(failure_gate_percent=100.5), "failure_gate_percent"),
    ("gate-bool", _body(failure_gate_percent=True), "failure_gate_percent"),
    ("soak-negative", _body(min_soak_s=-1), "min_soak_s"),
    ("soak-float", _body(min_soak_s=1.5), "min_soak_s"),
    ("selector-unknown", _body(selector={"tag": "x"}), "unknown field 'tag' in selector"),
    ("selector-bad-tag", _body(selector={"tags": ["a b"]}), "tags item"),
    ("selector-devices", _body(selector={"devices": "dev-01"}), "list of device ids"),
    ("selector-unknown-device", _body(selector={"devices": ["ghost"]}), "no device ghost in product gw"),
    ("unknown-release", _body(version="9.9.9"), "no release 9.9.9"),
    ("unknown-product", _body(product="nope"), "no product nope"),
    ("bad-name", _body(name="a b"), "name"),
    ("missing-field", _body(min_soak_s=None), "min_soak_s"),
    ("unknown-field", _body(colour="red"), "unknown field"),
]  # fmt: skip


def test_invalid_deployments_are_refused(module_hub: Hub) -> None:
    # One hub for the table: a refusal changes nothing, which the end checks.
    h = module_hub
    for case, body, message in INVALID:
        r = h.post("/deployments", json=body)
        assert r.status_code == 400, (case, r.text)
        assert message in r.json()["error"], (case, r.json())
    assert h.get("/deployments").json()["items"] == []
    assert h.audit("deployment.create") == []


def test_who_may_do_what(fleet: Hub) -> None:
    h = fleet
    assert h.deploy(who="viewer").status_code == 403
    dep = h.deploy().json()["id"]
    for action in ("pause", "resume", "abort"):
        assert h.post(f"/deployments/{dep}/{action}", who="viewer").status_code == 403
    assert h.get(f"/deployments/{dep}", who="viewer").status_code == 200
    other = h.add_org("other")
    h.tokens["other"] = h.add_token("admin", org_id=other)
    assert h.get(f"/deployments/{dep}", who="other").status_code == 404
    for action in ("pause", "resume", "abort"):
        assert h.post(f"/deployments/{dep}/{action}", who="other").status_code == 404
    assert h.get("/deployments", who="other").json()["items"] == []
    assert h.deploy(who="other").status_code == 400  # no product gw in that organisation
    assert h.get("/deployments/999999").status_code == 404
    for huge in (2**31, 2**40, 10**20):  # over PostgreSQL's INTEGER, and over int8
        assert h.get(f"/deployments/{huge}").status_code == 404
        assert h.post(f"/deployments/{huge}/abort").status_code == 404
    assert h.deployment_row(dep).status == DeploymentStatus.ACTIVE
    assert h.post(f"/deployments/{dep}/resume", json={"x": 1}).status_code == 400


def test_every_change_is_audited(fleet: Hub) -> None:
    h = fleet
    dep = h.deploy(who="operator", failure_gate_percent=0).json()["id"]
    h.post(f"/deployments/{dep}/pause", who="operator")
    h.post(f"/deployments/{dep}/resume", who="operator")
    first, _ = _phases(h, dep)
    h.report(dep, first[:1], F, "x")
    rollouts.tick(h.ctx)
    h.post(f"/deployments/{dep}/abort", who="operator")
    trail = h.get("/audit").json()["items"]
    mine = [
        (e["action"], e["actor"].split("-")[0]) for e in trail if e["target_type"] == "deployment"
    ]
    assert list(reversed(mine)) == [
        ("deployment.create", "operator"),
        ("deployment.pause", "operator"),
        ("deployment.resume", "operator"),
        ("deployment.auto_pause", "rollout"),
        ("deployment.abort", "operator"),
    ]


def test_the_background_loop_ticks(fleet: Hub) -> None:
    h = fleet
    dep = h.deploy(min_soak_s=0).json()["id"]
    first, _ = _phases(h, dep)
    h.report(dep, first, C)
    h.ctx.extra[rollouts.TICK_INTERVAL_KEY] = 0.05
    app = make_api_app(h.ctx)
    # The app's lifespan runs its background loops, as `skylift hub serve` does.
    with h.portal.wrap_async_context_manager(app.router.lifespan_context(app)):
        deadline = time.monotonic() + 10
        while h.deployment_row(dep).current_phase == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert h.deployment_row(dep).current_phase == 1


def test_a_second_release_deploys_over_the_first(released: Hub, v2: Exploded) -> None:
    h = released
    h.add_devices(DEVICES[:4], slots={d: {"rootfs": "1.0.0"} for d in DEVICES[:4]})
    assert h.push(v2).status_code == 201
    r = h.deploy(version="1.1.0", phases=[{"percent": 100}])
    assert r.status_code == 201, r.text
    assert {h.assigned(d) for d in DEVICES[:4]} == {"1.1.0.head"}
    target = h.ctx.images.load(PRODUCT).target_files["1.1.0.head"]
    assert h.ctx.director.assigned(DEVICES[0]) == target  # what the image repository says


def test_a_bundle_of_another_product_is_refused(released: Hub) -> None:
    from .conftest import IMAGE

    other = make_bundle("2.0.0", IMAGE[:1000], product="other")
    released.upload(other)
    r = released.post(f"/products/{PRODUCT}/releases", json=released.release_body(other))
    assert r.status_code == 400
    assert "for product other" in r.json()["error"]
