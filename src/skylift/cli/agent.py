"""``skylift agent``: the update daemon on a device, and what a product's scripts ask of it.

- ``run``: the daemon. Enrolls if it must, then polls the hub, installs,
  reboots, checks health, commits or rolls back (:mod:`skylift.agent.updater`).
  ``SIGUSR1`` makes it check now; ``SIGTERM`` stops it between two steps.
- ``status``: the state, the installed version per slot, the last check, the
  reports still queued (``--json`` for scripts).
- ``install PATH.bundle``: install from local media, trusted through the
  product's pinned image root; the reports wait in the queue for the hub.
- ``mark-good`` / ``mark-bad``: a product's own health verdict on the running
  slot; on a trial boot it commits or rolls back.
- ``check``: check now (wakes the daemon if it runs, else one check here).

One process owns the state directory at a time (``agent.lock``): the
commands that change state refuse to run beside the daemon, except
``check``, which signals it. Errors are one line and exit 1, as everywhere
in the CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from skylift.agent.bootloader import Bootloader, BootloaderError, open_bootloader
from skylift.agent.bootloader.simulated import SimulatedBootloader
from skylift.agent.config import AgentConfig, load_config
from skylift.agent.errors import ReportTransportError
from skylift.agent.hooks import HookRunner
from skylift.agent.machine import Action, State
from skylift.agent.plan import ByteRange
from skylift.agent.ports import DeltaOffer, HubPort, HubUnreachableError, Offer, PollAnswer
from skylift.agent.reports import Report
from skylift.agent.updater import (
    AgentBusyError,
    Backoff,
    StepOutcome,
    Updater,
    agent_lock,
    lock_holder,
    read_status,
)
from skylift.cli.common import err, out
from skylift.errors import SkyliftError, UserInputError

app = typer.Typer(no_args_is_help=True, help="The update agent on a device.")

DEFAULT_CONFIG = Path("/etc/skylift/agent.toml")
_CONFIG = Annotated[
    Path, typer.Option("--config", "-c", help="The agent's configuration file (agent.toml).")
]
_JSON = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]
_REBOOT_COMMANDS = (["systemctl", "reboot"], ["/sbin/reboot"])
_log = logging.getLogger("skylift.agent")


class AgentCommandError(SkyliftError):
    """An agent command could not do what was asked."""


# -- wiring ------------------------------------------------------------------------------


def _bootloader(config: AgentConfig) -> Bootloader:
    """The configured backend; relative ``*_path`` options are relative to agent.toml."""
    base = Path(config.source).parent
    options: dict[str, Any] = dict(config.bootloader.options)
    for key, value in options.items():
        if key.endswith("_path") and isinstance(value, str):
            options[key] = base / value
    options.setdefault("slots", config.slot_names)
    board = open_bootloader(config.bootloader.kind, **options)
    if isinstance(board, SimulatedBootloader):
        try:
            board.current()
        except BootloaderError:
            board.boot()  # a simulated board that was never powered on: power it on
    return board


def _reboot_for(board: Bootloader) -> Callable[[], None]:
    """How this device reboots. The simulated board power-cycles and the agent goes on."""
    if isinstance(board, SimulatedBootloader):
        simulated = board

        def power_cycle() -> None:
            simulated.boot()

        return power_cycle

    def reboot() -> None:
        for command in _REBOOT_COMMANDS:
            with contextlib.suppress(OSError):
                if subprocess.run(command, check=False, timeout=60).returncode == 0:
                    # The system is going down; act on nothing until it does.
                    while True:
                        time.sleep(3600)
        raise AgentCommandError(
            "cannot reboot: neither `systemctl reboot` nor `/sbin/reboot` worked",
            hint="reboot the device by hand; the agent resumes where it stopped",
        )

    return reboot


def _hub_client(config: AgentConfig, *, wait: bool) -> HubPort:
    """The hub over mutual TLS, enrolling first if the device has no certificate yet."""
    from skylift.agent.enroll import ensure_identity
    from skylift.agent.hubclient import HubClient

    backoff = Backoff(config.hub.backoff_initial_s, config.hub.backoff_max_s, _rng())
    while True:
        try:
            ensure_identity(config, now=datetime.now(UTC))
            break
        except HubUnreachableError as e:
            if not wait:
                raise
            delay = backoff.next_delay()
            _log.warning("enrollment: %s; again in %.0f s", e.diagnostics(), delay)
            time.sleep(delay)
    return HubClient(config)


def _rng() -> Any:
    import random

    return random.SystemRandom()


def _updater(config: AgentConfig, hub: HubPort, board: Bootloader, **kw: Any) -> Updater:
    hooks = HookRunner(config.hooks)
    hooks.check()  # a configured hook that is missing is refused now, not at the trial boot
    return Updater(config, hub=hub, bootloader=board, reboot=_reboot_for(board), hooks=hooks, **kw)


def _describe(outcome: StepOutcome, updater: Updater) -> str:
    record = updater.record
    if outcome.rebooting:
        return f"rebooting into slot {record.target_slot or '?'}"
    if record.state is State.IDLE:
        last = record.extra.get("last_result")
        return f"idle{f' (last update: {last})' if last else ''}"
    if outcome.delay_s > 0:
        return f"{record.state.value}: {outcome.note or 'waiting'}; try again later"
    return record.state.value


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )


# -- commands ----------------------------------------------------------------------------


@app.command()
def run(
    config_path: _CONFIG = DEFAULT_CONFIG,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    """Run the agent daemon: poll, install, reboot, check health, commit or roll back."""
    _logging(verbose)
    config = load_config(config_path)
    board = _bootloader(config)
    with agent_lock(config.storage.state_dir):
        hub = _hub_client(config, wait=True)
        updater = _updater(config, hub, board)
        stop = threading.Event()
        signal.signal(signal.SIGUSR1, lambda *_: updater.check_now())

        def terminate(*_: object) -> None:
            stop.set()
            updater.check_now()  # wakes the wait so the loop sees stop

        signal.signal(signal.SIGTERM, terminate)
        _log.info("agent started for %s (%s)", config.identity.device_id, config.source)
        updater.run_forever(stop)
        _log.info("agent stopped")


@app.command()
def status(config_path: _CONFIG = DEFAULT_CONFIG, as_json: _JSON = False) -> None:
    """Show the state, the installed version per slot, the last check and queued reports."""
    config = load_config(config_path)
    board = _bootloader(config)
    st = read_status(config, board)
    if as_json:
        typer.echo(json.dumps(st.to_json(), indent=2))
        return
    out.print(f"state: {st.state}" + (f" ({st.progress}%)" if st.progress is not None else ""))
    if st.version:
        out.print(f"update: {st.version} to slot {st.target_slot} (id {st.update_id})")
    if st.reason:
        out.print(f"reason: {st.reason}")
    table = Table("slot", "booted", "next boot", "bootable", "attempts left", "installed")
    for s in st.slots:
        table.add_row(
            s.name,
            "yes" if s.booted else "",
            "yes" if s.primary else "",
            {True: "yes", False: "no", None: "?"}[s.bootable],
            "" if s.attempts_left is None else str(s.attempts_left),
            s.installed_version or "unknown",
        )
    out.print(table)
    out.print(f"last check: {st.last_check_at or 'never'}")
    if st.last_result:
        out.print(f"last update: {st.last_result}")
    out.print(f"reports queued: {st.pending_reports}")
    for problem in st.problems:
        err.print(f"warning: {problem}")


@app.command()
def install(
    bundle: Annotated[Path, typer.Argument(help="The bundle file (local media).", dir_okay=False)],
    config_path: _CONFIG = DEFAULT_CONFIG,
) -> None:
    """Install a bundle from local media into the inactive slot, then reboot into it."""
    from skylift.agent.hubclient import pinned_files
    from skylift.agent.localmedia import LocalBundle

    _logging(False)
    config = load_config(config_path)
    root_path = pinned_files(config).image_root
    try:
        trusted_root = root_path.read_bytes()
    except OSError as e:
        raise UserInputError(
            f"no pinned image root at {root_path}: {e.strerror or e}",
            hint="the device pins it at enrollment (or its image installs it)",
        ) from e
    board = _bootloader(config)
    local = LocalBundle(
        bundle,
        trusted_root=trusted_root,
        hardware_id=config.identity.hardware_id,
        product=config.identity.product,
    )
    with agent_lock(config.storage.state_dir):
        # No hub here: reports wait in the queue until the daemon reaches it.
        updater = _updater(config, local, board, deliver_reports=False)
        outcome = updater.run_once()
    if outcome.action is Action.REPORT:  # refused or failed: reported, nothing tried
        raise AgentCommandError(updater.record.extra.get("last_result", "the install failed"))
    if outcome.action is Action.CHECK and outcome.state is State.IDLE:
        raise AgentCommandError(
            f"{bundle} holds nothing to install (already installed, or not newer)"
        )
    if outcome.delay_s > 0:
        raise AgentCommandError(f"cannot read {bundle}: {outcome.note}")
        out.print(_describe(outcome, updater))


def _mark(config_path: Path, good: bool) -> None:
    config = load_config(config_path)
    board = _bootloader(config)
    with agent_lock(config.storage.state_dir):
        updater = _updater(config, _NoHub(), board, deliver_reports=False)
        state = updater.mark(good=good)
    booted = board.current()
    verdict = "good" if good else "bad"
    out.print(f"slot {booted}: marked {verdict}; agent state {state.value}")


@app.command("mark-good")
def mark_good(config_path: _CONFIG = DEFAULT_CONFIG) -> None:
    """Mark the running slot good; on a trial boot this commits the update."""
    _mark(config_path, True)


@app.command("mark-bad")
def mark_bad(config_path: _CONFIG = DEFAULT_CONFIG) -> None:
    """Mark the running slot bad; on a trial boot this rolls back (and reboots)."""
    _mark(config_path, False)


@app.command()
def check(config_path: _CONFIG = DEFAULT_CONFIG) -> None:
    """Check for an update now: wake the running daemon, or check once here."""
    config = load_config(config_path)
    try:
        with agent_lock(config.storage.state_dir):
            board = _bootloader(config)
            updater = _updater(config, _hub_client(config, wait=False), board)
            outcome = updater.run_once()
            out.print(_describe(outcome, updater))
            return
    except AgentBusyError:
        pid = lock_holder(config.storage.state_dir)
        if pid is None:
            raise
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError as e:
            raise AgentCommandError(f"cannot wake the agent (pid {pid}): {e.strerror}") from e
        out.print(f"asked the running agent (pid {pid}) to check now")


class _NoHub:
    """The hub for commands that must not talk to it: every request is 'unreachable'."""

    def poll(self, *, state: str, progress: int | None) -> PollAnswer:
        raise HubUnreachableError(_NO_HUB)

    def check(self, *, installed_version: str | None, allow_downgrade: bool) -> Offer | None:
        raise HubUnreachableError(_NO_HUB)

    def fetch_head(self, offer: Offer) -> bytes:
        raise HubUnreachableError(_NO_HUB)

    def fetch_index(self, offer: Offer, payload: str) -> bytes:
        raise HubUnreachableError(_NO_HUB)

    def fetch_ranges(
        self, offer: Offer, payload: str, ranges: Sequence[ByteRange]
    ) -> Iterable[tuple[ByteRange, bytes]]:
        raise HubUnreachableError(_NO_HUB)

    def fetch_delta(self, offer: Offer, delta: DeltaOffer, dest: Path) -> int:
        raise HubUnreachableError(_NO_HUB)

    def send(self, reports: Sequence[Report]) -> None:
        raise ReportTransportError(_NO_HUB)


_NO_HUB = "this command does not talk to the hub"
