"""A bootloader driven by a product's own executable, as RAUC's custom backend.

The executable is called with one verb and its arguments and answers on
standard output:

=========================  ==============================================
``get-primary``            prints the bootname booted next
``set-primary SLOT``       boot SLOT next, with the attempts it decides
``get-state SLOT``         prints ``good`` or ``bad``
``set-state SLOT good``    marks SLOT good (``bad``: never boot it again)
``get-current``            prints the bootname running now
=========================  ==============================================

A non-zero exit is a failure whose message is the last line of standard
error. Each call has a timeout, after which the process is killed, and its
output is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from skylift.agent.bootloader.base import (
    DEFAULT_SLOTS,
    Bootloader,
    BootloaderError,
    SlotState,
    check_bootname,
)

__all__ = ["ScriptBootloader"]


class ScriptBootloader(Bootloader):
    """Every verb is one run of ``script_path``.

    ``timeout_s`` bounds each run; ``max_output_bytes`` bounds what is read
    back from each of its output streams.
    """

    def __init__(
        self,
        *,
        script_path: Path,
        slots: Sequence[str] = DEFAULT_SLOTS,
        timeout_s: float = 30.0,
        max_output_bytes: int = 4096,
    ) -> None:
        super().__init__(slots=slots)
        if timeout_s <= 0:
            raise BootloaderError(f"bootloader script timeout must be positive, not {timeout_s}")
        self.script_path = Path(script_path)
        self.timeout_s = timeout_s
        self.max_output_bytes = max_output_bytes

    def primary(self) -> str:
        """See :meth:`Bootloader.primary`."""
        return self._slot_answer(self._run("get-primary"), "get-primary")

    def current(self) -> str:
        """See :meth:`Bootloader.current`."""
        return self._slot_answer(self._run("get-current"), "get-current")

    def try_once(self, slot: str) -> None:
        """See :meth:`Bootloader.try_once`."""
        self._run("set-primary", self._check_slot(slot))

    def mark_good(self, slot: str) -> None:
        """See :meth:`Bootloader.mark_good`."""
        self._run("set-state", self._check_slot(slot), "good")

    def mark_bad(self, slot: str) -> None:
        """See :meth:`Bootloader.mark_bad`."""
        self._run("set-state", self._check_slot(slot), "bad")

    def state(self, slot: str) -> SlotState:
        """See :meth:`Bootloader.state`; the script does not say how many attempts are left."""
        answer = self._run("get-state", self._check_slot(slot))
        if answer not in ("good", "bad"):
            raise BootloaderError(
                f"bootloader script {self.script_path} get-state answered {answer[:40]!r}, "
                "not good or bad"
            )
        return SlotState(bootable=answer == "good", attempts_left=None)

    def _slot_answer(self, answer: str, verb: str) -> str:
        try:
            return self._check_slot(check_bootname(answer))
        except BootloaderError as e:
            raise BootloaderError(
                f"bootloader script {self.script_path} {verb} answered {answer[:40]!r}: {e.message}"
            ) from e

    def _run(self, *args: str) -> str:
        """Run the script with ``args``; its stripped standard output."""
        what = f"bootloader script {self.script_path} {args[0]}"
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    [str(self.script_path), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # a timeout kills its children too
                )
            except OSError as e:
                raise BootloaderError(f"cannot run {what}: {e.strerror or e}") from e
            try:
                code = proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise BootloaderError(
                    f"{what} did not finish within {self.timeout_s:g} s"
                ) from None
            stdout = self._bounded(out, what, "output")
            stderr = self._bounded(err, what, "error output", keep_tail=True)
        if code != 0:
            lines = stderr.decode("utf-8", "replace").strip().splitlines()
            detail = lines[-1].strip() if lines else "no error output"
            raise BootloaderError(f"{what} failed (exit {code}): {detail}")
        try:
            return stdout.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BootloaderError(f"{what} printed bytes that are not UTF-8") from None

    def _bounded(self, f: IO[bytes], what: str, stream: str, *, keep_tail: bool = False) -> bytes:
        size = f.seek(0, os.SEEK_END)
        if size > self.max_output_bytes:
            if not keep_tail:
                raise BootloaderError(
                    f"{what} printed more than {self.max_output_bytes} bytes of {stream}"
                )
            f.seek(size - self.max_output_bytes)
        else:
            f.seek(0)
        return f.read(self.max_output_bytes)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
