"""Simulated devices: real ``skylift agent run`` processes with file slots and a file bootloader.

:meth:`Fleet.layout` gives each device a directory of its own, as a board
would have it::

    <fleet>/<device id>/
        agent.toml          the agent's configuration (docs/agent-config.md)
        provisioning.key    the pk_... key, used once, to enroll (0600)
        health-check        the device's health-check hook (exits 0, or 1 on a "bad" version)
        boot.json           the simulated bootloader (docs/bootloaders.md: "File")
        slots/rootfs-a.img  slot A, then slot B: file slots of class rootfs
        state/              the agent's state directory (identity, journal, report queue)
        agent.log           what the agent logs

Devices start factory-fresh: no certificate and both slots empty. The first
``agent run`` powers the simulated board on (it boots slot A), enrolls with
the provisioning key and polls; the first release the hub offers is
installed into slot B and tried there, like any update.

:meth:`Fleet.start` starts one ``skylift agent run`` per device, each its own
process with its log in ``agent.log``; :meth:`Fleet.stop` sends SIGTERM (the
agent stops between two steps) and SIGKILL after a bounded wait.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from skylift.errors import SkyliftError

__all__ = ["DeviceSpec", "Fleet", "FleetError", "SimulatedDevice", "die_with_parent", "log_tail"]

SLOT_CLASS = "rootfs"
SLOT_NAMES = ("A", "B")
#: Lines of a log shown when something went wrong.
TAIL_LINES = 15


class FleetError(SkyliftError):
    """A simulated device could not be laid out, started or stopped."""


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device: its id and the versions its health check refuses.

    ``fail_health_on``: the device's health-check hook exits 1 when the
    version on trial is one of these (a board on which that release does
    not come up healthy), and 0 otherwise.
    """

    device_id: str
    fail_health_on: tuple[str, ...] = ()


@dataclass
class SimulatedDevice:
    """A device's directory and, while it runs, its agent process."""

    spec: DeviceSpec
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def device_id(self) -> str:
        """The device id (as in its certificate)."""
        return self.spec.device_id

    @property
    def config_path(self) -> Path:
        """Its ``agent.toml``."""
        return self.directory / "agent.toml"

    @property
    def log_path(self) -> Path:
        """Where its agent's output goes."""
        return self.directory / "agent.log"

    @property
    def boot_state_path(self) -> Path:
        """The simulated bootloader's state file."""
        return self.directory / "boot.json"

    @property
    def state_dir(self) -> Path:
        """The agent's state directory."""
        return self.directory / "state"

    def slot_path(self, name: str) -> Path:
        """The image file of slot ``name`` (``A`` or ``B``)."""
        return self.directory / "slots" / f"{SLOT_CLASS}-{name.lower()}.img"

    def booted_slot(self) -> str | None:
        """The slot the simulated board booted last (None before its first power-on)."""
        try:
            doc = json.loads(self.boot_state_path.read_bytes())
        except (OSError, ValueError):
            return None
        booted = doc.get("booted") if isinstance(doc, dict) else None
        return booted if isinstance(booted, str) else None

    def slot_sha256(self, name: str) -> str | None:
        """SHA-256 of slot ``name``'s image file; None if it does not exist."""
        digest = hashlib.sha256()
        try:
            with open(self.slot_path(name), "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def running(self) -> bool:
        """Whether its agent process is alive."""
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        """The last ``lines`` lines of its agent's log."""
        return log_tail(self.log_path, lines)


def log_tail(path: Path, lines: int = TAIL_LINES, *, skip: str | None = None) -> str:
    """The last ``lines`` lines of the file at ``path`` (its last 256 KiB read), or a note.

    ``skip``: leave out lines containing this (an access log's routine lines).
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"({path}: {e.strerror or e})"
    tail = [ln for ln in text.splitlines() if not (skip and skip in ln)][-lines:]
    return "\n".join(tail) if tail else f"({path.name} is empty)"


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``Popen``: the child gets SIGTERM when its parent dies (Linux).

    So that a demo or test killed outright leaves no agent or hub behind,
    polling forever. ``prctl`` is looked up here, in the parent: the child
    only calls it. None (nothing to do) elsewhere, or without ``prctl``.
    """
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(1, sigterm)  # PR_SET_PDEATHSIG

    return preexec


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a TOML basic string for these paths


def _health_check(spec: DeviceSpec) -> str:
    bad = " ".join(spec.fail_health_on)
    return f"""#!/bin/sh
# {spec.device_id}'s health check, run by the agent in the trial boot of a new slot.
for bad in {bad}; do
    if [ "$SKYLIFT_VERSION" = "$bad" ]; then
        echo "health check: {spec.device_id} does not come up healthy on $SKYLIFT_VERSION" >&2
        exit 1
    fi
done
echo "health check: $SKYLIFT_VERSION in slot $SKYLIFT_BOOTED_SLOT is healthy"
exit 0
"""


def _agent_toml(
    spec: DeviceSpec,
    *,
    hub_url: str,
    ca_file: Path,
    product: str,
    hardware_id: str,
    slot_size_bytes: int,
    poll_interval_s: float,
    poll_jitter_s: float,
) -> str:
    slots = "".join(
        f"""
[[slot]]
class = "{SLOT_CLASS}"
name = "{name}"
type = "file"
path = "slots/{SLOT_CLASS}-{name.lower()}.img"
size_bytes = {slot_size_bytes}
"""
        for name in SLOT_NAMES
    )
    return f"""# Simulated device {spec.device_id} (skylift.fleet). Paths are relative to this file.
[hub]
url = {_toml_str(hub_url)}
ca_file = {_toml_str(ca_file)}
poll_interval_s = {poll_interval_s:g}
poll_jitter_s = {poll_jitter_s:g}
backoff_initial_s = 1
backoff_max_s = 5
request_timeout_s = 30

[identity]
device_id = {_toml_str(spec.device_id)}
product = {_toml_str(product)}
hardware_id = {_toml_str(hardware_id)}
cert_file = "state/identity/device.pem"
key_file = "state/identity/device.key"
provisioning_key_file = "provisioning.key"
{slots}
[bootloader]
kind = "file"

[bootloader.options]
state_path = "boot.json"
attempts = 3

[hooks]
health_check = "health-check"
timeout_s = 30

[storage]
state_dir = "state"
"""


class Fleet:
    """Simulated devices in one directory, each run by its own ``skylift agent run`` process."""

    def __init__(self, directory: Path, devices: Sequence[SimulatedDevice]) -> None:
        self.directory = directory
        self.devices = list(devices)

    @classmethod
    def layout(
        cls,
        directory: Path,
        specs: Iterable[DeviceSpec],
        *,
        hub_url: str,
        ca_file: Path,
        product: str,
        hardware_id: str,
        provisioning_key: str,
        slot_size_bytes: int,
        poll_interval_s: float = 5,
        poll_jitter_s: float = 1,
    ) -> Fleet:
        """Write each device's directory (factory-fresh: no identity, empty slots).

        Every ``agent.toml`` is read back with the agent's own strict loader,
        so a mistake here is one clear error now rather than a dead agent later.

        Raises:
            FleetError: a device directory exists already.
            UserInputError: a configuration the agent would refuse.
        """
        from skylift.agent.config import load_config

        devices = []
        for spec in specs:
            base = directory / spec.device_id
            if base.exists():
                raise FleetError(
                    f"{base} exists already", hint="lay a fleet out in a new directory"
                )
            (base / "slots").mkdir(parents=True)
            (base / "state").mkdir(mode=0o700)
            key = base / "provisioning.key"
            key.touch(mode=0o600)
            key.write_text(provisioning_key.strip() + "\n")
            hook = base / "health-check"
            hook.write_text(_health_check(spec))
            hook.chmod(0o755)
            config = base / "agent.toml"
            config.write_text(
                _agent_toml(
                    spec,
                    hub_url=hub_url,
                    ca_file=ca_file.resolve(),
                    product=product,
                    hardware_id=hardware_id,
                    slot_size_bytes=slot_size_bytes,
                    poll_interval_s=poll_interval_s,
                    poll_jitter_s=poll_jitter_s,
                )
            )
            load_config(config)
            devices.append(SimulatedDevice(spec, base))
        return cls(directory, devices)

    def __getitem__(self, device_id: str) -> SimulatedDevice:
        for device in self.devices:
            if device.device_id == device_id:
                return device
        raise KeyError(device_id)

    def command(self, device: SimulatedDevice) -> list[str]:
        """The command line that runs ``device``'s agent."""
        return [sys.executable, "-m", "skylift.cli.main", "agent", "run", "--config",
                str(device.config_path)]  # fmt: skip

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start every device's agent (its output appended to ``agent.log``)."""
        base_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        preexec = die_with_parent()
        for device in self.devices:
            if device.running():
                continue
            log = open(device.log_path, "ab")  # noqa: SIM115 - closed in stop()
            try:
                device.process = subprocess.Popen(
                    self.command(device),
                    cwd=device.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=base_env,
                    preexec_fn=preexec,
                )
            except OSError:
                log.close()
                raise
            device._log = log

    def check_running(self) -> None:
        """Raise if an agent that was started has exited.

        Raises:
            FleetError: naming the device, its exit code and the end of its log.
        """
        for device in self.devices:
            if device.process is not None and device.process.poll() is not None:
                raise FleetError(
                    f"the agent of {device.device_id} exited with code "
                    f"{device.process.returncode}; the end of {device.log_path}:\n"
                    f"{device.log_tail()}"
                )

    def stop(self, timeout_s: float = 10.0) -> dict[str, int | None]:
        """SIGTERM every agent, SIGKILL those still running after ``timeout_s``; exit codes."""
        running = [d for d in self.devices if d.process is not None]
        for device in running:
            assert device.process is not None
            if device.process.poll() is None:
                device.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int | None] = {}
        for device in running:
            assert device.process is not None
            try:
                codes[device.device_id] = device.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                device.process.kill()
                codes[device.device_id] = device.process.wait()
            if device._log is not None:
                device._log.close()
                device._log = None
            device.process = None
        return codes

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
