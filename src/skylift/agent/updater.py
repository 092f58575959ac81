"""The updater: the agent's orchestrator. It decides what to do; ports do the I/O.

One :meth:`Updater.step` does exactly one state's action. The first step of
a process (and the first after a reboot) *resumes*: it loads the persisted
record (:func:`~skylift.agent.statefile.open_state`), asks the resume map
(:func:`~skylift.agent.machine.resume`) where to go from the state, the slot
that booted and whether the device rebooted, and saves the answer. Every
later step looks the action up in :data:`~skylift.agent.machine.ACTIONS`,
acts, and saves the record the action's event leads to
(:data:`~skylift.agent.machine.TRANSITIONS`). A state is therefore always on
disk before its action runs, and every action may be done again after a
power cut: that is what makes a kill at any instant safe.

================ ============================================================
action           what the updater does
================ ============================================================
wait (idle)      deliver queued reports, poll; post CHECK when something changed
check            ask the hub for an offer; UPDATE_FOUND, NO_UPDATE, or ERROR (refused)
download         fetch and verify the bundle head, every payload's index pages
                 (page chain from the manifest); keep them in
                 ``<state_dir>/update``; post DOWNLOADED
install          pre-install hook; mark the inactive slot bad; per payload: seed
                 from the active slot, plan, :func:`~skylift.agent.install.apply_plan`
                 copying from the chunk cache and fetching missing chunks from the
                 hub (kept in the cache), journal in the state dir; post WRITTEN
schedule_reboot  post-install hook; report installed; post REBOOT
reboot           ``try_once`` the new slot; reboot
health_check     (new slot) the health-check hook; HEALTH_OK or HEALTH_FAILED
commit           (new slot) ``mark_good``; report committed; empty the chunk
                 cache; back to idle
roll_back        (new slot) ``mark_bad`` it; reboot into the old slot
report           (old slot) on-rollback hook after a rollback; report
                 rolled_back or failed with the reason; back to idle
================ ============================================================

Failures, by family: :class:`~skylift.agent.ports.HubUnreachableError`
keeps the state and waits with exponential back-off and jitter (downloads
resume from the install journal); :class:`~skylift.agent.ports.UpdateRefusedError`
and every other refusal (a head or index that does not verify,
a bundle for other hardware, a slot too small, disk full, a chunk that
arrives corrupt twice) end in ``failed`` with the reason, before the
inactive slot is ever tried: the running system is untouched. Every slot
the agent runs on without an update on trial is marked good at start, as
the bootloaders need (docs/bootloaders.md).

Installed versions per slot (``installed.<bootname>`` in the record's
``extra``), the last check and the last result outlive the update; the rest
of ``extra`` (hook output kept for the final report) is the update's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skylift.agent.bootloader import Bootloader, BootloaderError, SimulatedBootloader
from skylift.agent.chunkcache import CACHE_DIR, ChunkCache, clear_cache
from skylift.agent.config import AgentConfig, SlotConfig
from skylift.agent.dirslot import install_directory
from skylift.agent.errors import (
    AgentStateError,
    ReportQueueError,
    ReportTransportError,
    StateFileError,
)
from skylift.agent.hooks import HookResult, HookRunner
from skylift.agent.install import (
    ChunkRejectedError,
    FetchRanges,
    InstallError,
    Progress,
    apply_plan,
)
from skylift.agent.journal import InstallJournal, JournalError, OrdinalRanges, install_id
from skylift.agent.machine import (
    DEFAULT_MAX_RESUMES,
    Action,
    Event,
    Side,
    State,
    action_for,
    resume,
    side_of,
    was_rebooted,
)
from skylift.agent.pairdelta import apply_delta, parse_deltas, slot_holds
from skylift.agent.plan import (
    ByteRange,
    PlanError,
    PlanTotals,
    SeedIndex,
    held_in_place,
    make_plan,
    seed_index,
)
from skylift.agent.ports import (
    DeltaOffer,
    HubPort,
    HubUnreachableError,
    Offer,
    PayloadOffer,
    UpdateRefusedError,
)
from skylift.agent.reports import (
    KIND_PROGRESS,
    KIND_UPDATE,
    ReportQueue,
    format_time,
    step_report_id,
)
from skylift.agent.slots import (
    SlotDevice,
    SlotError,
    SlotPair,
    SlotReader,
    open_for_install,
    open_for_reading,
    slot_pair,
)
from skylift.agent.statefile import (
    Release,
    StateRecord,
    StateStore,
    decode_state,
    encode_state,
    open_state,
)
from skylift.bundle import BundleError, Manifest, PayloadEntry, read_head
from skylift.bundle.format import PREAMBLE_SIZE
from skylift.chunks import ChunkError, PackedEntries, PageChainVerifier
from skylift.chunks.delta import DeltaError
from skylift.chunks.index import ENTRY_SIZE, PAGE_HEADER_SIZE, parse_page_header
from skylift.errors import SkyliftError
from skylift.fsutil import atomic_write

__all__ = [
    "AgentBusyError",
    "AgentStatus",
    "Backoff",
    "SlotStatus",
    "StepOutcome",
    "Updater",
    "agent_lock",
    "boot_id_reader",
    "read_status",
    "verify_head",
    "verify_index",
]

_log = logging.getLogger("skylift.agent")

UPDATE_DIR = "update"
REPORTS_DIR = "reports"
LOCK_FILE = "agent.lock"
#: Progress is saved and reported at most every this many percent.
PROGRESS_STEP = 10
_INSTALLED = "installed."
_LAST_CHECK = "last_check_at"
_LAST_RESULT = "last_result"
_HOOK_OUTPUT = "hook_output"
#: The head SHA-256 of a release that failed or rolled back here. The hub keeps
#: offering it (the director still names it), and installing it again after
#: every restart would loop: install, reboot, roll back. The agent skips that
#: exact offer for as long as the hub keeps making it; any other answer (no
#: update, another release) forgets it, so a new deployment can try again.
_FAILED_TARGET = "failed_target"
#: Bytes fetched from the hub by the run that completed the install, and the
#: payloads' size: the installed and committed reports carry both, so an
#: operator sees what delta delivery saved.
_DOWNLOADED = "downloaded_bytes"
_IMAGE_BYTES = "image_bytes"
_KEPT_ACROSS_UPDATES = (_INSTALLED, _LAST_CHECK, _LAST_RESULT, _FAILED_TARGET)
_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
_BOOT_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


class AgentBusyError(SkyliftError):
    """Another agent process holds the state directory."""

    hint = "the daemon is running: use `skylift agent check` to wake it, or stop it first"


def _now() -> datetime:
    return datetime.now(UTC)


def _new_update_id() -> str:
    return f"u{secrets.token_hex(8)}"


# -- boot ids and the agent lock ------------------------------------------------


def boot_id_reader(bootloader: Bootloader) -> Callable[[], str | None]:
    """How to tell this boot from the previous one: the kernel's boot id.

    The simulated bootloader counts its power-ons instead, so a simulated
    reboot is a reboot for the resume map too.
    """
    if isinstance(bootloader, SimulatedBootloader):
        board = bootloader

        def simulated() -> str | None:
            try:
                doc = json.loads(board.state_path.read_bytes())
            except (OSError, ValueError):
                return None
            boots = doc.get("boots") if isinstance(doc, dict) else None
            return f"sim-{boots}" if isinstance(boots, int) else None

        return simulated

    def kernel() -> str | None:
        try:
            value = _BOOT_ID_FILE.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return value if _BOOT_ID.fullmatch(value) else None

    return kernel


@contextlib.contextmanager
def agent_lock(state_dir: Path) -> Iterator[Path]:
    """Hold ``<state_dir>/agent.lock`` (with this process id in it) while the body runs.

    Raises:
        AgentBusyError: another process holds it; its pid is in the message.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(state_dir)
            raise AgentBusyError(
                f"another agent process{f' (pid {holder})' if holder else ''} uses {state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing drops the lock


def lock_holder(state_dir: Path) -> int | None:
    """The pid written in the agent lock file, if any (it may be stale)."""
    try:
        text = (state_dir / LOCK_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


# -- back-off ---------------------------------------------------------------------


class Backoff:
    """Exponential back-off with jitter: ``initial_s``, doubled per failure, at most ``max_s``.

    Each wait is drawn from the upper half of the current step ("equal
    jitter"), so a fleet cut off at once does not come back in step.
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0
        self._rng = rng

    def next_delay(self) -> float:
        """Count one more failure; the seconds to wait before trying again."""
        self.failures += 1
        step = min(self.max_s, self.initial_s * 2.0 ** min(self.failures - 1, 60))
        return step / 2 + self._rng.uniform(0, step / 2)

    def reset(self) -> None:
        """The last attempt worked: start again from ``initial_s``."""
        self.failures = 0


# -- verifying what the hub sends ---------------------------------------------------


def verify_head(head: bytes, release: Release, config: AgentConfig) -> Manifest:
    """The manifest of a bundle head the hub delivered, checked for this device.

    The head's length and SHA-256 are what both TUF repositories signed
    (ADR 0004), so they vouch for the manifest's signatures; here the head is
    parsed strictly and the manifest checked against the release, the
    device's product and hardware id, and the configured slot classes.

    Raises:
        UpdateRefusedError: anything does not match.
    """
    if len(head) != release.length or hashlib.sha256(head).hexdigest() != release.sha256:
        raise UpdateRefusedError("the bundle head does not match its length and SHA-256")
    try:
        parsed = read_head(io.BytesIO(head))
        manifest = Manifest.from_bytes(parsed.manifest_bytes)
        size = (
            PREAMBLE_SIZE
            + len(parsed.manifest_bytes)
            + len(parsed.signature_bytes)
            + sum(h.size for h in manifest.hooks)
        )
        if size != len(head):
            raise UpdateRefusedError("the bundle head is not exactly a head (ADR 0004)")
        manifest.require_hardware(config.identity.hardware_id)
    except BundleError as e:
        raise UpdateRefusedError(f"the bundle head is refused: {e.message}") from e
    if manifest.product != config.identity.product or manifest.product != release.product:
        raise UpdateRefusedError(
            f"the bundle is for product {manifest.product}, not {config.identity.product}"
        )
    if manifest.version != release.version:
        raise UpdateRefusedError(
            f"the bundle is version {manifest.version}, the offer said {release.version}"
        )
    classes = [p.slot_class for p in manifest.payloads]
    if len(set(classes)) != len(classes):
        raise UpdateRefusedError("the bundle has two payloads for one slot class")
    unknown = sorted(set(classes) - set(config.slot_classes))
    if unknown:
        raise UpdateRefusedError(f"the bundle writes slot class {unknown[0]!r}, not configured")
    # Booting the other slot name switches every class at once: each needs its image.
    left_out = [c for c in config.slot_classes if c not in classes]
    if left_out:
        raise UpdateRefusedError(
            f"the bundle has no payload for slot class {left_out[0]!r}; booting the other "
            "slot would run a stale image there"
        )
    directories = {s.slot_class for s in config.slots if s.type == "directory"}
    for p in manifest.payloads:
        if p.slot_class in directories and p.type != "tar":
            raise UpdateRefusedError(
                f"payload {p.name} is a {p.type} image, but slot class {p.slot_class!r} is "
                "a directory slot and takes tar payloads"
            )
    return manifest


def verify_index(payload: PayloadEntry, data: bytes) -> PackedEntries:
    """The chunk entries of ``payload``'s index pages, verified page by page.

    The first page's digest comes from the signed manifest; each page names
    the next one's digest (docs/bundle-format.md). The entries are kept
    packed (49 bytes a chunk rather than about 270 as objects: ADR 0005).

    Raises:
        UpdateRefusedError: a page does not verify, the totals differ, or bytes trail.
    """
    per_page = PAGE_HEADER_SIZE + payload.index.entries_per_page * ENTRY_SIZE
    if len(data) > payload.index.pages * per_page:
        raise UpdateRefusedError(f"the index of payload {payload.name} is larger than declared")
    chain = PageChainVerifier(
        bytes.fromhex(payload.index.first_page_sha256),
        chunks=payload.chunks,
        payload_length=payload.size,
        max_chunk_bytes=payload.chunking.max_size,
    )
    entries = PackedEntries()
    pos = 0
    try:
        while not chain.done:
            body = parse_page_header(
                data[pos : pos + PAGE_HEADER_SIZE], max_entries=payload.index.entries_per_page
            )
            page = data[pos : pos + PAGE_HEADER_SIZE + body]
            pos += len(page)
            entries.extend(chain.accept(page).entries)
    except ChunkError as e:
        raise UpdateRefusedError(
            f"the index of payload {payload.name} does not verify: {e.message}"
        ) from e
    if pos != len(data):
        raise UpdateRefusedError(f"the index of payload {payload.name} has trailing bytes")
    return entries


# -- status -------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotStatus:
    """One boot name as ``skylift agent status`` shows it."""

    name: str
    booted: bool
    primary: bool
    bootable: bool | None
    attempts_left: int | None
    installed_version: str | None


@dataclass(frozen=True)
class AgentStatus:
    """What ``skylift agent status`` prints."""

    state: str
    update_id: str | None
    version: str | None
    target_slot: str | None
    progress: int | None
    reason: str | None
    last_check_at: str | None
    last_result: str | None
    pending_reports: int
    slots: tuple[SlotStatus, ...]
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """As ``status --json`` prints it."""
        doc = {k: v for k, v in self.__dict__.items() if k not in ("slots", "problems")}
        doc["slots"] = [s.__dict__ for s in self.slots]
        doc["problems"] = list(self.problems)
        return doc


def read_status(config: AgentConfig, bootloader: Bootloader) -> AgentStatus:
    """The agent's state, installed versions and bootloader view, read without changing anything.

    A problem reading one source (an unreadable state file, a bootloader
    error) is listed in ``problems`` rather than raised.
    """
    problems: list[str] = []
    state_dir = config.storage.state_dir
    record: StateRecord | None = None
    try:
        record = StateStore(state_dir).load()
    except StateFileError as e:
        problems.append(e.diagnostics())
    record = record or StateRecord()
    pending = 0
    spool = state_dir / REPORTS_DIR
    if spool.is_dir():
        pending = sum(1 for p in spool.iterdir() if re.fullmatch(r"[0-9]{16}\.json", p.name))
        watermark = spool / "delivered-seq"
        with contextlib.suppress(OSError, ValueError):
            done = int(watermark.read_text())
            pending = sum(
                1
                for p in spool.iterdir()
                if re.fullmatch(r"[0-9]{16}\.json", p.name) and int(p.name[:16]) > done
            )
    booted = primary = None
    try:
        booted = bootloader.current()
    except BootloaderError as e:
        problems.append(e.diagnostics())
    try:
        primary = bootloader.primary()
    except BootloaderError as e:
        problems.append(e.diagnostics())
    slots = []
    for name in config.slot_names:
        bootable: bool | None = None
        left: int | None = None
        try:
            st = bootloader.state(name)
            bootable, left = st.bootable, st.attempts_left
        except BootloaderError as e:
            problems.append(e.diagnostics())
        slots.append(
            SlotStatus(
                name=name,
                booted=name == booted,
                primary=name == primary,
                bootable=bootable,
                attempts_left=left,
                installed_version=record.extra.get(_INSTALLED + name),
            )
        )
    return AgentStatus(
        state=record.state.value,
        update_id=record.update_id,
        version=record.release.version if record.release else None,
        target_slot=record.target_slot,
        progress=record.progress,
        reason=record.reason,
        last_check_at=record.extra.get(_LAST_CHECK),
        last_result=record.extra.get(_LAST_RESULT),
        pending_reports=pending,
        slots=tuple(slots),
        problems=tuple(problems),
    )


# -- the updater --------------------------------------------------------------------


@dataclass(frozen=True)
class StepOutcome:
    """What one step did: the action, the state it left, and how long to wait now.

    ``rebooting``: the step asked the device to reboot (a real reboot never
    returns; a simulated one did, and the next step resumes in the new boot).
    """

    action: Action
    state: State
    delay_s: float = 0.0
    rebooting: bool = False
    note: str | None = None


@dataclass
class _Update:
    """What the cached update files say: the verified manifest and its offer."""

    manifest: Manifest
    offer: Offer
    entries: dict[str, PackedEntries] = field(default_factory=dict)


def _slot_env_name(slot_class: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", slot_class.upper())


class Updater:
    """The agent's orchestrator over a hub, a bootloader and the configured slots.

    Dependencies are keyword-only ports: ``hub`` (offers, content, reports),
    ``bootloader``, ``reboot`` (never returns on a device; the simulated
    bootloader's ``boot`` in tests and the demo), ``clock``, ``sleep``,
    ``boot_id``; ``open_slot`` opens the inactive slot for writing (a fault
    injector in tests). ``deliver_reports=False`` leaves reports queued for
    the daemon (local-media installs).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        hub: HubPort,
        bootloader: Bootloader,
        reboot: Callable[[], None],
        clock: Callable[[], datetime] = _now,
        sleep: Callable[[float], None] | None = None,
        boot_id: Callable[[], str | None] | None = None,
        hooks: HookRunner | None = None,
        open_slot: Callable[[SlotConfig, int], SlotDevice] = open_for_install,
        store: StateStore | None = None,
        queue: ReportQueue | None = None,
        rng: random.Random | None = None,
        new_update_id: Callable[[], str] = _new_update_id,
        deliver_reports: bool = True,
        max_resumes: int = DEFAULT_MAX_RESUMES,
    ) -> None:
        self.config = config
        self._hub = hub
        self._bootloader = bootloader
        self._reboot = reboot
        self._clock = clock
        self._wake = threading.Event()
        self._sleep = sleep
        self._boot_id = boot_id or boot_id_reader(bootloader)
        self._hooks = hooks or HookRunner(config.hooks)
        self._open_slot = open_slot
        self._state_dir = config.storage.state_dir
        self._store = store or StateStore(self._state_dir)
        self._queue = queue or ReportQueue(
            self._state_dir / REPORTS_DIR,
            max_reports=config.storage.max_queued_reports,
            clock=clock,
        )
        self._rng = rng or random.SystemRandom()
        self._new_update_id = new_update_id
        self._deliver_reports = deliver_reports
        self._max_resumes = max_resumes
        self._backoff = Backoff(config.hub.backoff_initial_s, config.hub.backoff_max_s, self._rng)
        self._poll_interval_s = config.hub.poll_interval_s
        self._force_check = True  # the first poll after start always asks
        self._record = StateRecord()
        self._booted: str | None = None  # None: the next step resumes
        self._update: _Update | None = None
        self._offer: Offer | None = None
        self._handlers: dict[Action, Callable[[StateRecord], StepOutcome]] = {
            Action.WAIT: self._wait,
            Action.CHECK: self._check,
            Action.DOWNLOAD: self._download,
            Action.INSTALL: self._install,
            Action.SCHEDULE_REBOOT: self._schedule_reboot,
            Action.REBOOT: self._do_reboot,
            Action.HEALTH_CHECK: self._health_check,
            Action.COMMIT: self._commit,
            Action.ROLL_BACK: self._roll_back,
            Action.REPORT: self._report_final,
        }

    # -- public surface ------------------------------------------------------------

    @property
    def record(self) -> StateRecord:
        """The record last saved (or loaded)."""
        return self._record

    @property
    def queue(self) -> ReportQueue:
        """The on-disk report queue."""
        return self._queue

    def installed_versions(self) -> dict[str, str]:
        """``{bootname: version}`` of the slots this agent installed and committed."""
        return _installed(self._record.extra)

    def step(self) -> StepOutcome:
        """Do exactly one state's action: resume if this is a new process or boot, act, save.

        Raises:
            StateFileError, ReportQueueError: the state directory cannot be written.
            BootloaderError: the booted slot cannot be read at start.
        """
        if self._booted is None:
            action = self._resume()
        else:
            action = action_for(self._record.state, self._side(self._record))
        return self._handlers[action](self._record)

    def check_now(self) -> None:
        """Ask the hub at the next step, without waiting for the poll to say something changed."""
        self._force_check = True
        self._wake.set()

    def run_once(self, *, max_steps: int = 1000) -> StepOutcome:
        """Check now and step until idle again, a reboot is asked for, or the hub is out of reach.

        From idle that is one check (and the whole update up to its reboot if
        one is offered); on the new slot, the trial up to commit or rollback.
        """
        self._force_check = True
        outcome = None
        for _ in range(max_steps):
            outcome = self.step()
            if outcome.rebooting or outcome.delay_s > 0:
                return outcome
            if outcome.state is State.IDLE and outcome.action is not Action.WAIT:
                return outcome
        assert outcome is not None
        return outcome

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """The daemon: step, wait what the step says (poll interval, back-off), again.

        A failure of the state directory or the bootloader is logged and
        retried with back-off: the state on disk is unchanged by it.
        """
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                outcome = self.step()
                delay = outcome.delay_s
                if outcome.note:
                    _log.info("%s: %s", outcome.state.value, outcome.note)
            except (AgentStateError, ReportQueueError, BootloaderError, SlotError) as e:
                _log.error("%s", e.diagnostics())
                self._booted = None  # resume from the disk again
                delay = self._backoff.next_delay()
            if delay > 0:
                self._wait_for(delay, stop)

    def mark(self, *, good: bool) -> State:
        """The product's own health verdict on the running slot (``mark-good``/``mark-bad``).

        On trial in the new slot it decides the trial: good commits, bad rolls
        back (which reboots). Otherwise it marks the running slot good or bad
        in the bootloader. Returns the state afterwards.
        """
        if self._booted is None:
            action = self._resume()
        else:
            action = action_for(self._record.state, self._side(self._record))
        record = self._record
        if action is Action.HEALTH_CHECK:
            if good:
                self._advance(record, Event.HEALTH_OK)
            else:
                self._advance(
                    record,
                    Event.HEALTH_FAILED,
                    reason="the device's own health check marked the new slot bad",
                )
            self.step()  # commit, or roll back (reboots)
            return self._record.state
        assert self._booted is not None
        if good:
            self._bootloader.mark_good(self._booted)
        else:
            self._bootloader.mark_bad(self._booted)
        return self._record.state

    # -- bookkeeping ---------------------------------------------------------------

    def _wait_for(self, delay: float, stop: threading.Event) -> None:
        if self._sleep is not None:
            self._sleep(delay)
            return
        deadline = time.monotonic() + delay
        while not stop.is_set() and time.monotonic() < deadline:
            if self._wake.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                self._wake.clear()
                return

    def _resume(self) -> Action:
        opened = open_state(self._store, self._queue, clock=self._clock)
        if opened.recovered:
            _log.warning("%s", opened.problem.diagnostics() if opened.problem else "")
        found = opened.record
        booted = self._bootloader.current()
        side = side_of(booted, found.target_slot)
        boot_id = self._boot_id()
        decision = resume(
            found.state,
            side,
            rebooted=was_rebooted(boot_id, found.boot_id),
            resumes=found.resumes,
            max_resumes=self._max_resumes,
        )
        self._save(found.resumed(decision, now=self._clock(), boot_id=boot_id))
        if side is Side.OLD:
            # Nothing on trial here: this boot is healthy (the agent runs), refill its count.
            self._bootloader.mark_good(booted)
        self._booted = booted
        self._update = None
        return decision.action

    def _side(self, record: StateRecord) -> Side:
        assert self._booted is not None
        return side_of(self._booted, record.target_slot)

    def _save(self, record: StateRecord) -> StateRecord:
        self._record = self._store.save(record)
        return self._record

    def _advance(
        self, record: StateRecord, event: Event, *, reason: str | None = None, **changes: Any
    ) -> StateRecord:
        nxt = record.advanced(event, now=self._clock(), reason=reason, **changes)
        if nxt.state is State.IDLE:
            kept = {
                k: v
                for k, v in changes.get("extra", record.extra).items()
                if k.startswith(_KEPT_ACROSS_UPDATES)
            }
            nxt = replace(nxt, extra=kept)
        return self._save(nxt)

    def _with_extra(self, record: StateRecord, **values: str | None) -> dict[str, str]:
        extra = dict(record.extra)
        for key, value in values.items():
            if value is None:
                extra.pop(key, None)
            else:
                extra[key] = value
        return extra

    def _deliver(self) -> None:
        if not self._deliver_reports:
            return
        try:
            self._queue.deliver(self._hub)
        except (ReportTransportError, HubUnreachableError) as e:
            _log.info("reports stay queued: %s", e.diagnostics())

    def _report(
        self,
        record: StateRecord,
        state: State,
        *,
        result: str,
        reason: str | None = None,
        hook_output: str | None = None,
    ) -> None:
        assert record.update_id is not None
        details: dict[str, Any] = {"update_id": record.update_id}
        if record.release is not None:
            details["version"] = record.release.version
            details["target"] = record.release.target
        if record.previous_version is not None:
            details["previous_version"] = record.previous_version
        if record.target_slot is not None:
            details["target_slot"] = record.target_slot
        if record.deployment_id is not None:
            details["deployment_id"] = record.deployment_id
        if state in (State.INSTALLED, State.COMMITTED):
            for key in (_DOWNLOADED, _IMAGE_BYTES):
                value = record.extra.get(key, "")
                if value.isdigit():
                    details[key] = int(value)
        if state is State.COMMITTED and self.config.slot_classes:
            # The hub records the installed version of the slot class a committed report names.
            details["slot_class"] = self.config.slot_classes[0]
            details["slot_classes"] = list(self.config.slot_classes)
        self._queue.enqueue(
            KIND_UPDATE,
            state=state,
            result=result,
            reason=reason,
            details=details,
            hook_output=hook_output or None,
            report_id=step_report_id(record.update_id, state),
        )

    def _fail(
        self, record: StateRecord, action: Action, reason: str, *, hook_output: str | None = None
    ) -> StepOutcome:
        _log.warning("update failed: %s", reason)
        extra = self._with_extra(record, **{_HOOK_OUTPUT: hook_output})
        record = self._advance(record, Event.ERROR, reason=reason, extra=extra)
        return StepOutcome(action, record.state, note=reason)

    def _hook_env(self, record: StateRecord, **more: str | None) -> dict[str, str]:
        env = {
            "SKYLIFT_UPDATE_ID": record.update_id,
            "SKYLIFT_PRODUCT": self.config.identity.product,
            "SKYLIFT_VERSION": record.release.version if record.release else None,
            "SKYLIFT_PREVIOUS_VERSION": record.previous_version,
            "SKYLIFT_SLOT": record.target_slot,
            "SKYLIFT_PREVIOUS_SLOT": record.previous_slot,
            "SKYLIFT_BOOTED_SLOT": self._booted,
            "SKYLIFT_STATE": record.state.value,
            "SKYLIFT_STATE_DIR": str(self._state_dir),
            "SKYLIFT_REASON": record.reason,
            **more,
        }
        if record.target_slot is not None:
            for slot in self.config.slots:
                if slot.name == record.target_slot:
                    env[f"SKYLIFT_SLOT_PATH_{_slot_env_name(slot.slot_class)}"] = str(slot.path)
        return {k: v for k, v in env.items() if v is not None}

    def _run_hook(self, record: StateRecord, phase: str, **more: str | None) -> HookResult:
        result = self._hooks.run(phase, self._hook_env(record, **more))
        if result.ran:
            _log.info("%s hook: %s", phase, "ok" if result.ok else result.reason)
        return result

    def _other_slot(self, booted: str) -> str:
        others = [n for n in self.config.slot_names if n != booted]
        if booted not in self.config.slot_names or len(others) != 1:
            raise SlotError(
                f"the bootloader booted slot {booted!r}; the slots are "
                f"{', '.join(self.config.slot_names)}"
            )
        return others[0]

    def _poll_delay(self) -> float:
        return self._poll_interval_s + self._rng.uniform(0, self.config.hub.poll_jitter_s)

    def _update_dir(self) -> Path:
        return self._state_dir / UPDATE_DIR

    def _forget_update(self) -> None:
        self._update = None
        shutil.rmtree(self._update_dir(), ignore_errors=True)

    # -- idle and checking ---------------------------------------------------------

    def _wait(self, record: StateRecord) -> StepOutcome:
        self._deliver()
        if not self._force_check:
            try:
                answer = self._hub.poll(state=record.state.value, progress=None)
            except HubUnreachableError as e:
                return StepOutcome(
                    Action.WAIT, record.state, self._backoff.next_delay(), note=e.diagnostics()
                )
            self._backoff.reset()
            if answer.poll_interval_s:
                self._poll_interval_s = answer.poll_interval_s
            if not answer.changed:
                return StepOutcome(Action.WAIT, record.state, self._poll_delay())
        self._force_check = False
        record = self._advance(record, Event.CHECK)
        return StepOutcome(Action.WAIT, record.state)

    def _check(self, record: StateRecord) -> StepOutcome:
        assert self._booted is not None
        installed = _installed(record.extra).get(self._booted)
        now = self._clock()
        extra = self._with_extra(record, **{_LAST_CHECK: format_time(now)})
        try:
            offer = self._hub.check(installed_version=installed, allow_downgrade=False)
        except HubUnreachableError as e:
            record = self._advance(record, Event.NO_UPDATE, extra=extra)
            return StepOutcome(
                Action.CHECK, record.state, self._backoff.next_delay(), note=e.diagnostics()
            )
        except UpdateRefusedError as e:
            # One report per distinct refusal: the same refusal at every poll is one incident.
            ident = "r" + hashlib.sha256(e.message.encode()).hexdigest()[:16]
            record = self._advance(
                record,
                Event.ERROR,
                reason=f"update refused: {e.message}",
                update_id=ident,
                extra=self._with_extra(record, **{_LAST_CHECK: format_time(now)}),
            )
            return StepOutcome(Action.CHECK, record.state, note=record.reason)
        self._backoff.reset()
        if offer is not None and offer.sha256 == record.extra.get(_FAILED_TARGET):
            record = self._advance(record, Event.NO_UPDATE, extra=extra)
            return StepOutcome(
                Action.CHECK,
                record.state,
                self._poll_delay(),
                note=f"not trying {offer.version} again: it failed on this device",
            )
        extra.pop(_FAILED_TARGET, None)
        if offer is None:
            record = self._advance(record, Event.NO_UPDATE, extra=extra)
            return StepOutcome(Action.CHECK, record.state, self._poll_delay())
        release = Release(
            product=offer.product,
            version=offer.version,
            target=offer.target_name,
            sha256=offer.sha256,
            length=offer.length,
        )
        candidate = record.advanced(
            Event.UPDATE_FOUND,
            now=now,
            update_id=self._new_update_id(),
            deployment_id=None if offer.deployment_id is None else str(offer.deployment_id),
            release=release,
            target_slot=self._other_slot(self._booted),
            previous_slot=self._booted,
            previous_version=installed,
            started_at=now,
            extra=extra,
        )
        try:
            decode_state(encode_state(candidate))  # the offer's fields must survive a reload
        except (StateFileError, AgentStateError) as e:
            ident = "r" + hashlib.sha256(e.message.encode()).hexdigest()[:16]
            record = self._advance(
                record,
                Event.ERROR,
                reason=f"update refused: the offer cannot be stored: {e.message}",
                update_id=ident,
                extra=extra,
            )
            return StepOutcome(Action.CHECK, record.state, note=record.reason)
        self._forget_update()  # files of an older update, if any
        record = self._save(candidate)
        self._offer = offer
        self._report(record, State.DOWNLOADING, result="started")
        self._deliver()
        return StepOutcome(Action.CHECK, record.state, note=f"update to {offer.version} found")

    # -- downloading -------------------------------------------------------------------

    def _offer_from(self, record: StateRecord, manifest: Manifest | None) -> Offer:
        assert record.release is not None
        offered = self._offer
        if offered is not None and offered.sha256 == record.release.sha256:
            return offered
        deployment = record.deployment_id
        return Offer(
            product=record.release.product,
            version=record.release.version,
            target_name=record.release.target,
            length=record.release.length,
            sha256=record.release.sha256,
            hardware_ids=tuple(manifest.compatible) if manifest else (),
            payloads=tuple(
                PayloadOffer(p.name, p.slot_class, p.size, p.sha256) for p in manifest.payloads
            )
            if manifest
            else (),
            deployment_id=int(deployment) if deployment and deployment.isdigit() else None,
        )

    def _load_update(self, record: StateRecord, *, fetch: bool) -> _Update:
        """The verified update files, from the cache or (``fetch``) from the hub."""
        assert record.release is not None
        if self._update is not None and self._update.offer.sha256 == record.release.sha256:
            return self._update
        cache = self._update_dir()
        head_path = cache / "head"
        try:
            head = head_path.read_bytes()
        except FileNotFoundError:
            head = None
        manifest: Manifest | None = None
        if head is not None:
            try:
                manifest = verify_head(head, record.release, self.config)
            except UpdateRefusedError:
                manifest = None  # a cache from another update, or damaged: fetch again
        if manifest is None:
            if not fetch:
                raise UpdateRefusedError("the update's verified files are gone from the state dir")
            offer = self._offer_from(record, None)
            head = self._hub.fetch_head(offer)
            manifest = verify_head(head, record.release, self.config)
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write(head_path, head, mode=0o600)
        offer = self._offer_from(record, manifest)
        if offer.payloads:
            mine = {(p.name, p.slot_class, p.size, p.sha256) for p in offer.payloads}
            theirs = {(p.name, p.slot_class, p.size, p.sha256) for p in manifest.payloads}
            if mine != theirs:
                raise UpdateRefusedError("the offer's payloads differ from the bundle manifest")
        # The director's deltas live in the offer of a check; kept for a restart.
        deltas_path = cache / "deltas.json"
        if offer.deltas:
            doc: dict[str, list[dict[str, object]]] = {}
            for d in offer.deltas:
                doc.setdefault(d.payload, []).append(
                    {k: v for k, v in vars(d).items() if k != "payload"}
                )
            atomic_write(deltas_path, json.dumps({"deltas": doc}).encode(), mode=0o600)
        elif deltas_path.exists():
            with contextlib.suppress(OSError, ValueError):
                offer = replace(offer, deltas=parse_deltas(json.loads(deltas_path.read_bytes()))[0])
        update = _Update(manifest, offer)
        for payload in manifest.payloads:
            # A payload that will come from a delta needs no chunk index (a fifth
            # of a small update's bytes); it is fetched if the delta fails.
            if self._delta_for(update, payload) is None:
                self._entries(update, payload, fetch=fetch)
        self._update = update
        return update

    def _entries(
        self, update: _Update, payload: PayloadEntry, *, fetch: bool = True
    ) -> PackedEntries:
        """The verified chunk index of ``payload``: from the state dir or (``fetch``) the hub."""
        entries = update.entries.get(payload.name)
        if entries is not None:
            return entries
        index_path = self._update_dir() / f"{payload.name}.index"
        try:
            entries = verify_index(payload, index_path.read_bytes())
        except (FileNotFoundError, UpdateRefusedError):
            if not fetch:
                raise UpdateRefusedError(
                    "the update's verified files are gone from the state dir"
                ) from None
            index = self._hub.fetch_index(update.offer, payload.name)
            entries = verify_index(payload, index)
            atomic_write(index_path, index, mode=0o600)
        update.entries[payload.name] = entries
        return entries

    def _delta_for(self, update: _Update, payload: PayloadEntry) -> DeltaOffer | None:
        """The director's delta for ``payload`` from the release the active slot holds, if usable.

        None when deltas are off, the slot class is a directory, the record
        does not know what the active slot holds, or this update's delta
        already failed once (the chunk plan is used then).
        """
        record = self._record
        if not self.config.download.deltas or not update.offer.deltas:
            return None
        if record.previous_slot is None or record.release is None:
            return None
        pair = slot_pair(self.config, payload.slot_class, record.previous_slot)
        if pair.inactive.type == "directory":
            return None
        if (self._update_dir() / f"{payload.name}.delta-failed").exists():
            return None
        running = record.extra.get(_INSTALLED + record.previous_slot)
        for d in update.offer.deltas:
            if d.payload == payload.name and d.from_version == running:
                return d
        return None

    def _install_from_delta(
        self,
        record: StateRecord,
        update: _Update,
        payload: PayloadEntry,
        pair: SlotPair,
        delta: DeltaOffer,
        progress: Callable[[Progress], None],
    ) -> int | None:
        """Write ``payload`` from ``delta``; the bytes downloaded, or None to use chunks.

        Raises:
            HubUnreachableError: the download stopped; it resumes next time.
        """
        cache = self._update_dir()
        path = cache / f"{payload.name}.delta"

        def give_up(reason: str) -> None:
            _log.warning(
                "payload %s: the delta from %s is not used (%s); installing from chunks",
                payload.name,
                delta.from_version,
                reason,
            )
            atomic_write(cache / f"{payload.name}.delta-failed", reason.encode(), mode=0o600)
            path.unlink(missing_ok=True)

        seed = _open_seed(pair.active)
        if seed is None:
            give_up("the active slot cannot be read")
            return None
        try:
            if not slot_holds(seed, delta.from_size, delta.from_sha256):
                give_up(f"the active slot does not hold {delta.from_version} as released")
                return None
            try:
                self._hub.fetch_delta(update.offer, delta, path)
            except UpdateRefusedError as e:
                give_up(e.message)
                return None
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256")
            if path.stat().st_size != delta.length or digest.hexdigest() != delta.sha256:
                give_up("the downloaded delta is not the one the director signed")
                return None
            # The slot is rewritten whole: chunks an earlier attempt journaled are gone.
            self._journal(record, update, payload).remove()
            slot = self._open_slot(pair.inactive, payload.size)
            try:
                with open(path, "rb") as f:
                    apply_delta(
                        f,
                        offer=delta,
                        payload_sha256=payload.sha256,
                        payload_size=payload.size,
                        old=seed,
                        new=slot,
                        on_progress=lambda n: progress(
                            Progress("copy", n, payload.size, delta.length)
                        ),
                    )
            except DeltaError as e:
                give_up(e.message)
                return None
            finally:
                slot.close()
        finally:
            seed.close()
        path.unlink(missing_ok=True)
        _log.info(
            "payload %s: written from the delta from %s (%d bytes downloaded)",
            payload.name,
            delta.from_version,
            delta.length,
        )
        return delta.length

    def _download(self, record: StateRecord) -> StepOutcome:
        try:
            update = self._load_update(record, fetch=True)
        except HubUnreachableError as e:
            return StepOutcome(
                Action.DOWNLOAD, record.state, self._backoff.next_delay(), note=e.diagnostics()
            )
        except UpdateRefusedError as e:
            return self._fail(record, Action.DOWNLOAD, f"update refused: {e.message}")
        except OSError as e:
            return self._fail(record, Action.DOWNLOAD, f"cannot keep the update files: {e}")
        self._backoff.reset()
        total = sum(p.size for p in update.manifest.payloads)
        record = self._advance(record, Event.DOWNLOADED)
        self._report(record, State.INSTALLING, result="started")
        self._deliver()
        return StepOutcome(Action.DOWNLOAD, record.state, note=f"installing {total} bytes")

    # -- installing --------------------------------------------------------------------

    def _install(self, record: StateRecord) -> StepOutcome:
        assert record.target_slot is not None
        assert record.update_id is not None
        try:
            update = self._load_update(record, fetch=True)
        except HubUnreachableError as e:
            return StepOutcome(
                Action.INSTALL, record.state, self._backoff.next_delay(), note=e.diagnostics()
            )
        except UpdateRefusedError as e:
            return self._fail(record, Action.INSTALL, f"update refused: {e.message}")
        hook = self._run_hook(record, "pre_install")
        if not hook.ok:
            return self._fail(
                record,
                Action.INSTALL,
                hook.reason or "pre_install hook failed",
                hook_output=hook.output,
            )
        try:
            # Not bootable from the first byte written until verified and tried.
            self._bootloader.mark_bad(record.target_slot)
            record = self._save(
                replace(
                    record,
                    extra=self._with_extra(record, **{_INSTALLED + record.target_slot: None}),
                )
            )
            total = sum(p.size for p in update.manifest.payloads) or 1
            done = downloaded = 0
            for payload in update.manifest.payloads:
                downloaded += self._install_payload(record, update, payload, done, total)
                done += payload.size
        except HubUnreachableError as e:
            return StepOutcome(
                Action.INSTALL,
                self._record.state,
                self._backoff.next_delay(),
                note=e.diagnostics(),
            )
        except ChunkRejectedError as e:
            return self._fail(
                self._record, Action.INSTALL, f"a chunk arrived corrupt twice: {e.message}"
            )
        except UpdateRefusedError as e:
            return self._fail(self._record, Action.INSTALL, f"update refused: {e.message}")
        except (InstallError, PlanError, SlotError, JournalError, BootloaderError) as e:
            return self._fail(self._record, Action.INSTALL, f"install failed: {e.message}")
        except OSError as e:
            what = "no space left" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            return self._fail(
                self._record,
                Action.INSTALL,
                f"install failed writing slot {record.target_slot}: {what}",
            )
        self._backoff.reset()
        for payload in update.manifest.payloads:
            self._journal(record, update, payload).remove()
        sizes = {_DOWNLOADED: str(downloaded), _IMAGE_BYTES: str(done)}
        record = self._advance(
            self._record, Event.WRITTEN, extra=self._with_extra(self._record, **sizes)
        )
        return StepOutcome(Action.INSTALL, record.state)

    def _journal(
        self, record: StateRecord, update: _Update, payload: PayloadEntry
    ) -> InstallJournal:
        assert record.target_slot is not None
        ident = install_id(record.target_slot, payload.sha256, payload.index.first_page_sha256)
        return InstallJournal(
            self._update_dir() / f"{payload.name}.journal",
            ident,
            max_bytes=self.config.storage.max_journal_bytes,
        )

    def _install_payload(
        self, record: StateRecord, update: _Update, payload: PayloadEntry, done: int, total: int
    ) -> int:
        """Install one payload into the inactive slot; the bytes fetched from the hub."""
        assert record.target_slot is not None
        assert record.previous_slot is not None
        pair = slot_pair(self.config, payload.slot_class, record.previous_slot)
        offer = update.offer

        def fetch(ranges: Sequence[ByteRange]) -> Iterable[tuple[ByteRange, bytes]]:
            return self._hub.fetch_ranges(offer, payload.name, ranges)

        def progress(p: Progress) -> None:
            if p.phase == "verify":
                return
            pct = min(99, (done + p.done_bytes) * 100 // total)
            last = self._record.progress or 0
            if pct >= last + PROGRESS_STEP:
                pct -= pct % PROGRESS_STEP
                self._save(self._record.with_progress(pct, now=self._clock()))
                assert record.update_id is not None
                self._queue.enqueue(
                    KIND_PROGRESS,
                    state=State.INSTALLING,
                    progress=pct,
                    details={"update_id": record.update_id},
                    report_id=f"{record.update_id}.progress.{pct}",
                )

        install = (
            self._install_directory if pair.inactive.type == "directory" else self._install_image
        )
        for attempt in (1, 2):
            try:
                return install(record, update, payload, pair, fetch, progress)
            except ChunkRejectedError as e:
                if attempt == 2:
                    raise
                _log.warning("refetching after a corrupt chunk: %s", e.message)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _install_image(
        self,
        record: StateRecord,
        update: _Update,
        payload: PayloadEntry,
        pair: SlotPair,
        fetch: FetchRanges,
        progress: Callable[[Progress], None],
    ) -> int:
        """One attempt at writing an image into a file or block slot; the bytes fetched."""
        delta = self._delta_for(update, payload)
        if delta is not None:
            written = self._install_from_delta(record, update, payload, pair, delta, progress)
            if written is not None:
                return written
        entries = self._entries(update, payload)
        download = self.config.download
        journal = self._journal(record, update, payload)
        seed_dev = _open_seed(pair.active)
        cache = self._open_cache()
        try:
            seed = SeedIndex()
            if seed_dev is not None:
                seed = seed_index(
                    SlotReader(seed_dev),
                    payload.chunking,
                    payload.size,
                    wanted=entries.digest_table(),
                )
            plan = make_plan(
                entries,
                seed,
                verified=self._held(pair.inactive, entries, journal.verified),
                cached=None if cache is None else cache.chunks,
                max_gap_bytes=download.max_gap_bytes,
                max_ranges_per_request=download.max_ranges_per_request,
                max_range_bytes=download.max_range_bytes,
            )
            del seed  # the plan holds what it needs: not kept while installing
            self._check_download(payload, plan.totals)
            slot = self._open_slot(pair.inactive, payload.size)
            try:
                result = apply_plan(
                    plan,
                    fetch_ranges=fetch,
                    slot=slot,
                    seed=seed_dev,
                    journal=journal,
                    on_progress=progress,
                    payload_sha256=payload.sha256,
                    max_gap_bytes=download.max_gap_bytes,
                    cache=None if cache is None else cache.reader(),
                    on_fetched=None if cache is None else cache.add,
                )
            finally:
                slot.close()
            if result.cache_chunks:
                _log.info(
                    "payload %s: %d chunks (%d bytes) copied from the chunk cache",
                    payload.name,
                    result.cache_chunks,
                    result.cache_bytes,
                )
            return result.downloaded_bytes
        finally:
            if cache is not None:
                cache.close()
            if seed_dev is not None:
                seed_dev.close()

    def _open_cache(self) -> ChunkCache | None:
        """The chunk cache, or None when it is off or cannot be opened (nothing is kept)."""
        max_bytes = self.config.download.cache_max_bytes
        if not max_bytes:
            return None
        try:
            return ChunkCache.open(self._state_dir / CACHE_DIR, max_bytes)
        except OSError as e:
            _log.warning("installing without the chunk cache: %s", e.strerror or e)
            return None

    def _held(
        self, slot: SlotConfig, entries: PackedEntries, verified: OrdinalRanges
    ) -> OrdinalRanges:
        """The journal's verified chunks, and those the inactive slot already holds in place.

        The slot is read once, front to back (:func:`held_in_place`).
        Nothing more than the journal's when ``[download] reuse_inactive`` is
        off or the slot cannot be read (a file slot not created yet).
        """
        if not self.config.download.reuse_inactive:
            return verified
        try:
            device = open_for_reading(slot)
        except SlotError as e:
            _log.info("the inactive slot holds nothing to keep: %s", e.diagnostics())
            return verified
        try:
            held = held_in_place(SlotReader(device), entries)
        finally:
            device.close()
        if not held:
            return verified
        kept = OrdinalRanges(verified.spans())
        for start, end in held:
            kept.add_span(start, end)
        _log.info(
            "%d of %d chunks are in place already (the inactive slot's and the journal's)",
            len(kept),
            len(entries),
        )
        return kept

    def _check_download(self, payload: PayloadEntry, totals: PlanTotals) -> None:
        limit = self.config.storage.max_download_bytes
        if totals.download_bytes > limit:
            raise UpdateRefusedError(
                f"payload {payload.name} needs {totals.download_bytes} bytes of "
                f"download; at most {limit}"
            )

    def _install_directory(
        self,
        record: StateRecord,
        update: _Update,
        payload: PayloadEntry,
        pair: SlotPair,
        fetch: FetchRanges,
        progress: Callable[[Progress], None],
    ) -> int:
        """One attempt at streaming a tar payload into a directory slot (skylift.agent.dirslot)."""
        download = self.config.download
        result = install_directory(
            pair,
            payload,
            self._entries(update, payload),
            fetch_ranges=fetch,
            state_dir=self.config.storage.state_dir,
            max_gap_bytes=download.max_gap_bytes,
            max_ranges_per_request=download.max_ranges_per_request,
            max_range_bytes=download.max_range_bytes,
            check_plan=lambda totals: self._check_download(payload, totals),
            on_progress=progress,
        )
        return result.downloaded_bytes

    # -- installed, rebooting ------------------------------------------------------------

    def _schedule_reboot(self, record: StateRecord) -> StepOutcome:
        hook = self._run_hook(record, "post_install")
        if not hook.ok:
            return self._fail(
                record,
                Action.SCHEDULE_REBOOT,
                hook.reason or "post_install hook failed",
                hook_output=hook.output,
            )
        self._report(record, State.INSTALLED, result="written", hook_output=hook.output)
        record = self._advance(record, Event.REBOOT)
        return StepOutcome(Action.SCHEDULE_REBOOT, record.state)

    def _do_reboot(self, record: StateRecord) -> StepOutcome:
        assert record.target_slot is not None
        try:
            self._bootloader.try_once(record.target_slot)
        except BootloaderError as e:
            return self._fail(record, Action.REBOOT, f"cannot try the new slot: {e.message}")
        record = self._save(replace(record, reboots=record.reboots + 1))
        self._report(record, State.REBOOTING, result="rebooting")
        self._deliver()
        return self._reboot_now(Action.REBOOT, record)

    def _reboot_now(self, action: Action, record: StateRecord) -> StepOutcome:
        self._booted = None  # whatever boots next, the next step resumes
        self._reboot()
        return StepOutcome(action, record.state, rebooting=True)

    # -- the trial boot ------------------------------------------------------------------

    def _health_check(self, record: StateRecord) -> StepOutcome:
        self._report(record, State.TRIAL, result="booted")
        self._deliver()
        hook = self._run_hook(record, "health_check")
        if hook.ok:
            record = self._advance(record, Event.HEALTH_OK)
            return StepOutcome(Action.HEALTH_CHECK, record.state)
        reason = hook.reason or "the health check failed"
        record = self._advance(
            record,
            Event.HEALTH_FAILED,
            reason=reason,
            extra=self._with_extra(record, **{_HOOK_OUTPUT: hook.output or None}),
        )
        return StepOutcome(Action.HEALTH_CHECK, record.state, note=reason)

    def _commit(self, record: StateRecord) -> StepOutcome:
        assert record.target_slot is not None
        assert record.release is not None
        # Good first: a committed report must never precede a fallback.
        self._bootloader.mark_good(record.target_slot)
        self._report(record, State.COMMITTED, result="committed")
        extra = self._with_extra(
            record,
            **{
                _INSTALLED + record.target_slot: record.release.version,
                _LAST_RESULT: f"committed {record.release.version}",
            },
        )
        record = self._advance(record, Event.REPORTED, extra=extra)
        self._forget_update()
        # The release's chunks are in the active slot now, the next install's seed.
        clear_cache(self._state_dir / CACHE_DIR)
        self._deliver()
        return StepOutcome(Action.COMMIT, record.state)

    def _roll_back(self, record: StateRecord) -> StepOutcome:
        assert record.target_slot is not None
        self._bootloader.mark_bad(record.target_slot)
        self._deliver()
        return self._reboot_now(Action.ROLL_BACK, record)

    def _report_final(self, record: StateRecord) -> StepOutcome:
        state = record.state
        output = record.extra.get(_HOOK_OUTPUT)
        reason = record.reason or ("rolled back" if state is State.ROLLED_BACK else "failed")
        if state is State.ROLLED_BACK:
            hook = self._run_hook(record, "on_rollback", SKYLIFT_REASON=reason)
            if hook.ran:
                output = "\n".join(x for x in (output, hook.output) if x)
                if not hook.ok:
                    reason = f"{reason}; {hook.reason}"
        update_id = record.update_id or ("x" + hashlib.sha256(reason.encode()).hexdigest()[:16])
        record = replace(record, update_id=update_id)
        self._report(record, state, result=state.value, reason=reason, hook_output=output)
        version = record.release.version if record.release else None
        summary = f"{state.value} {version or ''}".strip() + f": {reason}"
        values = {_LAST_RESULT: summary[:500]}
        if record.release is not None:  # a refusal at check time names no release
            values[_FAILED_TARGET] = record.release.sha256
        extra = self._with_extra(record, **values)
        record = self._advance(record, Event.REPORTED, extra=extra)
        self._forget_update()
        self._deliver()
        return StepOutcome(Action.REPORT, record.state)


def _installed(extra: Mapping[str, str]) -> dict[str, str]:
    return {k[len(_INSTALLED) :]: v for k, v in extra.items() if k.startswith(_INSTALLED)}


def _open_seed(slot: SlotConfig) -> SlotDevice | None:
    """The active slot to copy chunks from; None when it cannot be read (everything is fetched)."""
    try:
        return open_for_reading(slot)
    except SlotError as e:
        _log.warning("no seed: %s", e.diagnostics())
        return None
