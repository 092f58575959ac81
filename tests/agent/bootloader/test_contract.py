"""The contract every bootloader backend keeps: one suite, run against each.

Each case starts from a board running slot A, marked good.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from skylift.agent.bootloader import BootloaderError

from .rigs import BACKEND_NAMES, Rig, make_rig


@pytest.fixture(params=BACKEND_NAMES)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Rig:
    return make_rig(request.param, tmp_path)


def test_installed_board_runs_its_first_slot(rig: Rig) -> None:
    bl = rig.bootloader
    assert bl.primary() == "A"
    assert bl.current() == "A"
    assert bl.state("A").bootable


def test_try_once_makes_the_slot_primary_and_keeps_the_fallback(rig: Rig) -> None:
    bl = rig.bootloader
    bl.try_once("B")
    assert bl.primary() == "B"
    assert bl.state("B").bootable
    assert bl.state("B").attempts_left in (rig.attempts, None)
    assert bl.state("A").bootable
    assert rig.boot() == "B"
    assert bl.current() == "B"


def test_a_try_never_marked_good_falls_back_after_its_attempts(rig: Rig) -> None:
    bl = rig.bootloader
    bl.try_once("B")
    for _ in range(rig.attempts):
        assert rig.boot() == "B"
    assert rig.boot() == "A"
    assert bl.current() == "A"
    assert not bl.state("B").bootable
    bl.mark_good("A")
    assert bl.primary() == "A"
    assert rig.boot() == "A"


def test_primary_during_a_try_is_where_the_next_power_on_goes(rig: Rig) -> None:
    bl = rig.bootloader
    bl.try_once("B")
    for _ in range(rig.attempts - 1):
        assert rig.boot() == "B"
        assert bl.primary() == "B"
    assert rig.boot() == "B"
    assert bl.primary() == "A"


def test_mark_good_keeps_the_new_slot(rig: Rig) -> None:
    bl = rig.bootloader
    bl.try_once("B")
    assert rig.boot() == "B"
    bl.mark_good("B")
    for _ in range(3 * rig.attempts + 1):
        assert rig.boot() == "B"
        bl.mark_good("B")
    assert bl.primary() == "B"
    assert bl.state("B").bootable


def test_mark_bad_switches_back(rig: Rig) -> None:
    bl = rig.bootloader
    bl.try_once("B")
    assert rig.boot() == "B"
    bl.mark_bad("B")
    assert bl.primary() == "A"
    assert not bl.state("B").bootable
    assert bl.state("B").attempts_left in (0, None)
    assert rig.boot() == "A"
    assert bl.current() == "A"


def test_a_slot_that_fell_back_can_be_tried_again(rig: Rig) -> None:
    bl = rig.bootloader
    bl.try_once("B")
    for _ in range(rig.attempts):
        rig.boot()
    assert rig.boot() == "A"
    bl.mark_good("A")
    bl.try_once("B")
    assert rig.boot() == "B"
    bl.mark_good("B")
    assert rig.boot() == "B"


def test_marking_a_bad_slot_good_makes_it_bootable_again(rig: Rig) -> None:
    bl = rig.bootloader
    bl.mark_bad("B")
    assert not bl.state("B").bootable
    bl.mark_good("B")
    assert bl.state("B").bootable
    assert bl.primary() == "A"


def test_unknown_slots_are_refused(rig: Rig) -> None:
    for slot in ["C", "a", "", "A B", "../x"]:
        for verb in ["try_once", "mark_good", "mark_bad", "state"]:
            with pytest.raises(BootloaderError):
                getattr(rig.bootloader, verb)(slot)
    assert rig.bootloader.primary() == "A"
