"""The bootloader port: which slot boots next, try a slot, mark it good or bad.

Every backend answers the same verbs, after RAUC's bootchooser:

- :meth:`Bootloader.primary`: the slot the next power-on will start;
- :meth:`Bootloader.current`: the slot that is running now;
- :meth:`Bootloader.try_once`: boot ``slot`` next with a limited number of
  attempts, the old primary staying behind it as the fallback;
- :meth:`Bootloader.mark_good` / :meth:`Bootloader.mark_bad`;
- :meth:`Bootloader.state`: is a slot bootable, and how many attempts are left.

Boot counting and fallback belong to the bootloader, not to the agent: a
slot that is tried and never reaches a healthy agent falls back by itself once
its attempts run out. With the counting schemes used here (RAUC's), the agent
calls :meth:`~Bootloader.mark_good` for the running slot on every boot it
judges healthy, as ``rauc-mark-good.service`` does.

Slots are named by their *bootname*, a short word such as ``A`` or ``B`` that
the boot script also uses in its variable names.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from skylift.errors import SkyliftError

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_SLOTS",
    "MAX_ATTEMPTS",
    "PROC_CMDLINE",
    "Bootloader",
    "BootloaderError",
    "SlotState",
    "check_attempts",
    "check_bootname",
    "read_booted_slot",
]

PROC_CMDLINE = Path("/proc/cmdline")
DEFAULT_SLOTS: tuple[str, ...] = ("A", "B")
DEFAULT_ATTEMPTS = 3  # RAUC's boot-attempts default
# U-Boot's setexpr writes hex and its `test -gt` reads decimal: below 10 they agree.
MAX_ATTEMPTS = 9

_BOOTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,15}")
_MAX_CMDLINE_BYTES = 64 * 1024
_CMDLINE_KEYS = ("skylift.slot=", "rauc.slot=")


class BootloaderError(SkyliftError):
    """The bootloader's state could not be read or changed."""


@dataclass(frozen=True)
class SlotState:
    """What the bootloader knows about one slot.

    ``bootable`` is false for a slot marked bad or whose attempts ran out.
    ``attempts_left`` is how many more boots the bootloader will try it,
    ``None`` when the backend does not say (the script backend).
    """

    bootable: bool
    attempts_left: int | None


def check_bootname(name: str) -> str:
    """Return ``name`` if it is a usable bootname.

    Raises:
        BootloaderError: not 1 to 16 letters, digits or underscores.
    """
    if not isinstance(name, str) or not _BOOTNAME.fullmatch(name):
        raise BootloaderError(
            f"invalid slot bootname {name!r}",
            hint="use 1 to 16 letters, digits or underscores, such as A or B",
        )
    return name


def check_attempts(attempts: int) -> int:
    """Return ``attempts`` if it is between 1 and :data:`MAX_ATTEMPTS`.

    Raises:
        BootloaderError: out of range.
    """
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise BootloaderError(f"boot attempts must be an integer, not {attempts!r}")
    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise BootloaderError(f"boot attempts must be between 1 and {MAX_ATTEMPTS}, not {attempts}")
    return attempts


def read_booted_slot(cmdline_path: Path = PROC_CMDLINE) -> str:
    """The slot named on the kernel command line by ``skylift.slot=`` or ``rauc.slot=``.

    Raises:
        BootloaderError: the command line is unreadable or names no valid slot.
    """
    try:
        with open(cmdline_path, "rb") as f:
            raw = f.read(_MAX_CMDLINE_BYTES + 1)
    except OSError as e:
        raise BootloaderError(
            f"cannot read the kernel command line {cmdline_path}: {e.strerror or e}"
        ) from e
    if len(raw) > _MAX_CMDLINE_BYTES:
        raise BootloaderError(f"kernel command line {cmdline_path} is too long")
    words = raw.decode("utf-8", "replace").split()
    for key in _CMDLINE_KEYS:
        for word in words:
            if word.startswith(key):
                return check_bootname(word[len(key) :])
    raise BootloaderError(
        f"the kernel command line {cmdline_path} names no slot",
        hint="make the boot script add skylift.slot=<bootname> (or rauc.slot=) to bootargs",
    )


class Bootloader(abc.ABC):
    """One bootloader, seen through the verbs an A/B updater needs.

    ``slots`` are the bootnames in their default order; ``attempts`` is how
    many boots :meth:`try_once` grants, or ``None`` when the bootloader
    decides alone.
    """

    slots: tuple[str, ...]
    attempts: int | None

    def __init__(self, *, slots: Sequence[str] = DEFAULT_SLOTS) -> None:
        names = tuple(check_bootname(s) for s in slots)
        if len(names) < 2 or len(set(names)) != len(names):
            raise BootloaderError(f"need two or more distinct slot bootnames, got {list(names)}")
        self.slots = names
        self.attempts = None

    @abc.abstractmethod
    def primary(self) -> str:
        """The slot the bootloader will start at the next power-on.

        This is what the boot script would pick now, counters and try flags
        included: during a try that has used its attempts it is already the
        fallback.

        Raises:
            BootloaderError: no slot is bootable, or the state is unreadable.
        """

    @abc.abstractmethod
    def current(self) -> str:
        """The slot that was booted, as the bootloader told the kernel.

        Raises:
            BootloaderError: the booted slot is not known.
        """

    @abc.abstractmethod
    def try_once(self, slot: str) -> None:
        """Boot ``slot`` next, for a limited number of attempts.

        The previous primary stays in the boot order behind it, so a slot
        that never gets marked good falls back to it by itself.

        Raises:
            BootloaderError: unknown slot, or the state cannot be changed.
        """

    @abc.abstractmethod
    def mark_good(self, slot: str) -> None:
        """Record that ``slot`` booted and works; refill its attempts.

        Raises:
            BootloaderError: unknown slot, or the state cannot be changed.
        """

    @abc.abstractmethod
    def mark_bad(self, slot: str) -> None:
        """Never boot ``slot`` again until it is tried or marked good.

        Raises:
            BootloaderError: unknown slot, or the state cannot be changed.
        """

    @abc.abstractmethod
    def state(self, slot: str) -> SlotState:
        """Whether ``slot`` is bootable and how many attempts it has left.

        Raises:
            BootloaderError: unknown slot, or the state is unreadable.
        """

    def _check_slot(self, slot: str) -> str:
        if slot not in self.slots:
            raise BootloaderError(
                f"unknown slot {slot!r}; this bootloader has {', '.join(self.slots)}"
            )
        return slot
