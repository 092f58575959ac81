"""Hooks: the device's own executables, run in one phase of an update each.

A product customises an update with four hooks (``[hooks]`` in agent.toml,
docs/agent-config.md): ``pre_install`` (before the inactive slot is written;
a failure cancels the install), ``post_install`` (after it was written and
verified, before the reboot), ``health_check`` (in the trial boot; a failure
rolls back) and ``on_rollback`` (on the old slot, after a rollback).

A hook runs with no standard input, in a session of its own, with variables
that describe the update (``SKYLIFT_PHASE``, ``SKYLIFT_VERSION``,
``SKYLIFT_SLOT``...). Its standard output and error are merged and only
their tail is kept (:data:`~skylift.agent.reports.MAX_HOOK_OUTPUT_BYTES`),
for the report. A hook still running after ``timeout_s`` is killed with its
whole process group and counts as failed. A hook that is configured but
missing or not executable is never skipped silently:
:meth:`HookRunner.check` refuses it when the agent starts, and running it
anyway is a failed result that says why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from skylift.agent.config import HOOK_PHASES, HooksConfig
from skylift.agent.reports import MAX_HOOK_OUTPUT_BYTES
from skylift.errors import SkyliftError

__all__ = ["HookError", "HookResult", "HookRunner", "run_hook"]

#: After SIGTERM to the process group, how long before SIGKILL.
_KILL_GRACE_S = 2.0
#: After the hook exited, how long to wait for its output pipe to close
#: (a child it left behind may hold it open).
_DRAIN_S = 1.0
_READ_BYTES = 64 * 1024


class HookError(SkyliftError):
    """A configured hook cannot be run: missing, not a file, or not executable."""

    hint = "fix the path in [hooks] of agent.toml, or remove the key"


@dataclass(frozen=True)
class HookResult:
    """What one hook run did. ``ran`` is False when no hook is configured for the phase."""

    phase: str
    ran: bool
    ok: bool
    exit_code: int | None = None
    timed_out: bool = False
    output: str = ""
    duration_s: float = 0.0
    reason: str | None = None


def _check_executable(phase: str, path: Path) -> None:
    if not path.is_file():
        raise HookError(f"the {phase} hook {path} does not exist or is not a file")
    if not os.access(path, os.X_OK):
        raise HookError(f"the {phase} hook {path} is not executable")


class _Tail:
    """Reads a pipe to its end, keeping only its last ``limit`` bytes."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._data = bytearray()
        self.cut = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self._stream.fileno()
        with contextlib.suppress(OSError):
            while block := os.read(fd, _READ_BYTES):
                self._data += block
                if len(self._data) > self._limit:
                    del self._data[: len(self._data) - self._limit]
                    self.cut = True

    def text(self, wait_s: float) -> str:
        self._thread.join(wait_s)
        text = bytes(self._data).decode("utf-8", "replace")
        return f"[...cut] {text}" if self.cut else text


def run_hook(
    phase: str,
    path: Path,
    *,
    env: Mapping[str, str],
    timeout_s: float,
    max_output_bytes: int = MAX_HOOK_OUTPUT_BYTES,
) -> HookResult:
    """Run the hook at ``path`` for ``phase``, killing its process group after ``timeout_s``.

    ``env`` is added to the agent's environment. Never raises for what the
    hook does: a missing file, a non-zero exit or a timeout are a result
    with ``ok=False`` and a ``reason``.
    """
    started = time.monotonic()
    try:
        _check_executable(phase, path)
        child = subprocess.Popen(
            [str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,  # its own process group: a timeout kills all of it
            close_fds=True,
        )
    except (HookError, OSError) as e:
        why = e.message if isinstance(e, HookError) else f"cannot run {path}: {e.strerror or e}"
        return HookResult(phase, ran=True, ok=False, reason=f"{phase} hook: {why}")
    assert child.stdout is not None
    tail = _Tail(child.stdout, max_output_bytes)
    timed_out = False
    try:
        code = child.wait(timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(child)
        code = child.wait()
    finally:
        output = tail.text(_DRAIN_S)
        with contextlib.suppress(OSError):
            child.stdout.close()
    elapsed = time.monotonic() - started
    if timed_out:
        reason = f"{phase} hook {path.name} timed out after {timeout_s:g} s and was killed"
    elif code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        reason = f"{phase} hook {path.name} {how}"
    else:
        reason = None
    return HookResult(
        phase,
        ran=True,
        ok=reason is None,
        exit_code=None if timed_out else code,
        timed_out=timed_out,
        output=output,
        duration_s=elapsed,
        reason=reason,
    )


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM the hook's process group, then SIGKILL what is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(_KILL_GRACE_S)
    # The leader may be gone while children it started still hold the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


class HookRunner:
    """The configured hooks, run by phase name (``pre_install``, ``health_check``...)."""

    def __init__(self, hooks: HooksConfig, *, max_output_bytes: int = MAX_HOOK_OUTPUT_BYTES):
        self._hooks = hooks
        self._max_output = max_output_bytes

    @property
    def timeout_s(self) -> float:
        """How long a hook may run before it is killed."""
        return self._hooks.timeout_s

    def configured(self, phase: str) -> Path | None:
        """The hook configured for ``phase``, or None."""
        return self._hooks.for_phase(phase)

    def check(self) -> None:
        """Refuse a configured hook that is missing or not executable (done at start).

        Raises:
            HookError: the first such hook.
        """
        for phase in HOOK_PHASES:
            path = self._hooks.for_phase(phase)
            if path is not None:
                _check_executable(phase, path)

    def run(self, phase: str, env: Mapping[str, str]) -> HookResult:
        """Run the hook for ``phase`` with ``env`` (plus ``SKYLIFT_PHASE``).

        No hook configured is a success that did not run (``ran=False``).
        """
        path = self._hooks.for_phase(phase)
        if path is None:
            return HookResult(phase, ran=False, ok=True)
        return run_hook(
            phase,
            path,
            env={**env, "SKYLIFT_PHASE": phase},
            timeout_s=self._hooks.timeout_s,
            max_output_bytes=self._max_output,
        )
