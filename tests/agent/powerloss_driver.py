"""The agent as its own process, for the power-loss test; it SIGKILLs itself where told.

One *run* is one agent process: it builds the :class:`~skylift.agent.updater.Updater`
from the device directory (agent.toml, the simulated bootloader's file,
file slots, the state dir) and a simulated hub whose state lives in files
(the release in a directory, the reports it received in a JSON-lines file),
then steps until it reboots (exit 100: the parent powers the board on
again) or is done (exit 0: idle, nothing offered, no report left queued).

A kill spec ``(site, n)`` makes the process SIGKILL itself at the n-th
event of a site:

- ``presave`` / ``save``: just before / just after the n-th state save
  (``save`` is every state transition, and progress);
- ``write``: in the n-th slot write, after half of its bytes (a torn write);
- ``fetch``: after the n-th range of the pack arrived;
- ``boot``: just after the n-th bootloader change (try_once, mark_good, mark_bad);
- ``send``: just after the hub stored the n-th batch of reports (before the
  queue recorded it);
- ``hook``: while the n-th hook runs.

Modes: ``run DEVICE_DIR RELEASE_DIR [SITE N]`` does one run in this
interpreter. ``serve`` reads one JSON request per line on stdin
(``{"device", "release", "kill": [site, n] | null, "kill_after_s": s | null}``),
forks a child per run (a fresh process: everything it knows comes from the
disk) and answers ``{"exit": code}`` or ``{"signal": n}``; with
``kill_after_s`` the server SIGKILLs the child after that long. Forking from
an interpreter that has already imported everything keeps a run at tens of
milliseconds, so the test can afford well over a hundred kill points.
Each run writes how many events of each site it saw to ``counts.jsonl``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.simhub import FileSink, SimHub, load_release
from skylift.agent.bootloader import SimulatedBootloader
from skylift.agent.config import AgentConfig, SlotConfig, parse_config
from skylift.agent.hooks import HookResult, HookRunner
from skylift.agent.machine import Action, State
from skylift.agent.plan import ByteRange
from skylift.agent.ports import Offer
from skylift.agent.reports import Report
from skylift.agent.slots import SlotDevice, open_for_install
from skylift.agent.statefile import StateRecord, StateStore
from skylift.agent.updater import Updater

REBOOT_EXIT = 100
DONE_EXIT = 0
STUCK_EXIT = 3
SITES = ("presave", "save", "write", "fetch", "boot", "send", "hook")


class Killer:
    """Counts events per site; SIGKILLs this process at the chosen one."""

    def __init__(self, device: Path, site: str | None, at: int | None) -> None:
        self.device = device
        self.site = site
        self.at = at
        self.counts: Counter[str] = Counter()

    def due(self, site: str) -> bool:
        """Count one event of ``site``; whether this is the one to die at."""
        self.counts[site] += 1
        return site == self.site and self.counts[site] == self.at

    def hit(self, site: str) -> None:
        if self.due(site):
            self.die()

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def record(self, how: str) -> None:
        line = json.dumps({"end": how, "counts": dict(self.counts)}) + "\n"
        with open(self.device / "counts.jsonl", "a") as f:
            f.write(line)


class _Store(StateStore):
    def __init__(self, directory: Path, killer: Killer) -> None:
        super().__init__(directory)
        self.killer = killer

    def save(self, record: StateRecord) -> StateRecord:
        self.killer.hit("presave")
        saved = super().save(record)
        self.killer.hit("save")
        return saved


class _Board(SimulatedBootloader):
    killer: Killer

    def try_once(self, slot: str) -> None:
        super().try_once(slot)
        self.killer.hit("boot")

    def mark_good(self, slot: str) -> None:
        super().mark_good(slot)
        self.killer.hit("boot")

    def mark_bad(self, slot: str) -> None:
        super().mark_bad(slot)
        self.killer.hit("boot")


class _Hub(SimHub):
    killer: Killer

    def fetch_ranges(
        self, offer: Offer, payload: str, ranges: Sequence[ByteRange]
    ) -> Iterator[tuple[ByteRange, bytes]]:
        for item in super().fetch_ranges(offer, payload, ranges):
            self.killer.hit("fetch")
            yield item

    def send(self, reports: Sequence[Report]) -> None:
        super().send(reports)
        self.killer.hit("send")


class _Slot:
    def __init__(self, inner: SlotDevice, killer: Killer) -> None:
        self._inner = inner
        self._killer = killer

    def size(self) -> int:
        return self._inner.size()

    def read_range(self, offset: int, length: int) -> bytes:
        return self._inner.read_range(offset, length)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        if self._killer.due("write"):
            half = len(data) // 2
            self._inner.write_at(offset, memoryview(data)[:half])
            self._killer.die()
        self._inner.write_at(offset, data)

    def zero_range(self, offset: int, length: int) -> None:
        if self._killer.due("write"):
            self._inner.zero_range(offset, length // 2)
            self._killer.die()
        self._inner.zero_range(offset, length)

    def sync(self) -> None:
        self._inner.sync()

    def close(self) -> None:
        self._inner.close()


class _Hooks(HookRunner):
    killer: Killer

    def run(self, phase: str, env: dict[str, str]) -> HookResult:  # type: ignore[override]
        if self.killer.due("hook"):
            # Die while the hook runs: start it, then go.
            import subprocess

            path = self.configured(phase)
            if path is not None:
                subprocess.Popen([str(path)], start_new_session=True, stdout=subprocess.DEVNULL)
            self.killer.die()
        return super().run(phase, env)


def agent_run(device: Path, release: Path, site: str | None, at: int | None) -> int:
    """One agent process's life; returns its exit code (or never returns: killed)."""
    killer = Killer(device, site, at)
    config: AgentConfig = parse_config((device / "agent.toml").read_text(), base_dir=device)
    board = _Board(state_path=device / "boot.json")
    board.killer = killer
    hub = _Hub(load_release(release), sink=FileSink(device / "hub-reports.jsonl"))
    hub.killer = killer
    hooks = _Hooks(config.hooks)
    hooks.killer = killer

    def open_slot(slot: SlotConfig, size: int) -> SlotDevice:
        return _Slot(open_for_install(slot, size), killer)

    def reboot() -> None:
        killer.record("reboot")
        os._exit(REBOOT_EXIT)  # a reboot never returns

    updater = Updater(
        config,
        hub=hub,
        bootloader=board,
        reboot=reboot,
        sleep=lambda s: None,
        hooks=hooks,
        open_slot=open_slot,
        store=_Store(config.storage.state_dir, killer),
        rng=random.Random(0),
    )
    for _ in range(20):
        out = updater.run_once()
        if out.state is State.IDLE and out.action is Action.CHECK and len(updater.queue) == 0:
            killer.record("done")
            return DONE_EXIT
    killer.record("stuck")
    return STUCK_EXIT


def serve() -> None:
    """Answer run requests from stdin, one forked child per run."""
    # Answers go to the original stdout; anything a child or a hook prints goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        req = json.loads(line)
        kill = req.get("kill") or (None, None)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = agent_run(Path(req["device"]), Path(req["release"]), kill[0], kill[1])
            finally:
                os._exit(code)
        deadline = req.get("kill_after_s")
        status: int | None = None
        if deadline is not None:
            end = time.monotonic() + deadline
            while time.monotonic() < end:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = st
                    break
                time.sleep(0.002)
            else:
                os.kill(pid, signal.SIGKILL)
        if status is None:
            _, status = os.waitpid(pid, 0)
        answer = (
            {"signal": os.WTERMSIG(status)}
            if os.WIFSIGNALED(status)
            else {"exit": os.WEXITSTATUS(status)}
        )
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve()
        return 0
    if argv[:1] == ["run"] and len(argv) in (3, 5):
        site, at = (argv[3], int(argv[4])) if len(argv) == 5 else (None, None)
        return agent_run(Path(argv[1]), Path(argv[2]), site, at)
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
