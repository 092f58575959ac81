"""Executing an install plan: copy, fetch, verify each chunk, write, journal; verify the slot.

:func:`apply_plan` never writes a byte it has not verified against the
signed index: a downloaded chunk is decoded and its digest checked first, a
seed or cache copy is hashed first (a seed that changed since it was
indexed, or cache bytes torn by a power cut, fall back to the pack).
Verified chunks are journaled only after the slot was synced, so an
interrupted install resumes without fetching them again. At the end the
whole slot is read back and every chunk checked: only then may the caller
make the slot bootable.

Memory stays bounded whatever the image size: one fetched range (at most
``max_range_bytes`` of the plan, or one chunk object) and one decoded chunk
at a time; the image is never held whole. What grows with the number of
chunks stays packed as the plan is: steps are built as they are visited,
the fetched ones are found by their pack offsets (8 bytes each), and a
chunk received is one byte of a bytearray (ADR 0005, "Agent memory").
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import os
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import zstandard

from skylift.agent.journal import InstallJournal
from skylift.agent.plan import (
    PACK_OBJECT_OVERHEAD,
    ByteRange,
    ChunkStep,
    FetchRequest,
    InstallPlan,
    PlanSteps,
    Source,
    coalesce,
)
from skylift.agent.slots import SlotDevice
from skylift.chunks import ChunkDataError, ChunkEntry, PackedEntries, decode_chunk
from skylift.errors import SkyliftError

__all__ = [
    "ChunkRejectedError",
    "FetchRanges",
    "InstallError",
    "InstallResult",
    "Progress",
    "SlotVerifyError",
    "answered",
    "apply_plan",
    "chunks_in",
    "decode_object",
    "zero_digests",
]

#: The fetcher port: given the ranges of one request, yield each range and its bytes.
FetchRanges = Callable[[Sequence[ByteRange]], Iterable[tuple[ByteRange, bytes]]]

_CHECKPOINT_BYTES = 32 * 1024 * 1024


class InstallError(SkyliftError):
    """An install could not complete; the slot must not be made bootable."""


class ChunkRejectedError(InstallError):
    """A downloaded chunk does not match the signed index; it was not written."""


class SlotVerifyError(InstallError):
    """The slot, read back after writing, does not match the index."""


@dataclass(frozen=True)
class Progress:
    """Where an install is: ``done_bytes`` of ``total_bytes`` in ``phase``."""

    phase: str  # "copy", "fetch" or "verify"
    done_bytes: int
    total_bytes: int
    downloaded_bytes: int


@dataclass(frozen=True)
class InstallResult:
    """What :func:`apply_plan` did."""

    seed_chunks: int
    target_copy_chunks: int
    fetched_chunks: int
    stale_seed_chunks: int
    downloaded_bytes: int
    verified_bytes: int
    cache_chunks: int = 0  # copied from the chunk cache (stale ones left out)
    cache_bytes: int = 0
    stale_cache_chunks: int = 0


def apply_plan(
    plan: InstallPlan,
    *,
    fetch_ranges: FetchRanges,
    slot: SlotDevice,
    seed: SlotDevice | None,
    journal: InstallJournal,
    on_progress: Callable[[Progress], None] | None = None,
    payload_sha256: str | None = None,
    max_gap_bytes: int = 64 * 1024,
    cache: SlotDevice | None = None,
    on_fetched: Callable[[bytes, bytes], None] | None = None,
) -> InstallResult:
    """Write ``plan``'s target image into ``slot`` and verify all of it.

    ``slot`` is the inactive slot, opened for the image's size; ``seed`` the
    active slot (None if the plan copies nothing from it); ``cache`` the
    chunk cache's reader (:meth:`~skylift.agent.chunkcache.ChunkCache.reader`;
    None: its chunks are fetched). ``payload_sha256`` (the manifest's digest
    of the whole payload) is checked in the final read-back when given.
    ``max_gap_bytes`` coalesces the extra downloads of stale seed and cache
    chunks. ``on_fetched(digest, data)`` is called with each chunk fetched
    from the pack, decoded, once it was verified and written (to keep it in
    the cache).

    Raises:
        ChunkRejectedError: a fetched chunk is corrupt (nothing of it written or journaled).
        SlotVerifyError: the read-back differs; the journal is reset.
        InstallError: the fetcher answered other ranges than asked, or too few.
        SlotError, JournalError: the slot or the journal failed.
        Any error of ``fetch_ranges`` (transport) is passed through, after
        what was verified so far has been journaled.
    """
    run = _Run(plan, fetch_ranges, slot, journal, on_progress, on_fetched)
    with contextlib.closing(run.workers):
        return _apply(run, plan, seed, cache, payload_sha256, max_gap_bytes)


def _apply(
    run: _Run,
    plan: InstallPlan,
    seed: SlotDevice | None,
    cache: SlotDevice | None,
    payload_sha256: str | None,
    max_gap_bytes: int,
) -> InstallResult:
    try:
        stale = run.copy(Source.SEED, seed)
        stale_cache = run.copy(Source.CACHE, cache)
        refetch = stale + stale_cache
        requests = list(plan.requests)
        if refetch:
            requests += coalesce([s.pack_range for s in refetch], max_gap_bytes=max_gap_bytes)
        run.fetch(requests, plan.steps.select(Source.PACK, also=refetch))
        run.copy(Source.TARGET, run.slot)
    except BaseException:
        run.checkpoint_quietly()
        raise
    run.checkpoint()
    verified = run.verify(payload_sha256)
    return InstallResult(
        seed_chunks=plan.totals.seed_chunks - len(stale),
        target_copy_chunks=plan.totals.target_copy_chunks,
        fetched_chunks=run.fetched,
        stale_seed_chunks=len(stale),
        downloaded_bytes=run.downloaded,
        verified_bytes=verified,
        cache_chunks=plan.totals.cache_chunks - len(stale_cache),
        cache_bytes=plan.totals.cache_bytes - sum(s.entry.length for s in stale_cache),
        stale_cache_chunks=len(stale_cache),
    )


class _Run:
    def __init__(
        self,
        plan: InstallPlan,
        fetch_ranges: FetchRanges,
        slot: SlotDevice,
        journal: InstallJournal,
        on_progress: Callable[[Progress], None] | None,
        on_fetched: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        self.plan = plan
        self.on_fetched = on_fetched
        self.fetch_ranges = fetch_ranges
        self.slot = slot
        self.journal = journal
        self.on_progress = on_progress
        self.done = plan.totals.skipped_bytes
        self.downloaded = 0
        self.fetched = 0
        self.unsynced = 0
        self.workers = _Workers()
        self.decompressor = zstandard.ZstdDecompressor()
        self.zero_digests = zero_digests(plan.entries)

    def progress(self, phase: str, done: int | None = None) -> None:
        if self.on_progress is not None:
            self.on_progress(
                Progress(
                    phase,
                    self.done if done is None else done,
                    self.plan.size,
                    self.downloaded,
                )
            )

    def write(self, step: ChunkStep, data: bytes) -> None:
        self.slot.write_at(step.entry.offset, data)
        self.journal.add(step.ordinal)
        self.done += step.entry.length
        self.unsynced += step.entry.length

    def checkpoint(self) -> None:
        # The slot first: a journal record must never name bytes a power cut can lose.
        self.slot.sync()
        self.journal.commit()
        self.unsynced = 0

    def checkpoint_quietly(self) -> None:
        # The original failure is the one to report.
        with contextlib.suppress(SkyliftError, OSError):
            self.checkpoint()

    def copy(self, kind: Source, source: SlotDevice | None) -> list[ChunkStep]:
        """Copy the plan's chunks from ``kind`` out of ``source``; return those that are not there.

        Neighbouring chunks that are neighbours in the source too are read and
        written as one run (up to 1 MiB); each chunk of a run is still hashed
        on its own before any of it is written. A chunk of zeros is written
        from memory, not read. The steps are walked as packed fields: only
        the stale ones are built.
        """
        stale: list[_Fields] = []
        for run in _runs(self.plan.steps.fields_from(kind), self.zero_digests):
            first = run[0]
            total = run[-1][1] + run[-1][2] - first[1]
            if first[3] in self.zero_digests:
                self.slot.zero_range(first[1], total)
                self.wrote(run, total)
            elif source is None:
                stale.extend(run)
                continue
            else:
                view = memoryview(source.read_range(first[4], total))
                digests = self.workers.map(_sha256, _slices(view, [f[2] for f in run]))
                good = 0  # run[good_from:k] are good and not yet written
                good_from = start = pos = 0
                for k, (fields, digest) in enumerate(zip(run, digests, strict=True)):
                    end = pos + fields[2]
                    if digest == fields[3]:
                        good += 1
                    else:
                        if good:
                            self.write_run(run[good_from:k], view[start:pos])
                        good, good_from, start = 0, k + 1, end
                        stale.append(fields)
                    pos = end
                if good:
                    self.write_run(run[good_from:], view[start:pos])
            self.progress("copy")
            if self.unsynced >= _CHECKPOINT_BYTES:
                self.checkpoint()
        if stale and kind is Source.TARGET:
            # An earlier chunk of this very install was verified when written: if it
            # is wrong now, the slot is failing.
            raise SlotVerifyError(
                f"{len(stale)} chunk(s) written earlier in this install read back wrong",
                hint="the storage may be failing; the install will start over",
            )
        return [self.plan.steps.step(f[0], kind, f[4]) for f in stale]

    def write_run(self, run: Sequence[_Fields], data: memoryview) -> None:
        """Write verified neighbouring chunks at once."""
        self.slot.write_at(run[0][1], data)
        self.wrote(run, len(data))

    def wrote(self, run: Sequence[_Fields], length: int) -> None:
        first, last = run[0][0], run[-1][0]
        if last - first + 1 == len(run):  # consecutive ordinals: one span
            self.journal.add_span(first, last + 1)
        else:
            for fields in run:
                self.journal.add(fields[0])
        self.done += length
        self.unsynced += length

    def fetch(self, requests: Sequence[FetchRequest], steps: PlanSteps) -> None:
        starts = steps.pack_starts()
        by_start = _ByStart(starts, steps)
        received = bytearray(len(self.plan.entries))  # by ordinal
        count = 0
        for request in requests:
            for rng, data in answered(self.fetch_ranges, request):
                # Decoded one chunk at a time, here: decoding on the worker threads was
                # barely faster and grew the peak RSS by their malloc arenas (bench).
                for step, stored in chunks_in(rng, data, starts, by_start):
                    if received[step.ordinal]:
                        continue  # fetched again inside the gap of a later range
                    chunk = decode_object(step.entry, stored, self.decompressor)
                    self.write(step, chunk)
                    if self.on_fetched is not None:
                        self.on_fetched(step.entry.digest, chunk)
                    received[step.ordinal] = 1
                    count += 1
                    self.fetched += 1
                self.downloaded += len(data)
                self.progress("fetch")
                # As for copies: a sync per range would be one per few MiB on flash.
                # A power cut costs at most this much fetched again.
                if self.unsynced >= _CHECKPOINT_BYTES:
                    self.checkpoint()
        missing = len(steps) - count
        if missing:
            raise InstallError(f"{missing} chunk(s) were never received")

    def verify(self, payload_sha256: str | None) -> int:
        """Read the whole slot back and check every chunk; the bytes checked.

        The chunk digests come from the signed index; when its chunks cover
        the payload end to end (as every index the bundle writer makes does)
        they determine every byte, and the payload's own SHA-256 would be a
        second pass over the same bytes: it is computed only otherwise.
        """
        entries = self.plan.entries
        contiguous = _covers(entries, self.plan.size)
        whole = hashlib.sha256() if payload_sha256 is not None and not contiguous else None
        zeros = self.zero_digests
        done = 0
        for run in _verify_runs(entries):
            fields = list(run.iter_fields())
            first = fields[0]
            total = fields[-1][0] + fields[-1][1] - first[0]
            data = self.slot.read_range(first[0], total)
            pieces = _slices(memoryview(data), [f[1] for f in fields])
            # Zero chunks are compared, the others hashed (on the workers).
            digests = iter(
                self.workers.map(
                    _sha256,
                    [p for f, p in zip(fields, pieces, strict=True) if f[4] not in zeros],
                )
            )
            for (offset, length, _, _, digest), piece in zip(fields, pieces, strict=True):
                ok = (
                    piece.tobytes() == _zeros(length)
                    if digest in zeros
                    else next(digests) == digest
                )
                if not ok:
                    self.journal.reset()
                    raise SlotVerifyError(
                        f"the slot does not hold the chunk at offset {offset} after writing",
                        hint="the storage may be failing; the install will start over",
                    )
            if whole is not None:
                whole.update(data)
            done += total
            self.progress("verify", done)
        if whole is not None and whole.hexdigest() != payload_sha256:
            self.journal.reset()
            raise SlotVerifyError("the slot does not match the payload's sha256 after writing")
        return done


#: Copies and the read-back go in runs of this much (bounds their buffers; bench: 4 MiB
#: runs grew the peak RSS of an update by 11 MiB).
_RUN_BYTES = 1024 * 1024
_T = TypeVar("_T")
_R = TypeVar("_R")


class _Workers:
    """A few threads for hashing: hashlib releases the GIL.

    One thread per core, at most four; none on a single core. Work is split
    into one contiguous group per thread, so results come back in order and
    the per-task cost is paid a few times per batch, not per chunk.
    """

    def __init__(self) -> None:
        self.count = max(1, min(4, len(os.sched_getaffinity(0))))
        self._pool = (
            ThreadPoolExecutor(self.count, thread_name_prefix="skylift-install")
            if self.count > 1
            else None
        )

    def map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``[fn(x) for x in items]``, spread over the threads."""
        if self._pool is None or len(items) < 2 * self.count:
            return [fn(x) for x in items]
        step = -(-len(items) // self.count)
        groups = [items[i : i + step] for i in range(0, len(items), step)]
        futures = [self._pool.submit(_map_all, fn, g) for g in groups]
        return [r for f in futures for r in f.result()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _map_all(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    return [fn(x) for x in items]


def _sha256(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def _slices(view: memoryview, lengths: Iterable[int]) -> list[memoryview]:
    """``view`` cut into consecutive pieces of ``lengths``."""
    out = []
    pos = 0
    for n in lengths:
        out.append(view[pos : pos + n])
        pos += n
    return out


def zero_digests(entries: Sequence[ChunkEntry]) -> frozenset[bytes]:
    """The digests among ``entries`` that name a chunk of zeros.

    Only repeated digests are candidates (free space is many equal chunks of
    zeros), so only a few distinct lengths are hashed. Repeats are found
    without a set of every digest (about 100 bytes a distinct chunk): a
    bitmap of the digests' first bytes, 16 to 32 bits a chunk and held only
    here, says which digests may repeat, and those few are then checked
    exactly.
    """
    bits = 1 << max(6, (16 * len(entries)).bit_length())
    mask = bits - 1
    marks = bytearray(bits // 8)
    maybe: set[int] = set()  # bitmap positions met more than once
    for _, digest in _lengths_and_digests(entries):
        h = int.from_bytes(digest[:8], "little") & mask
        if marks[h >> 3] & (1 << (h & 7)):
            maybe.add(h)
        else:
            marks[h >> 3] |= 1 << (h & 7)
    del marks
    seen: set[bytes] = set()
    lengths: set[int] = set()
    for length, digest in _lengths_and_digests(entries):
        if (int.from_bytes(digest[:8], "little") & mask) in maybe:
            if digest in seen:
                lengths.add(length)
            seen.add(digest)
    return frozenset(hashlib.sha256(bytes(n)).digest() for n in lengths)


def _lengths_and_digests(entries: Sequence[ChunkEntry]) -> Iterator[tuple[int, bytes]]:
    if isinstance(entries, PackedEntries):
        return ((f[1], f[4]) for f in entries.iter_fields())
    return ((e.length, e.digest) for e in entries)


@functools.lru_cache(maxsize=4)
def _zeros(length: int) -> bytes:
    return bytes(length)


#: ``(ordinal, offset, length, digest, source_offset)`` of a step (PlanSteps.fields_from).
_Fields = tuple[int, int, int, bytes, int]


def _runs(steps: Iterable[_Fields], zeros: Collection[bytes]) -> Iterator[list[_Fields]]:
    """Steps in groups that are neighbours in the target and in their source (1 MiB at most).

    Chunks of zeros go in groups of their own (they are written, not read).
    """
    run: list[_Fields] = []
    size = 0
    zero = False
    end = source_end = 0  # where the run's last chunk ends, in the target and the source
    for fields in steps:
        _, offset, length, digest, source_offset = fields
        is_zero = digest in zeros
        if run and not (
            is_zero == zero
            and offset == end
            and (zero or source_offset == source_end)
            and size + length <= _RUN_BYTES
        ):
            yield run
            run, size = [], 0
        run.append(fields)
        size += length
        zero = is_zero
        end, source_end = offset + length, source_offset + length
    if run:
        yield run


def _verify_runs(entries: PackedEntries) -> Iterator[PackedEntries]:
    """Neighbouring entries in groups of at most 1 MiB (a larger chunk alone)."""
    start = 0
    size = 0
    end = 0  # where the previous entry ends
    for i, (offset, length, *_) in enumerate(entries.iter_fields()):
        if i > start and (offset != end or size + length > _RUN_BYTES):
            yield entries[start:i]
            start, size = i, 0
        size += length
        end = offset + length
    if start < len(entries):
        yield entries[start:]


def _covers(entries: PackedEntries, size: int) -> bool:
    """The entries tile ``[0, size)`` in order, without gaps or overlaps."""
    pos = 0
    for offset, length, *_ in entries.iter_fields():
        if offset != pos:
            return False
        pos += length
    return pos == size


class _ByStart(Mapping[int, ChunkStep]):
    """``steps`` by where their chunk objects start in the pack (``starts``, ascending)."""

    def __init__(self, starts: array[int], steps: Sequence[ChunkStep]) -> None:
        self._starts = starts
        self._steps = steps

    def __getitem__(self, start: int) -> ChunkStep:
        k = bisect.bisect_left(self._starts, start)
        if k == len(self._starts) or self._starts[k] != start:
            raise KeyError(start)
        return self._steps[k]

    def __iter__(self) -> Iterator[int]:
        return iter(self._starts)

    def __len__(self) -> int:
        return len(self._starts)


def answered(fetch_ranges: FetchRanges, request: FetchRequest) -> Iterator[tuple[ByteRange, bytes]]:
    """The fetcher's answer to ``request``: each range one that was asked for, whole; all of them.

    Raises:
        InstallError: a range that was not asked for, or is cut short; a range left out.
    """
    asked = set(request.ranges)
    for rng, data in fetch_ranges(request.ranges):
        if rng not in asked or len(data) != rng.length:
            raise InstallError(
                f"the hub answered bytes {rng.start}-{rng.end} ({len(data)} bytes), "
                "which were not asked for",
                hint="retry; if it persists, a proxy may be mangling range requests",
            )
        asked.discard(rng)
        yield rng, data
    if asked:
        raise InstallError(
            f"the hub left out {len(asked)} of the {len(request.ranges)} ranges asked for",
            hint="retry; chunks verified so far are not fetched again",
        )


def decode_object(
    entry: ChunkEntry, obj: memoryview, decompressor: zstandard.ZstdDecompressor
) -> bytes:
    """A pack object (codec byte, stored bytes) decoded and checked against ``entry``.

    Raises:
        ChunkRejectedError: wrong codec, undecodable, or another digest.
    """
    try:
        if not obj or obj[0] != entry.codec:
            raise ChunkDataError(f"chunk at offset {entry.offset}: codec differs from index")
        return decode_chunk(entry, bytes(obj[PACK_OBJECT_OVERHEAD:]), decompressor)
    except ChunkDataError as e:
        raise ChunkRejectedError(
            f"a downloaded chunk was refused: {e.message}",
            hint="nothing of it was written; retry, and report it if it persists",
        ) from e


def chunks_in(
    rng: ByteRange, data: bytes, starts: Sequence[int], by_start: Mapping[int, ChunkStep]
) -> Iterator[tuple[ChunkStep, memoryview]]:
    """The wanted chunk objects inside one fetched range (gap bytes are skipped)."""
    view = memoryview(data)
    i = bisect.bisect_left(starts, rng.start)
    while i < len(starts) and starts[i] < rng.end:
        step = by_start[starts[i]]
        if step.pack_range.end > rng.end:
            raise InstallError("a fetched range ends inside a chunk")
        yield step, view[step.pack_range.start - rng.start : step.pack_range.end - rng.start]
        i += 1
