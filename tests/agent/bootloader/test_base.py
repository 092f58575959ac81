"""The port's shared parts: the kernel command line and the factory."""

from __future__ import annotations

from pathlib import Path

import pytest

from skylift.agent.bootloader import (
    BootloaderError,
    GrubBootloader,
    ScriptBootloader,
    SimulatedBootloader,
    UBootBootloader,
    open_bootloader,
)
from skylift.agent.bootloader.base import read_booted_slot
from skylift.agent.bootloader.grub import create_block
from skylift.errors import SkyliftError

from .rigs import write_fw_env_config


@pytest.mark.parametrize(
    ("cmdline", "slot"),
    [
        ("console=ttyS0 root=/dev/mmcblk0p2 rauc.slot=B rootwait\n", "B"),
        ("skylift.slot=A quiet", "A"),
        ("rauc.slot=B skylift.slot=A", "A"),
        ("xrauc.slot=B rauc.slot=A", "A"),
    ],
)
def test_booted_slot_from_the_command_line(tmp_path: Path, cmdline: str, slot: str) -> None:
    path = tmp_path / "cmdline"
    path.write_text(cmdline)
    assert read_booted_slot(path) == slot


@pytest.mark.parametrize(
    "cmdline", ["root=/dev/sda1 quiet", "", "rauc.slot=", "skylift.slot=../x", "rauc.slot=A;B"]
)
def test_command_line_without_a_usable_slot(tmp_path: Path, cmdline: str) -> None:
    path = tmp_path / "cmdline"
    path.write_text(cmdline)
    with pytest.raises(BootloaderError):
        read_booted_slot(path)


def test_unreadable_and_oversize_command_lines(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="cannot read"):
        read_booted_slot(tmp_path / "nope")
    path = tmp_path / "cmdline"
    path.write_text("x" * (64 * 1024 + 1))
    with pytest.raises(BootloaderError, match="too long"):
        read_booted_slot(path)


def test_bootloader_error_is_a_skylift_error() -> None:
    assert issubclass(BootloaderError, SkyliftError)


def test_factory_builds_each_backend(tmp_path: Path) -> None:
    create_block(tmp_path / "grubenv")
    config = write_fw_env_config(tmp_path, redundant=False)
    built = [
        open_bootloader("file", state_path=tmp_path / "b.json"),
        open_bootloader("grub", env_path=tmp_path / "grubenv"),
        open_bootloader("script", script_path=tmp_path / "s.sh", timeout_s=5),
        open_bootloader("uboot", config_path=config, attempts=2, slots=["x", "y"]),
    ]
    kinds = [SimulatedBootloader, GrubBootloader, ScriptBootloader, UBootBootloader]
    assert [type(b) for b in built] == kinds
    assert built[3].slots == ("x", "y")
    assert built[3].attempts == 2


def test_factory_rejects_unknown_names_listing_the_known_ones() -> None:
    with pytest.raises(BootloaderError) as info:
        open_bootloader("barebox")
    assert info.value.diagnostics() == (
        "unknown bootloader 'barebox'; known: file, grub, script, uboot"
    )


def test_factory_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="bad options for bootloader 'file'"):
        open_bootloader("file", state_path=tmp_path / "b.json", colour="red")
    with pytest.raises(BootloaderError, match="bad options for bootloader 'grub'"):
        open_bootloader("grub", env_path=tmp_path / "g", attempts=3)
