"""Slots: file and block slots behind one port; capacity refused before touching; pairing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skylift.agent import slots
from skylift.agent.config import SlotConfig, parse_config
from skylift.agent.slots import (
    SlotError,
    SlotTooSmallError,
    UnsupportedSlotError,
    open_for_install,
    open_for_reading,
    slot_pair,
)

from .test_config import MINIMAL


def file_slot(path: Path, size: int = 64 * 1024) -> SlotConfig:
    return SlotConfig("rootfs", "B", "file", path, size_bytes=size)


def test_file_slot_is_created_at_the_image_size_and_round_trips(tmp_path: Path) -> None:
    slot = file_slot(tmp_path / "b.img")
    dev = open_for_install(slot, 10_000)
    try:
        assert dev.size() == 10_000
        dev.write_at(4096, b"hello")
        dev.write_at(0, memoryview(b"start"))
        dev.sync()
        assert dev.read_range(4096, 5) == b"hello"
    finally:
        dev.close()
    reader = open_for_reading(slot)
    try:
        assert reader.read_range(0, 5) == b"start"
        assert reader.size() == 10_000
        with pytest.raises(SlotError, match="ends before byte 10001"):
            reader.read_range(9_999, 2)
    finally:
        reader.close()


def test_file_slot_is_resized_to_each_image(tmp_path: Path) -> None:
    path = tmp_path / "b.img"
    path.write_bytes(b"x" * 50_000)
    dev = open_for_install(file_slot(path), 20_000)
    dev.close()
    assert path.stat().st_size == 20_000


def test_image_larger_than_file_slot_is_refused_before_touching(tmp_path: Path) -> None:
    path = tmp_path / "b.img"
    with pytest.raises(SlotTooSmallError, match="larger than slot rootfs/B") as info:
        open_for_install(file_slot(path, size=8192), 8193)
    assert "nothing was written" in info.value.diagnostics()
    assert not path.exists()
    path.write_bytes(b"old image")
    with pytest.raises(SlotTooSmallError):
        open_for_install(file_slot(path, size=8192), 1 << 20)
    assert path.read_bytes() == b"old image"


def test_file_slot_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SlotError, match="cannot open"):
        open_for_install(file_slot(tmp_path), 100)


def test_block_slot_capacity_comes_from_the_device(tmp_path: Path) -> None:
    # A regular file stands in for the device: the block code path never resizes it.
    device = tmp_path / "mmcblk0p3"
    device.write_bytes(bytes(32 * 1024))
    slot = SlotConfig("rootfs", "B", "block", device)
    with pytest.raises(SlotTooSmallError, match=r"\(32768 bytes\)"):
        open_for_install(slot, 32 * 1024 + 1)
    assert device.read_bytes() == bytes(32 * 1024)
    dev = open_for_install(slot, 1000)
    try:
        assert dev.size() == 32 * 1024  # not cut to the image
        dev.write_at(100, b"abc")
        dev.sync()
    finally:
        dev.close()
    assert device.read_bytes()[100:103] == b"abc"


def test_missing_block_device_is_a_slot_error(tmp_path: Path) -> None:
    with pytest.raises(SlotError, match="cannot open slot rootfs/B"):
        open_for_install(SlotConfig("rootfs", "B", "block", tmp_path / "nope"), 1)


def test_a_directory_slot_is_not_opened_as_a_device(tmp_path: Path) -> None:
    # skylift.agent.dirslot extracts tar payloads into it (tests/agent/test_dirslot.py).
    slot = SlotConfig("app", "B", "directory", tmp_path / "app", include=("**",))
    with pytest.raises(UnsupportedSlotError, match="takes a tar payload extracted into it"):
        open_for_install(slot, 10)
    with pytest.raises(UnsupportedSlotError):
        open_for_reading(slot)
    assert not (tmp_path / "app").exists()


@pytest.mark.parametrize(("booted", "active", "inactive"), [("A", "A", "B"), ("B", "B", "A")])
def test_pairing_follows_the_booted_slot(booted: str, active: str, inactive: str) -> None:
    config = parse_config(MINIMAL)
    pair = slot_pair(config, "rootfs", booted)
    assert (pair.active.name, pair.inactive.name) == (active, inactive)
    assert pair.inactive.path.name == f"{inactive.lower()}.img"


def test_pairing_refuses_unknown_class_or_boot_name() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(SlotError, match="no slot of class 'kernel'"):
        slot_pair(config, "kernel", "A")
    with pytest.raises(SlotError, match="booted slot 'C'"):
        slot_pair(config, "rootfs", "C")


def test_zero_range_punches_a_hole_in_a_file_slot(tmp_path: Path) -> None:
    path = tmp_path / "b.img"
    path.write_bytes(b"\xaa" * (1 << 20))
    before = os.stat(path).st_blocks
    dev = open_for_install(SlotConfig("rootfs", "B", "file", path, size_bytes=1 << 20), 1 << 20)
    try:
        dev.zero_range(4096, 512 * 1024)
        dev.sync()
    finally:
        dev.close()
    data = path.read_bytes()
    assert data[:4096] == b"\xaa" * 4096
    assert data[4096 : 4096 + 512 * 1024] == bytes(512 * 1024)
    assert data[4096 + 512 * 1024 :] == b"\xaa" * ((1 << 20) - 4096 - 512 * 1024)
    assert os.stat(path).st_blocks < before  # the blocks were freed, not written


def test_zero_range_writes_zeros_where_holes_are_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slots, "_punch_hole", lambda fd, offset, length: False)
    path = tmp_path / "b.img"
    path.write_bytes(b"\xaa" * (3 << 20))
    dev = open_for_install(SlotConfig("rootfs", "B", "file", path, size_bytes=3 << 20), 3 << 20)
    try:
        dev.zero_range(1, (2 << 20) + 5)  # more than one 1 MiB piece of zeros
    finally:
        dev.close()
    data = path.read_bytes()
    assert data[0] == 0xAA
    assert data[1 : (2 << 20) + 6] == bytes((2 << 20) + 5)
    assert data[(2 << 20) + 6 :] == b"\xaa" * ((3 << 20) - (2 << 20) - 6)
