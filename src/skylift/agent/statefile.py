"""The agent's persisted state: one record in ``state.json``, saved before every action.

The record (:class:`StateRecord`) is the state machine's state plus what an
update needs to resume after a power cut: the release being installed, the
target and previous slots, the loop-guard counter, the boot id it was saved
in, progress, a reason, timestamps. It is stored as canonical JSON (sorted
keys, no spaces, ASCII) with a format name and a schema version, and
written atomically (temp file, fsync, rename, fsync the directory; see
:mod:`skylift.fsutil`), so a reader sees the old record or the new one,
never a mix. ``generation`` grows by one on every save.

Reading is bounded (:data:`MAX_STATE_BYTES`) and strict: an unknown or
missing key, a wrong type, a value out of range, a schema this agent does
not know, truncation or trailing bytes all raise :class:`StateFileError`.

Recovery (:func:`open_state`), decided here: a state file that cannot be
used is not guessed at. The agent

1. queues a ``state_reset`` report (state ``idle``, the problem as reason)
   whose id is derived from the bad file's bytes and modification time, so
   doing this again after a kill queues it once;
2. keeps the bad file for diagnosis as ``state.json.corrupt-<UTC time>``;
3. saves a fresh idle record and goes on from idle.

This is safe for the device because the bootloader, not this file, decides
what boots: an update's new slot is marked bad before it is written and is
only tried once before it is marked good, so forgetting an update in flight
at worst costs a fallback to the old slot at the next reboot, and the hub's
director offers the update again at the next poll. The report does not say
``failed``: the hub's rollout gates should not count a device's disk fault
as a failed release.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skylift.agent.errors import AgentStateError, StateFileError
from skylift.agent.machine import Event, Resume, State, transition
from skylift.agent.reports import (
    KIND_STATE_RESET,
    MAX_REASON_CHARS,
    ReportQueue,
    format_time,
    parse_time,
)
from skylift.fsutil import atomic_write, fsync_dir

__all__ = [
    "FORMAT",
    "MAX_STATE_BYTES",
    "SCHEMA_VERSION",
    "STATE_FILE_NAME",
    "Opened",
    "Release",
    "StateRecord",
    "StateStore",
    "decode_state",
    "encode_state",
    "open_state",
]

FORMAT = "skylift-agent-state"
SCHEMA_VERSION = 1
STATE_FILE_NAME = "state.json"
#: A state file larger than this is refused unread.
MAX_STATE_BYTES = 64 * 1024

_PRODUCT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}")
_TARGET = re.compile(r"[^\x00-\x1f\x7f/][^\x00-\x1f\x7f]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SLOT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Update ids go into report ids (at most 64 characters with the step).
_UPDATE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
_DEPLOYMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BOOT_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_MAX_COUNTER = 1_000_000


@dataclass(frozen=True)
class Release:
    """The release an update installs, as both TUF chains agreed on it."""

    product: str
    version: str
    target: str  # the target's path in the image repository
    sha256: str  # hex digest of the bundle
    length: int  # bytes of the bundle


@dataclass(frozen=True)
class StateRecord:
    """Everything the agent must remember across a power cut. Immutable; save a new one.

    Update fields (``update_id`` to ``progress``) are empty in ``idle``.
    ``resumes`` is the loop guard's counter (see :func:`skylift.agent.machine.resume`);
    ``boot_id`` is the kernel's boot id when the record was saved, which tells
    an agent restart from a reboot.
    """

    state: State = State.IDLE
    generation: int = 0
    update_id: str | None = None
    deployment_id: str | None = None
    release: Release | None = None
    target_slot: str | None = None
    previous_slot: str | None = None
    previous_version: str | None = None
    resumes: int = 0
    reboots: int = 0
    progress: int | None = None
    reason: str | None = None
    boot_id: str | None = None
    entered_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def advanced(
        self, event: Event, *, now: datetime, reason: str | None = None, **changes: Any
    ) -> StateRecord:
        """The record after ``event``: next state, counter reset, ``changes`` applied.

        Entering idle forgets the update. ``changes`` name fields of this record.

        Raises:
            InvalidTransitionError: the current state does not accept ``event``.
        """
        state = transition(self.state, event)
        if state is State.IDLE:
            return replace(
                StateRecord(),
                generation=self.generation,
                boot_id=self.boot_id,
                entered_at=now,
                updated_at=now,
                **changes,
            )
        if reason is not None:
            reason = reason[:MAX_REASON_CHARS]
        base = replace(
            self,
            state=state,
            resumes=0,
            progress=None,
            reason=reason,
            entered_at=now,
            updated_at=now,
        )
        return replace(base, **changes)

    def with_progress(self, progress: int, *, now: datetime) -> StateRecord:
        """The same state further on; progress is movement, so the loop guard starts again."""
        if not 0 <= progress <= 100:
            raise ValueError("progress is a percentage from 0 to 100")
        moved = self.progress is None or progress > self.progress
        return replace(
            self,
            progress=progress,
            resumes=0 if moved else self.resumes,
            updated_at=now,
        )

    def resumed(self, decision: Resume, *, now: datetime, boot_id: str | None) -> StateRecord:
        """The record after :func:`skylift.agent.machine.resume`, in the current boot."""
        if decision.event is not None:
            record = self.advanced(decision.event, now=now, reason=decision.reason)
        elif decision.reason is not None:
            record = replace(self, reason=decision.reason[:MAX_REASON_CHARS], updated_at=now)
        else:
            record = replace(self, updated_at=now)
        return replace(record, resumes=decision.resumes, boot_id=boot_id)


def encode_state(record: StateRecord) -> bytes:
    """The record as canonical JSON bytes.

    Raises:
        AgentStateError: the record holds a value the file format cannot (a naive time).
    """
    doc: dict[str, Any] = {"format": FORMAT, "schema": SCHEMA_VERSION}
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, State):
            value = value.value
        elif isinstance(value, Release):
            value = {g.name: getattr(value, g.name) for g in fields(value)}
        elif isinstance(value, datetime):
            try:
                value = format_time(value)
            except ValueError as e:
                raise AgentStateError(f"state field {f.name}: {e}") from e
        elif isinstance(value, Mapping):
            value = dict(value)
        doc[f.name] = value
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _fail(message: str) -> StateFileError:
    return StateFileError(
        f"the agent state file is not usable: {message}",
        hint="the agent keeps it aside as state.json.corrupt-<time> and starts from idle",
    )


def _opt_str(doc: Mapping[str, Any], key: str, pattern: re.Pattern[str]) -> str | None:
    value = doc[key]
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _fail(f"{key} is not valid")
    return value


def _str(doc: Mapping[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = _opt_str(doc, key, pattern)
    if value is None:
        raise _fail(f"{key} is missing")
    return value


def _int(doc: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = doc[key]
    if type(value) is not int or not low <= value <= high:  # bool is not a counter
        raise _fail(f"{key} must be an integer from {low} to {high}")
    return value


def _opt_time(doc: Mapping[str, Any], key: str) -> datetime | None:
    value = doc[key]
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise _fail(f"{key} is not an RFC 3339 UTC time") from None


_RECORD_KEYS = frozenset(f.name for f in fields(StateRecord)) | {"format", "schema"}
_RELEASE_KEYS = frozenset(f.name for f in fields(Release))


def _release(value: Any) -> Release | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != _RELEASE_KEYS:
        raise _fail("release is not a release object")
    return Release(
        product=_str(value, "product", _PRODUCT),
        version=_str(value, "version", _VERSION),
        target=_str(value, "target", _TARGET),
        sha256=_str(value, "sha256", _SHA256),
        length=_int(value, "length", 0, 2**63 - 1),
    )


def decode_state(data: bytes) -> StateRecord:
    """The record in ``data``, validated strictly.

    Raises:
        StateFileError: oversized, not JSON (truncated, trailing bytes), unknown
            format or schema, or any key missing, unknown, mistyped or out of range.
    """
    if len(data) > MAX_STATE_BYTES:
        raise _fail(f"larger than {MAX_STATE_BYTES} bytes")
    if not data:
        raise _fail("it is empty")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise _fail(f"not JSON (truncated or damaged): {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(f"not a {FORMAT} document")
    if doc.get("schema") != SCHEMA_VERSION or type(doc.get("schema")) is not int:
        raise _fail(f"schema {doc.get('schema')!r}; this agent reads schema {SCHEMA_VERSION}")
    keys = set(doc)
    if keys != _RECORD_KEYS:
        odd = sorted(keys - _RECORD_KEYS) or sorted(_RECORD_KEYS - keys)
        raise _fail(f"unexpected or missing key {odd[0][:40]!r}")
    try:
        state = State(doc["state"])
    except ValueError:
        raise _fail("state is not an agent state") from None
    progress = doc["progress"]
    if progress is not None:
        progress = _int(doc, "progress", 0, 100)
    reason = doc["reason"]
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
        raise _fail(f"reason must be a string of at most {MAX_REASON_CHARS} characters")
    extra = doc["extra"]
    if not isinstance(extra, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
    ):
        raise _fail("extra must map strings to strings")
    record = StateRecord(
        state=state,
        generation=_int(doc, "generation", 0, 2**63 - 1),
        update_id=_opt_str(doc, "update_id", _UPDATE_ID),
        deployment_id=_opt_str(doc, "deployment_id", _DEPLOYMENT_ID),
        release=_release(doc["release"]),
        target_slot=_opt_str(doc, "target_slot", _SLOT),
        previous_slot=_opt_str(doc, "previous_slot", _SLOT),
        previous_version=_opt_str(doc, "previous_version", _VERSION),
        resumes=_int(doc, "resumes", 0, _MAX_COUNTER),
        reboots=_int(doc, "reboots", 0, _MAX_COUNTER),
        progress=progress,
        reason=reason,
        boot_id=_opt_str(doc, "boot_id", _BOOT_ID),
        entered_at=_opt_time(doc, "entered_at"),
        updated_at=_opt_time(doc, "updated_at"),
        started_at=_opt_time(doc, "started_at"),
        extra=extra,
    )
    _check_consistent(record)
    return record


def _check_consistent(record: StateRecord) -> None:
    """An update in flight names what it installs and where; idle names nothing."""
    in_update = record.state not in (State.IDLE, State.CHECKING)
    if not in_update and (record.release is not None or record.target_slot is not None):
        raise _fail(f"state {record.state.value!r} names an update")
    needs_target = record.state not in (State.IDLE, State.CHECKING, State.FAILED)
    if needs_target and (
        record.release is None or record.target_slot is None or record.update_id is None
    ):
        raise _fail(f"state {record.state.value!r} lacks its release, update id or target slot")


class StateStore:
    """``state.json`` in the agent's state directory: load it, save it atomically."""

    def __init__(self, directory: Path, *, max_bytes: int = MAX_STATE_BYTES) -> None:
        self._dir = Path(directory)
        self._max_bytes = max_bytes

    @property
    def path(self) -> Path:
        """The state file."""
        return self._dir / STATE_FILE_NAME

    def load(self) -> StateRecord | None:
        """The saved record, or ``None`` when there is none yet (first start).

        Raises:
            StateFileError: the file cannot be read or is not a valid record.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read(self._max_bytes + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _fail(f"cannot read {self.path}: {e.strerror or e}") from e
        if len(data) > self._max_bytes:
            raise _fail(f"larger than {self._max_bytes} bytes")
        return decode_state(data)

    def save(self, record: StateRecord) -> StateRecord:
        """Write ``record`` durably with the next generation; returns what was written.

        When this returns, the record survives a power cut; before, the old one does.

        Raises:
            StateFileError: the directory cannot be written (disk full, read-only).
        """
        saved = replace(record, generation=record.generation + 1)
        data = encode_state(saved)
        if len(data) > self._max_bytes:
            raise AgentStateError(
                f"the state record is {len(data)} bytes; at most {self._max_bytes}"
            )
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, data, mode=0o600)
        except OSError as e:
            raise StateFileError(
                f"cannot save the agent state in {self._dir}: {e.strerror or e}",
                hint="the agent acts only on a saved state; free space or fix the disk",
            ) from e
        return saved

    def corrupt_path(self, now: datetime) -> Path:
        """Where :meth:`set_aside` would keep the file now: ``state.json.corrupt-<UTC time>``."""
        stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        kept = self._dir / f"{STATE_FILE_NAME}.corrupt-{stamp}"
        for n in range(1, 1000):
            if not kept.exists():
                break
            kept = self._dir / f"{STATE_FILE_NAME}.corrupt-{stamp}-{n}"
        return kept

    def set_aside(self, kept: Path) -> Path:
        """Rename the state file to ``kept`` (see :meth:`corrupt_path`), durably; ``kept``.

        Raises:
            StateFileError: the rename fails.
        """
        try:
            os.replace(self.path, kept)
            fsync_dir(self._dir)
        except OSError as e:
            raise StateFileError(f"cannot keep the bad state file aside: {e}") from e
        return kept

    def remove_temp_files(self) -> None:
        """Delete temp files a killed save left behind (they never hold the current state)."""
        prefix = f".{STATE_FILE_NAME}.tmp-"
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self._dir):
                if name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._dir / name)

    def fingerprint(self) -> str:
        """A short digest of the file's bytes and modification time: one per incident."""
        digest = hashlib.sha256()
        try:
            with open(self.path, "rb") as f:
                digest.update(f.read(self._max_bytes + 1))
                digest.update(str(os.fstat(f.fileno()).st_mtime_ns).encode())
        except OSError as e:
            digest.update(str(e.errno).encode())
        return digest.hexdigest()[:24]


@dataclass(frozen=True)
class Opened:
    """What :func:`open_state` found: the record to go on from, and any recovery."""

    record: StateRecord
    problem: StateFileError | None = None
    kept_as: Path | None = None

    @property
    def recovered(self) -> bool:
        """Whether the state file was unusable and the agent starts again from idle."""
        return self.problem is not None


def _now() -> datetime:
    return datetime.now(UTC)


def open_state(
    store: StateStore, queue: ReportQueue, *, clock: Callable[[], datetime] = _now
) -> Opened:
    """Load the saved record, or recover from an unusable one (see the module docstring).

    No file yet gives a fresh idle record (not saved: idle has nothing to guard).

    Raises:
        StateFileError: the recovery itself fails (the file cannot be moved or a new one saved).
        ReportQueueError: the reset report cannot be queued.
    """
    store.remove_temp_files()
    try:
        record = store.load()
    except StateFileError as problem:
        now = clock()
        # Queue first: a kill before the rename finds the same file again and
        # derives the same report id, so the report is queued once.
        kept = store.corrupt_path(now)
        queue.enqueue(
            KIND_STATE_RESET,
            state=State.IDLE,
            result="reset",
            reason=f"{problem.message}; kept as {kept.name}; starting again from idle",
            report_id=f"state-reset-{store.fingerprint()}",
        )
        store.set_aside(kept)
        fresh = store.save(StateRecord(entered_at=now, updated_at=now))
        return Opened(fresh, problem, kept)
    if record is None:
        now = clock()
        return Opened(StateRecord(entered_at=now, updated_at=now))
    return Opened(record)
