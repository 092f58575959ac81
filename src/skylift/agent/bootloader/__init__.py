"""Bootloader backends behind one port, chosen by name.

=========  ===========================================  ==========================
name       backend                                      options
=========  ===========================================  ==========================
``uboot``  :class:`~.uboot.UBootBootloader`             ``config_path``, ``attempts``
``grub``   :class:`~.grub.GrubBootloader`               ``env_path``
``file``   :class:`~.simulated.SimulatedBootloader`     ``state_path``, ``attempts``
``script`` :class:`~.script.ScriptBootloader`           ``script_path``, ``timeout_s``
=========  ===========================================  ==========================

All take ``slots`` (bootnames, default ``("A", "B")``); ``uboot`` and ``grub``
take ``cmdline_path`` (default ``/proc/cmdline``).
"""

from __future__ import annotations

import inspect
from typing import Any

from skylift.agent.bootloader.base import Bootloader, BootloaderError, SlotState
from skylift.agent.bootloader.grub import GrubBootloader
from skylift.agent.bootloader.script import ScriptBootloader
from skylift.agent.bootloader.simulated import SimulatedBootloader
from skylift.agent.bootloader.uboot import UBootBootloader

__all__ = [
    "BACKENDS",
    "Bootloader",
    "BootloaderError",
    "GrubBootloader",
    "ScriptBootloader",
    "SimulatedBootloader",
    "SlotState",
    "UBootBootloader",
    "open_bootloader",
]

BACKENDS: dict[str, type[Bootloader]] = {
    "file": SimulatedBootloader,
    "grub": GrubBootloader,
    "script": ScriptBootloader,
    "uboot": UBootBootloader,
}


def open_bootloader(kind: str, **options: Any) -> Bootloader:
    """The backend named ``kind``, built with ``options``.

    Raises:
        BootloaderError: an unknown name (the message lists the known ones),
            an option the backend does not take or lacks, or a backend that
            cannot start (for example an unreadable ``fw_env.config``).
    """
    try:
        cls = BACKENDS[kind]
    except (KeyError, TypeError):
        raise BootloaderError(
            f"unknown bootloader {kind!r}; known: {', '.join(sorted(BACKENDS))}"
        ) from None
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as e:
        raise BootloaderError(f"bad options for bootloader {kind!r}: {e}") from None
    return cls(**options)
