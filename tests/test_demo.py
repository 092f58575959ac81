"""``make demo`` keeps working: the whole story runs end to end and says what happened."""

from __future__ import annotations

import re

import pytest

from conftest import DemoRun  # tests/ is on sys.path under pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(demo_run: DemoRun) -> None:
    out = demo_run.output
    assert "Traceback" not in out
    # The bundle tour: a tampered copy is refused.
    assert out.count("(exit code 1, as it should be)") == 1
    # Each CLI step is shown as typed; secrets are not.
    for command in ("$ skylift hub init hub", "$ skylift login https://127.0.0.1:",
                    "$ skylift release push demo-os-1.1.0.bundle", "$ skylift deploy create",
                    "$ skylift devices list"):  # fmt: skip
        assert command in out, command
    assert not re.search(r"\b(sk|pk)_[A-Za-z0-9]", out)
    # The fleet story.
    for device_id in ("sensor-01", "sensor-02", "sensor-03"):
        assert f"] {device_id} enrolled (certificate " in out, device_id
    # 1.1.0 shares most chunks with 1.0.0: the hub receives only the others.
    pushed = re.findall(r"^  uploading (\d+) of (\d+) chunk", out, re.MULTILINE)
    assert len(pushed) == 2 and pushed[0][0] == pushed[0][1]
    assert 0 < int(pushed[1][0]) < int(pushed[1][1]) / 2
    assert "1.1.0: 2 committed it, 1 rolled back by itself" in out
    # The hub made a per-pair delta from 1.0.0, and the devices, all on 1.0.0, took it:
    # kilobytes each, where the chunk plan is hundreds of KiB.
    assert re.search(r"1\.0\.0\W+rootfs\W+ready\b", out), out
    fetched = re.findall(r"sensor-0\d fetched ([\d.]+) (B|KiB) for 1\.1\.0", out)
    assert len(fetched) == 3 and all(float(n) < 64 for n, _ in fetched), fetched
    # deploy status adds up what the three devices reported downloading (the hub's accounting).
    assert re.search(r"bandwidth: 3 devices downloaded [\d.]+ [KM]iB for 96\.0 MiB of images", out)
    assert "sensor-03 rolled back 1.1.0: health_check hook health-check exited with status 1" in out
    assert "agents stopped: sensor-01 (exit 0), sensor-02 (exit 0), sensor-03 (exit 0)" in out
    assert "every device's booted slot holds exactly the image it reports: True" in out
    assert re.search(r"Demo finished in \d+ s", out)
