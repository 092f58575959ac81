"""Hooks: run per phase with the update's variables, bounded output, a timeout that kills the group."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from skylift.agent.config import HooksConfig
from skylift.agent.hooks import HookError, HookRunner, run_hook


def script(tmp_path: Path, name: str, body: str, *, executable: bool = True) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755 if executable else 0o644)
    return path


def test_success_passes_the_environment_and_keeps_output(tmp_path: Path) -> None:
    hook = script(
        tmp_path, "h", 'echo "$SKYLIFT_PHASE $SKYLIFT_VERSION $SKYLIFT_SLOT"; echo oops >&2'
    )
    runner = HookRunner(HooksConfig(post_install=hook, timeout_s=5))
    result = runner.run("post_install", {"SKYLIFT_VERSION": "2.0.0", "SKYLIFT_SLOT": "B"})
    assert result.ran
    assert result.ok
    assert result.exit_code == 0
    assert result.reason is None
    assert result.output.splitlines() == ["post_install 2.0.0 B", "oops"]


@pytest.mark.parametrize(
    ("body", "reason"), [("exit 3", "exited with status 3"), ("kill -9 $$", "killed by signal 9")]
)
def test_failure_says_how(tmp_path: Path, body: str, reason: str) -> None:
    result = run_hook("health_check", script(tmp_path, "h", body), env={}, timeout_s=5)
    assert not result.ok
    assert not result.timed_out
    assert reason in (result.reason or "")


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook = script(tmp_path, "h", f"sleep 60 & echo $! > {pidfile}; echo started; wait")
    started = time.monotonic()
    result = run_hook("health_check", hook, env={}, timeout_s=1)
    assert time.monotonic() - started < 10
    assert result.timed_out
    assert not result.ok
    assert result.exit_code is None
    assert "timed out after 1 s" in (result.reason or "")
    assert "started" in result.output
    child = int(pidfile.read_text())
    for _ in range(100):  # the grandchild got the signal too
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the hook's child survived the timeout")


def test_output_is_bounded_to_its_tail(tmp_path: Path) -> None:
    hook = script(tmp_path, "h", "i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done")
    result = run_hook("post_install", hook, env={}, timeout_s=10, max_output_bytes=1000)
    assert result.ok
    assert result.output.startswith("[...cut]")
    assert result.output.rstrip().endswith("line 2999")
    assert len(result.output) < 1100


def test_no_hook_configured_is_a_success_that_did_not_run() -> None:
    result = HookRunner(HooksConfig()).run("health_check", {})
    assert not result.ran
    assert result.ok


def test_missing_or_not_executable_hook_is_refused_at_start_and_fails_if_run(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(HookError, match="does not exist"):
        HookRunner(HooksConfig(health_check=missing)).check()
    result = HookRunner(HooksConfig(health_check=missing)).run("health_check", {})
    assert result.ran
    assert not result.ok
    assert "does not exist" in (result.reason or "")
    plain = script(tmp_path, "plain", "exit 0", executable=False)
    with pytest.raises(HookError, match="not executable"):
        HookRunner(HooksConfig(on_rollback=plain)).check()
