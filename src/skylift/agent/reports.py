"""The on-disk report queue: what the agent tells the hub, kept until the hub confirms it.

Each report is one file in a spool directory, named by its zero-padded
sequence number (``0000000000000042.json``) and written atomically
(:mod:`skylift.fsutil`), so a power cut leaves whole reports or none. The
files hold canonical JSON with a schema version; reading is bounded and
strict, and a file that does not parse is moved to ``rejected/`` rather
than blocking the queue.

Delivery (:meth:`ReportQueue.deliver`) sends the oldest reports first, in
batches of at most :data:`MAX_BATCH` (what ``POST /device/v1/reports``
accepts), through a :class:`ReportSink`. A batch is removed only after the
sink returned: first the *delivered watermark* (the highest sequence number
the hub confirmed, in the file ``delivered-seq``) is written, then the files
are unlinked; files at or below the watermark are never sent again. A kill
between the hub's answer and the watermark means the batch is sent again:
at least once, and the hub stores each ``report_id`` once, so exactly once
overall. The first failure stops delivery with the rest still queued in
order.

Bounds: at most ``max_reports`` reports are kept. Over the limit, the oldest
*progress* reports (``kind == "progress"``) are dropped first, then the
oldest other non-final update reports (downloading, installed, trial...).
Final-status reports (committed, rolled back, failed) and state-reset
reports are never dropped: the queue may exceed its limit by those, which is
bounded by the agent itself (one per update; updates need the hub, which is
what the queue is waiting for). Text is bounded too: a reason is cut to
:data:`MAX_REASON_CHARS`, hook output to its last :data:`MAX_HOOK_OUTPUT_BYTES`
(JSON-encoded), the details to :data:`MAX_DETAILS_BYTES`, as the hub requires.

The wire shape is the device gateway's (docs/api.md): ``report_id``, ``kind``,
``state``, ``progress``, ``result``, ``reason``, ``details``, ``device_time``.
The sequence number travels in ``details.seq``; hook output in
``details.hook_output``.

One agent process owns a spool directory; the queue serialises its own
threads with a lock but does not lock against other processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from skylift.agent.errors import ReportQueueError, ReportRejectedError
from skylift.agent.machine import FINAL_STATES, State
from skylift.fsutil import atomic_write, fsync_dir

__all__ = [
    "DEFAULT_MAX_REPORTS",
    "KIND_PROGRESS",
    "KIND_STATE_RESET",
    "KIND_UPDATE",
    "MAX_BATCH",
    "MAX_DETAILS_BYTES",
    "MAX_HOOK_OUTPUT_BYTES",
    "MAX_REASON_CHARS",
    "MAX_REPORT_FILE_BYTES",
    "Report",
    "ReportQueue",
    "ReportSink",
    "format_time",
    "parse_time",
    "step_report_id",
]

#: A step of an update: the state it entered, with its result and reason.
KIND_UPDATE = "update"
#: How far a long step got; the only kind coalesced first when the queue is full.
KIND_PROGRESS = "progress"
#: The state file was unusable and the agent started again from idle.
KIND_STATE_RESET = "state_reset"

#: What ``POST /device/v1/reports`` accepts in one request.
MAX_BATCH = 100
DEFAULT_MAX_REPORTS = 1000
#: As the hub's ``MAX_REASON_CHARS`` and ``MAX_DETAILS_BYTES``.
MAX_REASON_CHARS = 2000
MAX_DETAILS_BYTES = 16 * 1024
#: Hook output kept in ``details.hook_output``, measured JSON-encoded: its tail.
MAX_HOOK_OUTPUT_BYTES = 8 * 1024
#: A spool file is never read beyond this.
MAX_REPORT_FILE_BYTES = 64 * 1024

_SCHEMA = 1
_REPORT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHORT = re.compile(r"[\x21-\x7e]{1,32}")
_SPOOL_NAME = re.compile(r"([0-9]{16})\.json")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z")
_WATERMARK = "delivered-seq"
_REJECTED = "rejected"
_MAX_REJECTED_KEPT = 50
_FIELDS = frozenset(
    {
        "schema",
        "report_id",
        "seq",
        "kind",
        "created_at",
        "state",
        "progress",
        "result",
        "reason",
        "details",
    }
)
_CUT = "[...cut] "
_CUT_END = " [...cut]"


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds and ``Z``: ``2026-11-23T19:00:00.000000Z``.

    Raises:
        ValueError: ``moment`` has no time zone.
    """
    if moment.tzinfo is None:
        raise ValueError("a time without a time zone cannot be stored")
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(value: object) -> datetime:
    """The inverse of :func:`format_time`, strictly.

    Raises:
        ValueError: ``value`` is not an RFC 3339 UTC time ending in ``Z``.
    """
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        raise ValueError("not an RFC 3339 UTC time")
    return datetime.fromisoformat(value[:-1] + "+00:00")


def step_report_id(update_id: str, state: State, attempt: int = 0) -> str:
    """A report id fixed by the update and the step, so queueing it twice stores it once.

    The agent queues a step's report after saving the state; if it is killed
    in between, it queues the report again on resume with the same id, and
    the queue (while pending) or the hub (once delivered) keeps one.
    """
    report_id = f"{update_id}.{state.value}.{attempt}"
    if not _REPORT_ID.fullmatch(report_id):
        raise ValueError(f"update id {update_id!r} does not make a valid report id")
    return report_id


@dataclass(frozen=True)
class Report:
    """One queued report. ``seq`` orders the queue; ``report_id`` is what the hub dedups on."""

    report_id: str
    seq: int
    kind: str
    created_at: datetime
    state: State | None = None
    progress: int | None = None
    result: str | None = None
    reason: str | None = None
    details: Mapping[str, Any] | None = None

    @property
    def final(self) -> bool:
        """Whether the queue must never drop it: a final status, or a state reset."""
        return self.state in FINAL_STATES or self.kind == KIND_STATE_RESET

    def to_wire(self) -> dict[str, Any]:
        """The report as ``POST /device/v1/reports`` takes it (one item of ``reports``)."""
        doc: dict[str, Any] = {"report_id": self.report_id, "kind": self.kind}
        if self.state is not None:
            doc["state"] = self.state.value
        if self.progress is not None:
            doc["progress"] = self.progress
        if self.result is not None:
            doc["result"] = self.result
        if self.reason is not None:
            doc["reason"] = self.reason
        doc["details"] = {**(self.details or {}), "seq": self.seq}
        doc["device_time"] = format_time(self.created_at)
        return doc


class ReportSink(Protocol):
    """Where reports go: the hub's report endpoint, or a fake in tests."""

    def send(self, reports: Sequence[Report]) -> None:
        """Deliver ``reports`` (oldest first, at most :data:`MAX_BATCH`), all or none.

        Returns only once the hub confirmed them (stored or known duplicates).

        Raises:
            ReportTransportError: not confirmed (network, timeout, 5xx): send again later.
            ReportRejectedError: the hub refused them as malformed (4xx): never resend as is.
        """
        ...


def _random_id() -> str:
    return secrets.token_hex(16)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _json_size(value: object) -> int:
    # As the hub measures ``details``: compact separators, ASCII escapes.
    return len(json.dumps(value, separators=(",", ":")))


def _cut_reason(reason: str) -> str:
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    return reason[: MAX_REASON_CHARS - len(_CUT_END)] + _CUT_END


def _tail(text: str, max_bytes: int) -> str:
    """The end of ``text`` whose JSON encoding fits ``max_bytes`` (marked when cut)."""
    if _json_size(text) <= max_bytes:
        return text
    body = text[-max_bytes:]
    while _json_size(_CUT + body) > max_bytes:
        # One character encodes to at most 12 bytes (a surrogate pair): cut at least enough.
        over = _json_size(_CUT + body) - max_bytes
        body = body[max(1, over // 12) :]
    return _CUT + body


def _check(report: Report) -> None:
    """Refuse what the hub would refuse, before it is queued (a caller's bug otherwise)."""
    if not _REPORT_ID.fullmatch(report.report_id):
        raise ReportQueueError("report_id must be 1-64 characters from A-Z a-z 0-9 . _ -")
    if not _SHORT.fullmatch(report.kind):
        raise ReportQueueError("a report's kind must be 1-32 printable characters, no spaces")
    if report.result is not None and not _SHORT.fullmatch(report.result):
        raise ReportQueueError("a report's result must be 1-32 printable characters, no spaces")
    if report.progress is not None and (
        type(report.progress) is not int or not 0 <= report.progress <= 100
    ):
        raise ReportQueueError("a report's progress must be an integer from 0 to 100")
    if report.reason is not None and len(report.reason) > MAX_REASON_CHARS:
        raise ReportQueueError(f"a report's reason is longer than {MAX_REASON_CHARS} characters")
    if report.details is not None:
        try:
            size = _json_size({**report.details, "seq": report.seq})
        except (TypeError, ValueError) as e:
            raise ReportQueueError(f"a report's details are not JSON: {e}") from e
        if size > MAX_DETAILS_BYTES:
            raise ReportQueueError(
                f"a report's details are {size} bytes; at most {MAX_DETAILS_BYTES}"
            )


def _to_file(report: Report) -> bytes:
    return _encode(
        {
            "schema": _SCHEMA,
            "report_id": report.report_id,
            "seq": report.seq,
            "kind": report.kind,
            "created_at": format_time(report.created_at),
            "state": None if report.state is None else report.state.value,
            "progress": report.progress,
            "result": report.result,
            "reason": report.reason,
            "details": None if report.details is None else dict(report.details),
        }
    )


def _from_file(data: bytes, seq: int) -> Report:
    """A spool file's report, strictly. Raises ValueError (with why) on anything off."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or set(doc) != _FIELDS:
        raise ValueError("not a report document")
    if doc["schema"] != _SCHEMA:
        raise ValueError(f"report schema {doc['schema']!r}; this agent reads {_SCHEMA}")
    if doc["seq"] != seq or type(doc["seq"]) is not int:
        raise ValueError("the sequence number does not match the file name")
    state = None if doc["state"] is None else State(doc["state"])
    for key in ("report_id", "kind"):
        if not isinstance(doc[key], str):
            raise ValueError(f"{key} is not a string")
    for key in ("result", "reason"):
        if doc[key] is not None and not isinstance(doc[key], str):
            raise ValueError(f"{key} is not a string")
    if doc["details"] is not None and not isinstance(doc["details"], dict):
        raise ValueError("details is not an object")
    report = Report(
        report_id=doc["report_id"],
        seq=seq,
        kind=doc["kind"],
        created_at=parse_time(doc["created_at"]),
        state=state,
        progress=doc["progress"],
        result=doc["result"],
        reason=doc["reason"],
        details=doc["details"],
    )
    try:
        _check(report)
    except ReportQueueError as e:
        raise ValueError(e.message) from None
    return report


class ReportQueue:
    """Reports on disk, one file each, delivered in order and removed once confirmed.

    Raises :class:`ReportQueueError` when the spool directory cannot be
    created, read or written.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_reports: int = DEFAULT_MAX_REPORTS,
        clock: Callable[[], datetime] = _utcnow,
        new_id: Callable[[], str] = _random_id,
    ) -> None:
        if max_reports < 1:
            raise ValueError("max_reports must be at least 1")
        self._dir = Path(directory)
        self._max_reports = max_reports
        self._clock = clock
        self._new_id = new_id
        self._lock = threading.RLock()
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReportQueueError(f"cannot create the report spool {self._dir}: {e}") from e
        self._tidy()

    @property
    def directory(self) -> Path:
        """The spool directory."""
        return self._dir

    def __len__(self) -> int:
        with self._lock:
            return len(self._seqs())

    def enqueue(
        self,
        kind: str,
        *,
        state: State | None = None,
        progress: int | None = None,
        result: str | None = None,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        hook_output: str | None = None,
        report_id: str | None = None,
    ) -> Report:
        """Queue a report durably and return it; it is on disk when this returns.

        A ``report_id`` already pending returns the pending report, unchanged
        (see :func:`step_report_id`); without one a random id is used. A long
        ``reason`` or ``hook_output`` is cut to fit.

        Raises:
            ReportQueueError: a field the hub would refuse, or the spool cannot be written.
        """
        with self._lock:
            if report_id is not None:
                for queued in self.pending():
                    if queued.report_id == report_id:
                        return queued
            extra: dict[str, Any] = dict(details or {})
            if hook_output is not None:
                extra["hook_output"] = _tail(hook_output, MAX_HOOK_OUTPUT_BYTES)
            seqs = self._seqs()
            seq = max([self._watermark(), *seqs]) + 1
            report = Report(
                report_id=report_id if report_id is not None else self._new_id(),
                seq=seq,
                kind=kind,
                created_at=self._clock(),
                state=state,
                progress=progress,
                result=result,
                reason=None if reason is None else _cut_reason(reason),
                details=extra if (details is not None or hook_output is not None) else None,
            )
            _check(report)
            try:
                atomic_write(self._path(seq), _to_file(report))
            except OSError as e:
                raise ReportQueueError(f"cannot queue a report in {self._dir}: {e}") from e
            if len(seqs) + 1 > self._max_reports:
                self._shed(len(seqs) + 1 - self._max_reports)
            return report

    def pending(self) -> list[Report]:
        """Every queued report, oldest first; a file that does not parse goes to ``rejected/``."""
        with self._lock:
            return self._read(self._seqs())

    def deliver(self, sink: ReportSink, *, max_batch: int = MAX_BATCH) -> int:
        """Send queued reports in order until none is left; how many the hub confirmed.

        A report the hub refuses as malformed is moved to ``rejected/`` and
        delivery goes on with the next.

        Raises:
            ReportTransportError: from the sink; what it did not confirm stays queued, in order.
            ReportQueueError: the spool cannot be read or updated.
        """
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be from 1 to {MAX_BATCH}")
        confirmed = 0
        with self._lock:
            while True:
                batch = self._read(self._seqs()[:max_batch])
                if not batch:
                    return confirmed
                try:
                    sink.send(batch)
                except ReportRejectedError:
                    if len(batch) > 1:
                        # Find the one the hub refuses: send them one at a time.
                        confirmed += self._deliver_singly(sink, batch)
                        continue
                    self._reject(batch[0].seq, "refused by the hub")
                    continue
                self._confirm(batch)
                confirmed += len(batch)

    # -- internals ---------------------------------------------------------

    def _deliver_singly(self, sink: ReportSink, batch: list[Report]) -> int:
        confirmed = 0
        for report in batch:
            try:
                sink.send([report])
            except ReportRejectedError:
                self._reject(report.seq, "refused by the hub")
                continue
            self._confirm([report])
            confirmed += 1
        return confirmed

    def _path(self, seq: int) -> Path:
        return self._dir / f"{seq:016d}.json"

    def _seqs(self) -> list[int]:
        """Sequence numbers of queued reports above the watermark, ascending."""
        watermark = self._watermark()
        try:
            names = os.listdir(self._dir)
        except OSError as e:
            raise ReportQueueError(f"cannot list the report spool {self._dir}: {e}") from e
        seqs = []
        for name in names:
            match = _SPOOL_NAME.fullmatch(name)
            if match and int(match.group(1)) > watermark:
                seqs.append(int(match.group(1)))
        return sorted(seqs)

    def _watermark(self) -> int:
        path = self._dir / _WATERMARK
        try:
            with open(path, "rb") as f:
                data = f.read(32)
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise ReportQueueError(f"cannot read {path}: {e}") from e
        # Written atomically, so it is whole; anything else is a disk fault.
        if not re.fullmatch(rb"[0-9]{1,16}", data):
            raise ReportQueueError(
                f"{path} is corrupt",
                hint="remove it; already delivered reports may then be sent again (the hub dedups)",
            )
        return int(data)

    def _read(self, seqs: Sequence[int]) -> list[Report]:
        reports = []
        for seq in seqs:
            path = self._path(seq)
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_REPORT_FILE_BYTES + 1)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise ReportQueueError(f"cannot read the queued report {path}: {e}") from e
            try:
                if len(data) > MAX_REPORT_FILE_BYTES:
                    raise ValueError(f"larger than {MAX_REPORT_FILE_BYTES} bytes")
                reports.append(_from_file(data, seq))
            except (ValueError, TypeError, KeyError) as e:
                self._reject(seq, f"unreadable: {e}")
        return reports

    def _confirm(self, batch: Sequence[Report]) -> None:
        """The hub has these: raise the watermark, then remove their files."""
        try:
            atomic_write(self._dir / _WATERMARK, str(batch[-1].seq).encode())
            for report in batch:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(report.seq))
            fsync_dir(self._dir)
        except OSError as e:
            raise ReportQueueError(f"cannot update the report spool {self._dir}: {e}") from e

    def _shed(self, excess: int) -> None:
        """Drop ``excess`` reports: oldest progress first, then oldest non-final; never final."""
        progress: list[Report] = []
        others: list[Report] = []
        # Oldest first, one file at a time: a queue full of progress stops at the first.
        for seq in self._seqs():
            for report in self._read([seq]):
                if report.final:
                    continue
                (progress if report.kind == KIND_PROGRESS else others).append(report)
            if len(progress) >= excess:
                break
        victims = [*progress, *others][:excess]
        try:
            for report in victims:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(report.seq))
            if victims:
                fsync_dir(self._dir)
        except OSError as e:
            raise ReportQueueError(f"cannot drop reports from {self._dir}: {e}") from e

    def _reject(self, seq: int, why: str) -> None:
        """Move a report the hub will never take out of the way, keeping the last few."""
        rejected = self._dir / _REJECTED
        try:
            rejected.mkdir(exist_ok=True)
            # A random suffix: a sequence number can come back once its report is gone.
            kept = rejected / f"{seq:016d}-{secrets.token_hex(4)}.json"
            os.replace(self._path(seq), kept)
            kept.with_suffix(".why").write_text(why[:500] + "\n")
            every = sorted(p for p in rejected.iterdir() if p.suffix == ".json")
            for old in every[:-_MAX_REJECTED_KEPT]:
                old.unlink()
                with contextlib.suppress(FileNotFoundError):
                    old.with_suffix(".why").unlink()
            fsync_dir(self._dir)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ReportQueueError(f"cannot set a bad report aside in {rejected}: {e}") from e

    def _tidy(self) -> None:
        """Remove temp files a kill left behind, and files the watermark says were delivered."""
        watermark = self._watermark()
        try:
            for name in os.listdir(self._dir):
                match = _SPOOL_NAME.fullmatch(name)
                stale = match is not None and int(match.group(1)) <= watermark
                if stale or (name.startswith(".") and ".json.tmp-" in name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._dir / name)
        except OSError as e:
            raise ReportQueueError(f"cannot tidy the report spool {self._dir}: {e}") from e
