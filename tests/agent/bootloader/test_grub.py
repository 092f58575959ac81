"""GRUB environment block: the format, and the real grub-editenv (package grub-common)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from skylift.agent.bootloader import BootloaderError, GrubBootloader
from skylift.agent.bootloader.grub import BLOCK_SIZE, HEADER, GrubEnvBlock, GrubScheme, create_block

from .rigs import require_tool

PACKAGE = "grub-common"


def grub_editenv(path: Path, *args: str) -> str:
    tool = require_tool("grub-editenv", PACKAGE)
    return subprocess.run(
        [tool, str(path), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def listed(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in grub_editenv(path, "list").splitlines())


def test_create_matches_grub_editenv(tmp_path: Path) -> None:
    grub_editenv(tmp_path / "theirs", "create")
    create_block(tmp_path / "ours")
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


def test_agent_writes_grub_editenv_reads(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    grub_editenv(path, "create")
    grub_editenv(path, "set", "saved_entry=1", "odd=back\\slash")
    bl = GrubBootloader(env_path=path)
    bl.mark_good("A")
    bl.try_once("B")
    assert listed(path) == {
        "saved_entry": "1",
        "odd": "back\\slash",
        "A_OK": "1",
        "A_TRY": "0",
        "B_OK": "1",
        "B_TRY": "0",
        "ORDER": "B A",
    }
    bl.mark_bad("B")
    assert listed(path)["B_OK"] == "0"


def test_grub_editenv_writes_agent_reads(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    grub_editenv(path, "create")
    grub_editenv(path, "set", "ORDER=B A", "A_OK=1", "A_TRY=0", "B_OK=1", "B_TRY=0", "x=a\nb")
    bl = GrubBootloader(env_path=path)
    assert bl.read()["x"] == "a\nb"
    assert bl.primary() == "B"
    grub_editenv(path, "set", "B_TRY=1")  # GRUB started B and nobody marked it good
    assert bl.primary() == "A"
    assert not bl.state("B").bootable
    grub_editenv(path, "unset", "ORDER")
    assert bl.scheme.order(bl.read()) == ["A", "B"]


def test_bytes_match_grub_editenv_edit_for_edit(tmp_path: Path) -> None:
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    grub_editenv(theirs, "create")
    create_block(ours)
    bl = GrubBootloader(env_path=ours)
    steps = [
        (lambda: bl.mark_good("A"), ["set", "A_OK=1", "A_TRY=0"]),
        (lambda: bl.try_once("B"), ["set", "B_OK=1", "B_TRY=0", "ORDER=B A"]),
        (lambda: bl.update({"x": "a\\b\nc"}), ["set", "x=a\\b\nc"]),
        (lambda: bl.mark_bad("B"), ["set", "B_OK=0", "B_TRY=0"]),
        (lambda: bl.update({"ORDER": None}), ["unset", "ORDER"]),
    ]
    for ours_step, their_args in steps:
        ours_step()
        grub_editenv(theirs, *their_args)
        assert ours.read_bytes() == theirs.read_bytes()


def test_write_is_atomic_and_keeps_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    create_block(path)
    path.chmod(0o600)
    before = os.stat(path)
    GrubBootloader(env_path=path).mark_good("A")
    after = os.stat(path)
    assert after.st_ino != before.st_ino
    assert after.st_mode & 0o777 == 0o600


def test_a_full_block_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    create_block(path)
    bl = GrubBootloader(env_path=path)
    before = path.read_bytes()
    with pytest.raises(BootloaderError, match="full"):
        bl.update({"big": "x" * BLOCK_SIZE})
    assert path.read_bytes() == before


def _block(body: bytes) -> bytes:
    return body + b"#" * (BLOCK_SIZE - len(body))


CORRUPT = {
    "too short": HEADER + b"A_OK=1\n",
    "one byte short": _block(HEADER)[:-1],
    "one byte long": _block(HEADER) + b"#",
    "oversize": _block(HEADER) * 4,
    "empty": b"",
    "no header": _block(b"# GRUB Environment\nA_OK=1\n"),
    "line without =": _block(HEADER + b"A_OK=1\nbogus\n"),
    "empty name": _block(HEADER + b"=1\n"),
    "garbage in the padding": _block(HEADER + b"A_OK=1\n")[:-10] + b"\0" * 10,
    "zero padding": (HEADER + b"A_OK=1\n").ljust(BLOCK_SIZE, b"\0"),
    "binary garbage": bytes((i * 37 + 11) % 256 for i in range(BLOCK_SIZE)),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_block_is_refused_and_left_alone(tmp_path: Path, case: str) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(CORRUPT[case])
    bl = GrubBootloader(env_path=path)
    for call in (
        bl.primary,
        lambda: bl.state("A"),
        lambda: bl.try_once("B"),
        lambda: bl.mark_good("A"),
        lambda: bl.mark_bad("B"),
    ):
        with pytest.raises(BootloaderError) as info:
            call()
        assert "\n" not in info.value.diagnostics()
    assert path.read_bytes() == CORRUPT[case]


def test_missing_block_is_a_bootloader_error(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="cannot read"):
        GrubBootloader(env_path=tmp_path / "nope").primary()


def test_comments_and_escapes_survive_a_rewrite() -> None:
    raw = _block(HEADER + b"# kept\nx=a\\\\b\\\nc\n")
    block = GrubEnvBlock.parse(raw)
    assert block.variables() == {"x": "a\\b\nc"}
    assert block.encode() == raw


# --- the grub.cfg mirror ----------------------------------------------------------


def test_boot_script_marks_the_started_slot_as_tried() -> None:
    env = {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"}
    assert GrubScheme(("A", "B")).boot(env) == ("B", {"A_TRY": "0", "B_TRY": "1"})


def test_boot_script_skips_a_tried_slot() -> None:
    env = {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"}
    assert GrubScheme(("A", "B")).boot(env) == ("A", {"A_TRY": "1", "B_TRY": "1"})


def test_boot_script_resets_try_flags_when_every_slot_was_tried() -> None:
    env = {"ORDER": "B A", "A_OK": "1", "A_TRY": "1", "B_OK": "0", "B_TRY": "1"}
    assert GrubScheme(("A", "B")).boot(env) == ("A", {"A_TRY": "1", "B_TRY": "1"})


def test_boot_script_without_an_ok_slot_cannot_boot() -> None:
    with pytest.raises(BootloaderError, match="not boot"):
        GrubScheme(("A", "B")).boot({})
