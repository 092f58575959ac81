"""The script backend: the verbs it sends and how it treats a misbehaving script."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from skylift.agent.bootloader import BootloaderError, ScriptBootloader, SlotState


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bootloader.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_verbs_and_arguments(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    path = script(
        tmp_path,
        f'echo "$*" >> {log}\n'
        'case "$1" in\n'
        "  get-primary) echo B ;;\n"
        "  get-current) echo A ;;\n"
        "  get-state) echo good ;;\n"
        "esac\n",
    )
    bl = ScriptBootloader(script_path=path)
    assert bl.primary() == "B"
    assert bl.current() == "A"
    assert bl.state("B") == SlotState(bootable=True, attempts_left=None)
    bl.try_once("B")
    bl.mark_good("B")
    bl.mark_bad("A")
    assert log.read_text().splitlines() == [
        "get-primary",
        "get-current",
        "get-state B",
        "set-primary B",
        "set-state B good",
        "set-state A bad",
    ]


def test_failure_reports_the_last_line_of_stderr(tmp_path: Path) -> None:
    path = script(tmp_path, "echo noise >&2\necho 'fw_setenv: cannot lock' >&2\nexit 3\n")
    with pytest.raises(BootloaderError) as info:
        ScriptBootloader(script_path=path).try_once("B")
    message = info.value.diagnostics()
    assert "set-primary failed (exit 3): fw_setenv: cannot lock" in message
    assert "noise" not in message


def test_failure_without_stderr(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="no error output"):
        ScriptBootloader(script_path=script(tmp_path, "exit 1\n")).mark_good("A")


def test_hang_is_killed_at_the_timeout(tmp_path: Path) -> None:
    path = script(tmp_path, "sleep 30 &\nsleep 30\n")
    started = time.monotonic()
    with pytest.raises(BootloaderError, match="did not finish within 0.3 s"):
        ScriptBootloader(script_path=path, timeout_s=0.3).primary()
    assert time.monotonic() - started < 10


def test_output_is_bounded(tmp_path: Path) -> None:
    path = script(tmp_path, "head -c 100000 /dev/zero | tr '\\0' A\n")
    with pytest.raises(BootloaderError, match="more than 4096 bytes"):
        ScriptBootloader(script_path=path).primary()


def test_huge_stderr_still_gives_its_last_line(tmp_path: Path) -> None:
    path = script(
        tmp_path, "head -c 100000 /dev/zero | tr '\\0' x >&2\necho >&2\necho last >&2\nexit 2\n"
    )
    with pytest.raises(BootloaderError, match="exit 2\\): last$"):
        ScriptBootloader(script_path=path).primary()


@pytest.mark.parametrize("answer", ["C", "", "A B", "a", "../x"])
def test_slot_answers_are_checked(tmp_path: Path, answer: str) -> None:
    path = script(tmp_path, f"echo '{answer}'\n")
    with pytest.raises(BootloaderError, match="answered"):
        ScriptBootloader(script_path=path).primary()


def test_state_answer_is_checked(tmp_path: Path) -> None:
    path = script(tmp_path, "echo maybe\n")
    with pytest.raises(BootloaderError, match="not good or bad"):
        ScriptBootloader(script_path=path).state("A")


def test_missing_or_not_executable(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="cannot run"):
        ScriptBootloader(script_path=tmp_path / "nope").primary()
    plain = tmp_path / "plain"
    plain.write_text("echo A\n")
    with pytest.raises(BootloaderError, match="cannot run"):
        ScriptBootloader(script_path=plain).primary()
