"""Test rigs: each backend on temporary storage, plus a power-on that runs its boot script.

A rig's ``boot()`` is what happens at power-on on a real board: the boot
script picks a slot and saves its counters, then the kernel starts with the
slot on its command line. For U-Boot and GRUB the script is the Python mirror
of the documented one (``UBootScheme.boot``, ``GrubScheme.boot``) acting on
the real environment file, so counting and fallback are tested through the
backend's own storage.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from skylift.agent.bootloader import (
    Bootloader,
    GrubBootloader,
    ScriptBootloader,
    SimulatedBootloader,
    UBootBootloader,
)
from skylift.agent.bootloader.grub import create_block
from skylift.agent.bootloader.uboot import UBootEnv, load_fw_env_config

ENV_SIZE = 0x2000
BACKEND_NAMES = ["uboot", "uboot-redundant", "grub", "file", "script"]


def require_tool(tool: str, package: str) -> str:
    """The tool's path; a missing tool fails the test (never skips it)."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is missing: run `make test`, which installs Debian package {package}",
            pytrace=False,
        )
    return path


def write_fw_env_config(tmp_path: Path, *, redundant: bool, name: str = "uboot.env") -> Path:
    """An fw_env.config for an environment file (two copies in one file if redundant)."""
    env = tmp_path / name
    lines = [f"{env} 0x0 {ENV_SIZE:#x}"]
    if redundant:
        lines.append(f"{env} {ENV_SIZE:#x} {ENV_SIZE:#x}")
    config = tmp_path / f"{name}.config"
    config.write_text("\n".join(lines) + "\n")
    return config


def _write_cmdline(path: Path, slot: str) -> None:
    path.write_text(f"console=ttyS0,115200 root=/dev/mmcblk0p{slot} rootwait rauc.slot={slot}\n")


@dataclass
class Rig:
    """A backend, how many boots a try gets, and the board's power-on."""

    bootloader: Bootloader
    attempts: int
    boot: Callable[[], str]


def uboot_rig(tmp_path: Path, *, redundant: bool) -> Rig:
    config = write_fw_env_config(tmp_path, redundant=redundant)
    UBootEnv(load_fw_env_config(config)).create({})
    cmdline = tmp_path / "cmdline"
    bootloader = UBootBootloader(config_path=config, cmdline_path=cmdline)

    def boot() -> str:
        slot, changes = bootloader.scheme.boot(bootloader.env.read())
        bootloader.env.update(changes)
        _write_cmdline(cmdline, slot)
        return slot

    return Rig(bootloader, 3, boot)


def grub_rig(tmp_path: Path) -> Rig:
    grubenv = tmp_path / "grubenv"
    create_block(grubenv)
    cmdline = tmp_path / "cmdline"
    bootloader = GrubBootloader(env_path=grubenv, cmdline_path=cmdline)

    def boot() -> str:
        slot, changes = bootloader.scheme.boot(bootloader.read())
        bootloader.update(changes)
        _write_cmdline(cmdline, slot)
        return slot

    return Rig(bootloader, 1, boot)


def file_rig(tmp_path: Path) -> Rig:
    bootloader = SimulatedBootloader(state_path=tmp_path / "boot.json")
    return Rig(bootloader, 3, bootloader.boot)


SCRIPT = """\
#!{python}
# A product's bootloader script, here backed by the simulated bootloader.
import sys
from pathlib import Path

from skylift.agent.bootloader.base import BootloaderError
from skylift.agent.bootloader.simulated import SimulatedBootloader

board = SimulatedBootloader(state_path=Path({state!r}))
verb, *args = sys.argv[1:]
try:
    if verb == "get-primary":
        print(board.primary())
    elif verb == "get-current":
        print(board.current())
    elif verb == "set-primary":
        board.try_once(args[0])
    elif verb == "get-state":
        print("good" if board.state(args[0]).bootable else "bad")
    elif verb == "set-state":
        (board.mark_good if args[1] == "good" else board.mark_bad)(args[0])
    else:
        sys.exit(f"unknown verb {{verb}}")
except BootloaderError as e:
    sys.exit(e.diagnostics())
"""


def script_rig(tmp_path: Path) -> Rig:
    state = tmp_path / "board.json"
    script = tmp_path / "bootloader.py"
    script.write_text(textwrap.dedent(SCRIPT).format(python=sys.executable, state=str(state)))
    script.chmod(0o755)
    board = SimulatedBootloader(state_path=state)
    return Rig(ScriptBootloader(script_path=script), 3, board.boot)


def make_rig(name: str, tmp_path: Path) -> Rig:
    """A board that has booted slot A and marked it good, as after installation."""
    rig = {
        "uboot": lambda: uboot_rig(tmp_path, redundant=False),
        "uboot-redundant": lambda: uboot_rig(tmp_path, redundant=True),
        "grub": lambda: grub_rig(tmp_path),
        "file": lambda: file_rig(tmp_path),
        "script": lambda: script_rig(tmp_path),
    }[name]()
    rig.bootloader.mark_good("A")
    assert rig.boot() == "A"
    rig.bootloader.mark_good("A")
    return rig
