"""The install journal: which chunks of an install are written, synced and verified.

An interrupted download resumes from it without fetching those chunks again.
It only ever saves work: losing a record costs a re-download, never a wrong
byte, because the executor re-reads and verifies the whole slot at the end.

File layout (big-endian):

    header  = "SKYJRNL1" | 32-byte install id | u32 crc32(magic | id)
    record  = u64 first ordinal | u64 end ordinal (exclusive) | u32 crc32(the 16 bytes)

Records are appended and fsynced one batch at a time (:meth:`InstallJournal.commit`),
always *after* the slot was synced, so a record never names bytes that a
power cut could still lose. Each record carries its own checksum: a torn last
record (power lost mid-append) or a corrupt one ends the journal there, and
the file is cut back to the last good record before anything is appended.
A journal written for another install (other id) is started afresh.

Bounded: ordinals are kept as merged ranges; when the file would grow past
``max_bytes`` it is rewritten, compacted, atomically.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import struct
import zlib
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

from skylift.errors import SkyliftError
from skylift.fsutil import atomic_write, fsync_dir

__all__ = [
    "HEADER_SIZE",
    "RECORD_SIZE",
    "InstallJournal",
    "JournalError",
    "OrdinalRanges",
    "install_id",
]

_MAGIC = b"SKYJRNL1"
_HEADER = struct.Struct(">8s32sI")
_RECORD = struct.Struct(">QQI")
_SPAN = struct.Struct(">QQ")
HEADER_SIZE = _HEADER.size
RECORD_SIZE = _RECORD.size
DEFAULT_MAX_BYTES = 1024 * 1024


class JournalError(SkyliftError):
    """The install journal cannot be written (an installation failure)."""


def install_id(*parts: str) -> bytes:
    """A 32-byte id for one install from what identifies it.

    For example the target slot, the payload's ``sha256`` and its first
    index page digest: a journal is reused only for the very same install.
    """
    h = hashlib.sha256()
    for p in parts:
        data = p.encode()
        h.update(len(data).to_bytes(8, "big") + data)
    return h.digest()


class OrdinalRanges:
    """A set of chunk ordinals kept as sorted, disjoint ``[start, end)`` ranges.

    A ``Collection[int]``: ``in``, ``len`` and iteration, in memory
    proportional to the number of gaps, not of chunks: 16 bytes a range, in
    arrays (a full journal of 1 MiB is 52 000 ranges: 0.8 MiB here, 4 MiB
    as lists of ints).
    """

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self._starts = array("Q")
        self._ends = array("Q")
        self._count = 0
        for start, end in spans:
            self.add_span(start, end)

    def add_span(self, start: int, end: int) -> None:
        """Add ``[start, end)``."""
        if start >= end:
            return
        i = bisect.bisect_left(self._ends, start)  # first range ending at or after start
        j = bisect.bisect_right(self._starts, end)  # ranges starting at or before end
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
            self._count -= sum(
                e - s for s, e in zip(self._starts[i:j], self._ends[i:j], strict=True)
            )
        self._starts[i:j] = array("Q", (start,))
        self._ends[i:j] = array("Q", (end,))
        self._count += end - start

    def add(self, ordinal: int) -> None:
        """Add one ordinal."""
        self.add_span(ordinal, ordinal + 1)

    def spans(self) -> list[tuple[int, int]]:
        """The ranges, ascending."""
        return list(zip(self._starts, self._ends, strict=True))

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, int):
            return False
        i = bisect.bisect_right(self._starts, item) - 1
        return i >= 0 and item < self._ends[i]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for s, e in zip(self._starts, self._ends, strict=True):
            yield from range(s, e)

    def __repr__(self) -> str:
        return f"OrdinalRanges({self.spans()!r})"


class InstallJournal:
    """The append-only journal of one install's verified chunks, at ``path``."""

    def __init__(self, path: Path, ident: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        """Open (or start) the journal for install ``ident``; see :func:`install_id`.

        Raises:
            JournalError: the file cannot be read, cut back or created.
        """
        if len(ident) != 32:
            raise ValueError("an install id is 32 bytes")
        if max_bytes < HEADER_SIZE + 4 * RECORD_SIZE:
            raise ValueError("max_bytes is too small for a journal")
        self.path = Path(path)
        self._id = ident
        self._max_bytes = max_bytes
        self._verified = OrdinalRanges()
        self._pending = OrdinalRanges()
        self._size = 0
        self.dropped_records = 0  # records refused on open (torn or corrupt)
        self._load()

    @property
    def verified(self) -> OrdinalRanges:
        """Ordinals committed so far (including those read on open)."""
        return self._verified

    def add(self, ordinal: int) -> None:
        """Note that chunk ``ordinal`` was written and verified; durable only after commit."""
        if ordinal < 0:
            raise ValueError("ordinals are not negative")
        if ordinal not in self._verified:
            self._pending.add(ordinal)

    def add_span(self, start: int, end: int) -> None:
        """Note that chunks ``start`` to ``end - 1`` were written and verified (as :meth:`add`)."""
        if start < 0:
            raise ValueError("ordinals are not negative")
        self._pending.add_span(start, end)

    def commit(self) -> None:
        """Append the pending ordinals and fsync. Sync the slot *before* calling this.

        Raises:
            JournalError: the journal cannot be written, or is full even compacted.
        """
        spans = self._pending.spans()
        if not spans:
            return
        records = b"".join(_record(s, e) for s, e in spans)
        if self._size + len(records) > self._max_bytes:
            for first, end in spans:
                self._verified.add_span(first, end)
            self._pending = OrdinalRanges()
            self._rewrite()
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                os.write(fd, records)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise JournalError(f"cannot write the install journal {self.path}: {e}") from e
        self._size += len(records)
        for first, end in spans:
            self._verified.add_span(first, end)
        self._pending = OrdinalRanges()

    def reset(self) -> None:
        """Forget every ordinal: start the install from nothing (after a failed verify)."""
        self._verified = OrdinalRanges()
        self._pending = OrdinalRanges()
        self._rewrite()

    def remove(self) -> None:
        """Delete the journal file (the install finished)."""
        try:
            self.path.unlink(missing_ok=True)
            fsync_dir(self.path.parent)
        except OSError as e:
            raise JournalError(f"cannot remove the install journal {self.path}: {e}") from e

    # -- internals --------------------------------------------------------

    def _header(self) -> bytes:
        body = _MAGIC + self._id
        return _HEADER.pack(_MAGIC, self._id, zlib.crc32(body))

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read(self._max_bytes + 1)
        except FileNotFoundError:
            self._rewrite()
            return
        except OSError as e:
            raise JournalError(f"cannot read the install journal {self.path}: {e}") from e
        if len(data) < HEADER_SIZE or data[:HEADER_SIZE] != self._header():
            self._rewrite()  # another install's journal, or a torn/corrupt header
            return
        good = HEADER_SIZE
        while good + RECORD_SIZE <= min(len(data), self._max_bytes):
            start, end, crc = _RECORD.unpack_from(data, good)
            if zlib.crc32(data[good : good + _SPAN.size]) != crc or start >= end:
                break
            self._verified.add_span(start, end)
            good += RECORD_SIZE
        self.dropped_records = -(-(len(data) - good) // RECORD_SIZE)
        self._size = good
        if good != len(data):
            self._truncate(good)

    def _truncate(self, size: int) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise JournalError(f"cannot repair the install journal {self.path}: {e}") from e

    def _rewrite(self) -> None:
        records = b"".join(_record(s, e) for s, e in self._verified.spans())
        data = self._header() + records
        if len(data) > self._max_bytes:
            raise JournalError(
                f"the install journal {self.path} would exceed {self._max_bytes} bytes",
                hint="raise [storage] max_journal_bytes",
            )
        try:
            atomic_write(self.path, data, mode=0o600)
        except OSError as e:
            raise JournalError(f"cannot write the install journal {self.path}: {e}") from e
        self._size = len(data)


def _record(start: int, end: int) -> bytes:
    span = _SPAN.pack(start, end)
    return span + zlib.crc32(span).to_bytes(4, "big")
