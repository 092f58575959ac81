"""The demo's story as a test: a real hub, three real agent processes, mutual TLS on 127.0.0.1.

:class:`skylift.demo.Demo` runs it (the same code as ``make demo``, without
the bundle tour): ``skylift hub serve`` as a subprocess, every operator step
a ``skylift`` subprocess, three ``skylift agent run`` processes with file
slots and the ``file`` bootloader (:mod:`skylift.fleet.devices`). The
devices start factory-fresh, enroll and install 1.0.0; 1.1.0 goes out in two
phases and sensor-03's health check fails on it, so it rolls back by itself.

Checked here, from the hub's management API and from the devices' own files:
enrollment, 1.0.0 committed everywhere, the 1.1.0 outcome per device and per
phase, and that each slot file holds exactly the image of the version the
device reports (and the agent's own ``status`` agrees).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DemoRun  # tests/ is on sys.path under pytest
from skylift.demo import CANARY, DEVICES, V1, V2, StoryResult

BAD = "sensor-03"
GOOD = [d.device_id for d in DEVICES if d.device_id != BAD]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def story(demo_run: DemoRun) -> StoryResult:
    """The demo's run of the session (tests/conftest.py), shared with tests/test_demo.py."""
    return demo_run.result


def test_devices_enroll_and_install_the_first_release(story: StoryResult) -> None:
    assert sorted(story.devices) == sorted(d.device_id for d in DEVICES)
    for device_id, doc in story.devices.items():
        assert doc["enrolled_via"] == "provisioning", doc
        assert doc["certificate"]["fingerprint"] and not doc["revoked"]
        device = story.fleet[device_id]
        assert (device.state_dir / "identity" / "device.pem").is_file()
        # The first update of a factory-fresh device: 1.0.0, into slot B, committed.
        committed = [
            e for e in story.events[device_id]
            if e["state"] == "committed" and e["details"].get("version") == V1
        ]  # fmt: skip
        assert len(committed) == 1 and committed[0]["details"]["target_slot"] == "B"
    v1 = story.v1_deployment
    assert v1["status"] == "completed" and v1["version"] == V1
    assert [(p["devices"], p["counts"]["committed"]) for p in v1["phases"]] == [(3, 3)]


@pytest.mark.slow
def test_second_release_in_two_phases_with_one_rollback(story: StoryResult) -> None:
    v2 = story.v2_deployment
    assert v2["status"] == "completed" and v2["version"] == V2
    assert v2["failure_gate_percent"] == 50 and v2["paused_reason"] is None
    counts = [
        (p["tag"], p["percent"], p["devices"], {k: n for k, n in p["counts"].items() if n})
        for p in v2["phases"]
    ]
    assert counts == [
        ("ring=canary", None, 1, {"committed": 1}),
        (None, 100, 2, {"committed": 1, "rolled_back": 1}),
    ]
    # The counts agree with what each device's own record says about this deployment.
    per_device = {}
    for device_id, doc in story.devices.items():
        [mine] = [d for d in doc["deployments"] if d["id"] == v2["id"]]
        per_device[device_id] = (mine["phase"], mine["device_status"])
    assert per_device == {
        CANARY: (0, "committed"),
        **{d: (1, "committed") for d in GOOD if d != CANARY},
        BAD: (1, "rolled_back"),
    }
    for device_id in GOOD:
        assert story.devices[device_id]["slots"] == {"rootfs": V2}
    # The bad device rolled back by itself, says why, and runs 1.0.0 still.
    bad = story.devices[BAD]
    assert bad["slots"] == {"rootfs": V1}
    [entry] = [d for d in bad["deployments"] if d["id"] == v2["id"]]
    assert "health_check hook health-check exited with status 1" in entry["device_reason"]
    rolled = next(e for e in story.events[BAD] if e["state"] == "rolled_back")
    assert rolled["details"]["version"] == V2 and rolled["details"]["previous_version"] == V1
    assert "health_check hook" in rolled["reason"]
    assert f"does not come up healthy on {V2}" in rolled["details"]["hook_output"]
    assert not any(
        e["state"] == "committed" and e["details"].get("version") == V2 for e in story.events[BAD]
    )


@pytest.mark.slow
def test_slot_files_hold_the_images_the_devices_report(story: StoryResult) -> None:
    image = {v: _sha256(p) for v, p in story.images.items()}
    expected = {**dict.fromkeys(GOOD, ("A", V2, V1)), BAD: ("B", V1, V2)}
    for device_id, (booted, running, other) in expected.items():
        device = story.fleet[device_id]
        assert device.booted_slot() == booted, device_id
        assert story.devices[device_id]["slots"]["rootfs"] == running
        assert device.slot_sha256(booted) == image[running], device_id
        # The other slot keeps the release before (or the one that was refused).
        assert device.slot_sha256("B" if booted == "A" else "A") == image[other], device_id
    assert story.slots_match == {d.device_id: True for d in DEVICES}
    # The agent's own view, from its state directory: the booted slot and its version.
    procs = {
        d.device_id: subprocess.Popen(
            [sys.executable, "-m", "skylift.cli.main", "agent", "status", "--json", "--config",
             str(d.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for d in story.fleet.devices
    }  # fmt: skip
    for device_id, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        status = json.loads(stdout)
        booted, running, _ = expected[device_id]
        assert status["state"] == "idle" and status["problems"] == [], status
        [slot] = [s for s in status["slots"] if s["booted"]]
        assert (slot["name"], slot["installed_version"]) == (booted, running), status
        assert status["pending_reports"] == 0, status
    # Every agent stopped cleanly on SIGTERM, between two steps.
    assert story.agent_exit_codes == {d.device_id: 0 for d in DEVICES}
