"""A simulated bootloader: a JSON file for its environment, Python for its boot script.

For tests and the demo, where there is no real firmware. The state file holds
the same variables as the U-Boot backend (``BOOT_ORDER``,
``BOOT_<slot>_LEFT``) and :meth:`SimulatedBootloader.boot` runs the same boot
script logic (:meth:`~skylift.agent.bootloader.uboot.UBootScheme.boot`), so
a slot that is tried and never marked good falls back by itself once its
attempts run out, exactly as on a board::

    bootloader = SimulatedBootloader(state_path=Path("boot.json"))
    bootloader.boot()          # power-on: boots "A"
    bootloader.try_once("B")
    bootloader.boot()          # "B", 2 attempts left; without mark_good("B") ...
    bootloader.boot(); bootloader.boot(); bootloader.boot()   # ... "A" again

A missing state file is a board with an empty environment: the boot script
defaults apply (every slot in order, full counters). Every write is atomic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from skylift.agent.bootloader.base import (
    DEFAULT_ATTEMPTS,
    DEFAULT_SLOTS,
    Bootloader,
    BootloaderError,
    SlotState,
    check_attempts,
)
from skylift.agent.bootloader.uboot import UBootScheme
from skylift.fsutil import atomic_write

__all__ = ["FORMAT", "SimulatedBootloader"]

FORMAT = "skylift-simulated-bootloader/1"
_MAX_STATE_BYTES = 64 * 1024
_Rule = Callable[[Mapping[str, str], str], dict[str, str | None]]


class SimulatedBootloader(Bootloader):
    """A bootloader with boot counting and fallback, kept in one JSON file.

    The file records the environment, the slot booted last (what the kernel
    command line would say) and the number of boots so far.
    """

    def __init__(
        self,
        *,
        state_path: Path,
        slots: Sequence[str] = DEFAULT_SLOTS,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        super().__init__(slots=slots)
        self.attempts = check_attempts(attempts)
        self.state_path = Path(state_path)
        self.scheme = UBootScheme(self.slots, self.attempts)

    def boot(self) -> str:
        """Power the simulated board on: pick, count and record the slot it boots.

        Raises:
            BootloaderError: no slot can boot, or the state file is unusable.
        """
        state = self._load()
        slot, changes = self.scheme.boot(state["env"])
        state["env"] = _apply(state["env"], changes)
        state["booted"] = slot
        state["boots"] += 1
        self._save(state)
        return slot

    def environment(self) -> dict[str, str]:
        """The simulated environment's variables, for tests and the demo.

        Raises:
            BootloaderError: the state file is unusable.
        """
        return dict(self._load()["env"])

    def primary(self) -> str:
        """See :meth:`Bootloader.primary`: what the boot script would pick at the next power-on."""
        return self.scheme.boot(self._load()["env"])[0]

    def current(self) -> str:
        """The slot the last :meth:`boot` started.

        Raises:
            BootloaderError: the simulated board has not booted yet.
        """
        booted = self._load()["booted"]
        if booted is None:
            raise BootloaderError(
                f"the simulated board {self.state_path} has not booted yet",
                hint="call boot() first",
            )
        return str(booted)

    def try_once(self, slot: str) -> None:
        """See :meth:`Bootloader.try_once`."""
        self._change(self.scheme.try_once, slot)

    def mark_good(self, slot: str) -> None:
        """See :meth:`Bootloader.mark_good`."""
        self._change(self.scheme.mark_good, slot)

    def mark_bad(self, slot: str) -> None:
        """See :meth:`Bootloader.mark_bad`."""
        self._change(self.scheme.mark_bad, slot)

    def state(self, slot: str) -> SlotState:
        """See :meth:`Bootloader.state`."""
        self._check_slot(slot)
        return self.scheme.state(self._load()["env"], slot)

    def _change(self, rule: _Rule, slot: str) -> None:
        self._check_slot(slot)
        state = self._load()
        state["env"] = _apply(state["env"], rule(state["env"], slot))
        self._save(state)

    def _load(self) -> dict[str, Any]:
        path = self.state_path
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return {"format": FORMAT, "env": {}, "booted": None, "boots": 0}
        except OSError as e:
            raise BootloaderError(
                f"cannot read simulated bootloader {path}: {e.strerror or e}"
            ) from e
        if len(raw) > _MAX_STATE_BYTES:
            raise BootloaderError(
                f"simulated bootloader {path} is larger than {_MAX_STATE_BYTES} bytes"
            )
        try:
            state = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BootloaderError(f"simulated bootloader {path} is not valid JSON") from e
        if not (
            isinstance(state, dict)
            and state.get("format") == FORMAT
            and isinstance(state.get("env"), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in state["env"].items())
            and (state.get("booted") is None or isinstance(state.get("booted"), str))
            and isinstance(state.get("boots"), int)
        ):
            raise BootloaderError(f"simulated bootloader {path} is not a {FORMAT} state file")
        return state

    def _save(self, state: Mapping[str, Any]) -> None:
        data = json.dumps(state, indent=2, sort_keys=True).encode() + b"\n"
        try:
            atomic_write(self.state_path, data)
        except OSError as e:
            raise BootloaderError(
                f"cannot write simulated bootloader {self.state_path}: {e.strerror or e}"
            ) from e


def _apply(env: Mapping[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    out = dict(env)
    for name, value in changes.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out
