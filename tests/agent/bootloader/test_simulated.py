"""The simulated bootloader: its state file and its power-on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skylift.agent.bootloader import BootloaderError, SimulatedBootloader
from skylift.agent.bootloader.simulated import FORMAT


def test_a_missing_state_file_is_a_fresh_board(tmp_path: Path) -> None:
    path = tmp_path / "boot.json"
    bl = SimulatedBootloader(state_path=path)
    assert bl.primary() == "A"
    assert not path.exists()  # reading writes nothing
    with pytest.raises(BootloaderError, match="not booted yet"):
        bl.current()
    assert bl.boot() == "A"
    state = json.loads(path.read_text())
    assert state["format"] == FORMAT
    assert state["booted"] == "A"
    assert state["boots"] == 1
    assert bl.environment() == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "2", "BOOT_B_LEFT": "3"}


def test_attempts_and_slots_are_configurable(tmp_path: Path) -> None:
    bl = SimulatedBootloader(state_path=tmp_path / "b.json", slots=("x", "y", "z"), attempts=1)
    bl.boot()
    bl.mark_good("x")
    bl.try_once("z")
    assert bl.boot() == "z"
    assert bl.boot() == "x"


def test_marking_every_slot_bad_leaves_the_boot_script_defaults(tmp_path: Path) -> None:
    # An empty BOOT_ORDER is an unset one: the script restores "A B" and full counters.
    bl = SimulatedBootloader(state_path=tmp_path / "b.json")
    bl.mark_bad("A")
    bl.mark_bad("B")
    assert bl.environment()["BOOT_ORDER"] == ""
    assert bl.boot() == "A"
    assert bl.environment()["BOOT_ORDER"] == "A B"


def test_no_bootable_slot_is_an_error_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    state = {"format": FORMAT, "env": {"BOOT_ORDER": "R"}, "booted": None, "boots": 0}
    path.write_text(json.dumps(state))
    bl = SimulatedBootloader(state_path=path)
    with pytest.raises(BootloaderError, match="reset forever"):
        bl.boot()
    assert json.loads(path.read_text()) == state


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        json.dumps({"format": "other", "env": {}, "booted": None, "boots": 0}).encode(),
        json.dumps({"format": FORMAT, "env": {"a": 1}, "booted": None, "boots": 0}).encode(),
        json.dumps({"format": FORMAT, "env": {}, "booted": 3, "boots": 0}).encode(),
        json.dumps({"format": FORMAT, "env": {}, "booted": None}).encode(),
        b"\xff\xfe",
        b" " * (64 * 1024 + 1),
    ],
)
def test_corrupt_state_file_is_refused_and_left_alone(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "boot.json"
    path.write_bytes(content)
    bl = SimulatedBootloader(state_path=path)
    for call in (bl.boot, bl.primary, bl.current, lambda: bl.try_once("B")):
        with pytest.raises(BootloaderError):
            call()
    assert path.read_bytes() == content


@pytest.mark.parametrize("attempts", [0, 10, -1, True, 2.5])
def test_attempts_out_of_range(tmp_path: Path, attempts: int) -> None:
    with pytest.raises(BootloaderError, match="attempts"):
        SimulatedBootloader(state_path=tmp_path / "b.json", attempts=attempts)


@pytest.mark.parametrize("slots", [("A",), ("A", "A"), ("A", "b c"), ()])
def test_bad_slot_lists(tmp_path: Path, slots: tuple[str, ...]) -> None:
    with pytest.raises(BootloaderError):
        SimulatedBootloader(state_path=tmp_path / "b.json", slots=slots)
