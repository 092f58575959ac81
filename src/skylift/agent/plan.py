"""The install plan: for every chunk of the target image, where its bytes come from.

Plan, then execute. The plan is data, computed from

- the payload's verified chunk index (``ChunkEntry`` sequence, from the signed
  manifest's page chain; kept as :class:`~skylift.chunks.PackedEntries`),
- the pack layout, derived from the index: the hub's pack holds each chunk
  as one codec byte and its stored bytes, in index order, so chunk *i*
  starts at the sum of ``1 + stored_length`` of the chunks before it
  (:func:`pack_offsets`; the hub's unsigned ``.offsets`` table is not needed),
- the seed: the active slot of the same class, cut with the payload's own
  chunking parameters (:func:`seed_index`),
- the chunks an interrupted install already wrote and verified (the journal),
- the chunks the agent's local cache keeps from installs that did not stay
  (:mod:`skylift.agent.chunkcache`).

Each chunk is then copied from the seed, copied from the cache, copied from
an earlier chunk of the target with the same digest (zero blocks repeat a
lot), or fetched from the pack; fetches are coalesced into few byte ranges
and few HTTP requests. The executor (:mod:`skylift.agent.install`)
verifies every chunk before it writes it, whatever its source.

Packed, as the index is: a step is kept as its ordinal, source and source
offset (13 bytes, :class:`PlanSteps`) and built into a :class:`ChunkStep` on
access, so that an image of many small chunks (131 072 for 512 MiB in 4 KiB
blocks) costs the agent a few MiB rather than tens (ADR 0005, "Agent memory").

Pure: the only I/O is reading the seed through the file object passed in.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, overload

from skylift.chunks import ChunkEntry, ChunkingParams, PackedEntries, iter_chunks
from skylift.chunks.chunker import Readable
from skylift.chunks.digests import DigestTable
from skylift.errors import SkyliftError

__all__ = [
    "ByteRange",
    "ChunkStep",
    "FetchRequest",
    "InstallPlan",
    "PlanError",
    "PlanSteps",
    "PlanTotals",
    "SeedIndex",
    "Source",
    "coalesce",
    "held_in_place",
    "make_plan",
    "pack_offsets",
    "seed_index",
]

#: Gaps smaller than this between two wanted ranges are fetched rather than split.
#: A separate range costs about 100 bytes of multipart headers, so only small gaps
#: are worth downloading; with 64 KiB, the demo's update fetched 1.69 MiB for
#: 1.03 MiB of chunks, with 4 KiB 1.03 MiB, in one request either way.
DEFAULT_MAX_GAP_BYTES = 4 * 1024
#: Ranges in one request (the hub accepts 512).
DEFAULT_MAX_RANGES_PER_REQUEST = 64
#: One range is held in memory by the executor: keep it bounded (a single
#: chunk object may still exceed it: it is then a range of its own).
DEFAULT_MAX_RANGE_BYTES = 4 * 1024 * 1024
#: A pack object: the codec byte, then the stored bytes (skylift.hub.content).
PACK_OBJECT_OVERHEAD = 1


class SeedIndex(Mapping[bytes, tuple[int, int]]):
    """digest -> (offset, length) of the first chunk with that content in the seed.

    Packed: a :class:`~skylift.chunks.digests.DigestTable` and two arrays,
    about 52 bytes a chunk where a dict of tuples cost about 190 (24 MiB for
    a 512 MiB image in 4 KiB blocks, the peak of an agent's install:
    bench/plan_memory.py).
    """

    __slots__ = ("_digests", "_lengths", "_offsets")

    def __init__(self, expected: int = 0) -> None:
        self._digests = DigestTable(expected=expected)
        self._offsets = array("Q")
        self._lengths = array("I")

    def add(self, digest: bytes, offset: int, length: int) -> None:
        """Record a chunk of the seed, unless one with that digest was recorded before."""
        if self._digests.add(digest) == len(self._offsets):
            self._offsets.append(offset)
            self._lengths.append(length)

    def get(self, digest: bytes, default: Any = None) -> Any:
        n = self._digests.find(digest)
        return default if n < 0 else (self._offsets[n], self._lengths[n])

    def __getitem__(self, digest: bytes) -> tuple[int, int]:
        n = self._digests.find(digest)
        if n < 0:
            raise KeyError(digest)
        return self._offsets[n], self._lengths[n]

    def __contains__(self, digest: object) -> bool:
        return digest in self._digests

    def __len__(self) -> int:
        return len(self._offsets)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._digests)


class PlanError(SkyliftError):
    """The inputs of a plan are inconsistent; nothing was written."""


class Source(Enum):
    """Where a chunk's bytes come from."""

    SEED = "seed"  # the active slot, at ``source_offset``
    TARGET = "target"  # the slot being written, an earlier chunk at ``source_offset``
    PACK = "pack"  # downloaded: ``pack_range`` of the release's pack
    CACHE = "cache"  # the agent's chunk cache, at ``source_offset`` of its data file


@dataclass(frozen=True, slots=True, order=True)
class ByteRange:
    """``[start, end)`` bytes of the pack."""

    start: int
    end: int

    @property
    def length(self) -> int:
        """Number of bytes in the range."""
        return self.end - self.start

    def header_value(self) -> str:
        """This range in an HTTP ``Range`` header (inclusive end)."""
        return f"{self.start}-{self.end - 1}"


@dataclass(frozen=True, slots=True)
class ChunkStep:
    """One chunk of the target: its entry, ordinal, and where its bytes come from.

    ``pack_range`` is known for every chunk, so that the executor can still
    download a chunk whose seed copy turns out to be stale.
    """

    ordinal: int
    entry: ChunkEntry
    source: Source
    source_offset: int
    pack_range: ByteRange


@dataclass(frozen=True)
class FetchRequest:
    """One HTTP request: a few ranges of the pack, in ascending order."""

    ranges: tuple[ByteRange, ...]

    @property
    def length(self) -> int:
        """Bytes this request downloads."""
        return sum(r.length for r in self.ranges)


@dataclass(frozen=True)
class PlanTotals:
    """What a plan will do, for progress and reports."""

    chunks: int
    target_bytes: int
    skipped_chunks: int
    skipped_bytes: int
    seed_chunks: int
    seed_bytes: int
    target_copy_chunks: int
    target_copy_bytes: int
    fetch_chunks: int
    fetch_bytes: int  # chunk bytes downloaded, uncompressed
    download_bytes: int  # bytes of the HTTP ranges, gaps included
    requests: int
    cache_chunks: int = 0
    cache_bytes: int = 0


#: How a step's source is kept in :class:`PlanSteps`: one byte a step, indexing ``_SOURCES``.
_SEED, _TARGET, _PACK, _CACHE = range(4)
_SOURCES = (Source.SEED, Source.TARGET, Source.PACK, Source.CACHE)
_SOURCE_CODES = {source: code for code, source in enumerate(_SOURCES)}


class PlanSteps(Sequence[ChunkStep]):
    """A plan's steps in target order, packed; each :class:`ChunkStep` is built on access.

    A step keeps only what the index does not say: its ordinal, source and
    source offset (13 bytes). Its entry and pack range are those of its
    ordinal in the plan's entries and pack offsets, which all steps share.
    Slices and :meth:`select` are ``PlanSteps`` too; :func:`make_plan` makes them.
    """

    __slots__ = ("_entries", "_ordinals", "_pack", "_source_offsets", "_sources")

    def __init__(self, entries: PackedEntries, pack: array[int]) -> None:
        self._entries = entries
        self._pack = pack
        self._ordinals = array("I" if len(entries) < 1 << 32 else "Q")
        self._sources = bytearray()
        self._source_offsets = array("Q")

    def _add(self, ordinal: int, code: int, source_offset: int) -> None:
        self._ordinals.append(ordinal)
        self._sources.append(code)
        self._source_offsets.append(source_offset)

    def _empty(self) -> PlanSteps:
        return PlanSteps(self._entries, self._pack)

    def __len__(self) -> int:
        return len(self._sources)

    @overload
    def __getitem__(self, index: int) -> ChunkStep: ...

    @overload
    def __getitem__(self, index: slice) -> PlanSteps: ...

    def __getitem__(self, index: int | slice) -> ChunkStep | PlanSteps:
        if isinstance(index, slice):
            part = self._empty()
            part._ordinals = self._ordinals[index]
            part._sources = self._sources[index]
            part._source_offsets = self._source_offsets[index]
            return part
        n = len(self._sources)
        k = index + n if index < 0 else index
        if not 0 <= k < n:
            raise IndexError("plan step index out of range")
        return self._step(self._ordinals[k], self._sources[k], self._source_offsets[k])

    def _step(self, ordinal: int, code: int, source_offset: int) -> ChunkStep:
        pack = ByteRange(self._pack[ordinal], self._pack[ordinal + 1])
        return ChunkStep(ordinal, self._entries[ordinal], _SOURCES[code], source_offset, pack)

    def __iter__(self) -> Iterator[ChunkStep]:
        for ordinal, code, source_offset in zip(
            self._ordinals, self._sources, self._source_offsets, strict=True
        ):
            yield self._step(ordinal, code, source_offset)

    def __contains__(self, value: object) -> bool:
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        """Where step ``value`` is (found by its ordinal: the steps are in target order).

        Raises:
            ValueError: it is not one of these steps.
        """
        n = len(self._sources)
        lo, hi, _ = slice(start, stop).indices(n)
        if isinstance(value, ChunkStep):
            k = bisect.bisect_left(self._ordinals, value.ordinal, lo, hi)
            if k < hi and self._ordinals[k] == value.ordinal and self[k] == value:
                return k
        raise ValueError("not a step of this plan")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlanSteps):
            return NotImplemented
        return (
            self._ordinals == other._ordinals
            and self._sources == other._sources
            and self._source_offsets == other._source_offsets
            and self._pack == other._pack
            and self._entries == other._entries
        )

    __hash__ = None  # type: ignore[assignment]  # compared by value, like the tuple it replaces

    def __repr__(self) -> str:
        return f"<PlanSteps of {len(self)} steps>"

    def iter_from(self, source: Source) -> Iterator[ChunkStep]:
        """The steps from ``source``, in target order, built one at a time."""
        code = _SOURCE_CODES[source]
        for ordinal, c, source_offset in zip(
            self._ordinals, self._sources, self._source_offsets, strict=True
        ):
            if c == code:
                yield self._step(ordinal, c, source_offset)

    def fields_from(self, source: Source) -> Iterator[tuple[int, int, int, bytes, int]]:
        """``(ordinal, offset, length, digest, source_offset)`` of the steps from ``source``.

        In target order, as plain tuples, for loops over every chunk: no
        step or entry is built (:meth:`step` builds one when needed).
        """
        code = _SOURCE_CODES[source]
        fields = self._entries.iter_fields()
        at = -1
        offset = length = 0
        digest = b""
        for ordinal, c, source_offset in zip(
            self._ordinals, self._sources, self._source_offsets, strict=True
        ):
            if c != code:
                continue
            while at < ordinal:  # the steps' ordinals ascend: walk the entries once
                offset, length, _, _, digest = next(fields)
                at += 1
            yield ordinal, offset, length, digest, source_offset

    def step(self, ordinal: int, source: Source, source_offset: int) -> ChunkStep:
        """The step of chunk ``ordinal`` from ``source`` (as :meth:`fields_from` named it)."""
        return self._step(ordinal, _SOURCE_CODES[source], source_offset)

    def pack_starts(self) -> array[int]:
        """Where each step's chunk object starts in the pack (ascending, as the steps are)."""
        return array("Q", (self._pack[ordinal] for ordinal in self._ordinals))

    def select(self, source: Source, *, also: Iterable[ChunkStep] = ()) -> PlanSteps:
        """The steps from ``source`` and the steps ``also`` (of this plan), in target order."""
        code = _SOURCE_CODES[source]
        extra = {s.ordinal for s in also}
        part = self._empty()
        for ordinal, c, source_offset in zip(
            self._ordinals, self._sources, self._source_offsets, strict=True
        ):
            if c == code or ordinal in extra:
                part._add(ordinal, c, source_offset)
        return part


@dataclass(frozen=True)
class InstallPlan:
    """Steps in target order (chunks already verified left out), and the requests."""

    size: int
    entries: PackedEntries
    steps: PlanSteps
    requests: tuple[FetchRequest, ...]
    totals: PlanTotals
    skipped: Collection[int] = field(default_factory=frozenset)

    def steps_from(self, source: Source) -> list[ChunkStep]:
        """The steps whose bytes come from ``source``, in target order.

        A list of built steps: a loop over many is lighter on
        ``self.steps.iter_from(source)``.
        """
        return list(self.steps.iter_from(source))


def pack_offsets(entries: Sequence[ChunkEntry]) -> array[int]:
    """Where each chunk object starts in the pack, plus the pack's end.

    The pack is the chunks of the index in order, each as one codec byte and
    its stored bytes, so the offsets follow from the signed index alone (8
    bytes a chunk the device no longer downloads). Packed: a 512 MiB image
    in 4 KiB blocks is 131 073 offsets, 1 MiB here.
    """
    offsets = array("Q", bytes(8 * (len(entries) + 1)))
    stored = (
        (f[2] for f in entries.iter_fields())
        if isinstance(entries, PackedEntries)
        else (e.stored_length for e in entries)
    )
    position = 0
    for i, length in enumerate(stored, 1):
        position += PACK_OBJECT_OVERHEAD + length
        offsets[i] = position
    return offsets


#: The inactive slot is read this many bytes at a time by :func:`held_in_place`.
_HELD_READ_BYTES = 1024 * 1024


def held_in_place(stream: Readable, entries: PackedEntries) -> list[tuple[int, int]]:
    """The chunks ``stream`` (the inactive slot) already holds where the payload puts them.

    ``[start, end)`` spans of ordinals whose bytes, at their offsets from the
    start of ``stream``, hash to their digest: a device going back to the
    release its other slot still holds (a failed release withdrawn, the
    previous one deployed again), or resuming after its journal was lost,
    writes and downloads none of them. Read front to back once, 1 MiB at a
    time (or one chunk, when larger). The entries tile the payload from
    offset 0 in every index the bundle writer makes; the scan stops at an
    entry that does not follow the one before, and where the stream ends.
    """
    spans: list[tuple[int, int]] = []
    buf = bytearray(_HELD_READ_BYTES)
    view = memoryview(buf)
    base = have = 0  # buf[:have] holds the slot's bytes [base, base + have)
    eof = False
    start: int | None = None  # the first ordinal of the span being found
    position = 0  # where the next entry must start
    ordinal = 0
    for ordinal, (offset, length, _, _, digest) in enumerate(entries.iter_fields()):
        if offset != position:
            break
        position = offset + length
        if position > base + have:  # keep what is read of this chunk, read on
            keep = base + have - offset
            kept = bytes(view[have - keep : have])
            if length > len(buf):  # a chunk larger than the buffer: a buffer that holds it
                view.release()
                buf = bytearray(length)
                view = memoryview(buf)
            buf[:keep] = kept
            base, have = offset, keep
            while not eof and have < len(buf):
                n = stream.readinto(view[have:])
                if n:
                    have += n
                else:
                    eof = True
            if position > base + have:
                break  # the slot ends before this chunk
        if hashlib.sha256(view[offset - base : position - base]).digest() == digest:
            if start is None:
                start = ordinal
            continue
        if start is not None:
            spans.append((start, ordinal))
            start = None
    else:
        ordinal = len(entries)
    if start is not None:
        spans.append((start, ordinal))
    return spans


def seed_index(
    active_slot_reader: Readable,
    params: ChunkingParams,
    length: int,
    *,
    wanted: Collection[bytes] | None = None,
) -> SeedIndex:
    """Cut the first ``length`` bytes of the active slot as the payload was cut.

    Returns ``{digest: (offset, length)}`` (the first occurrence of each
    digest). With ``wanted`` (best a :class:`~skylift.chunks.digests.DigestTable`:
    :meth:`~skylift.chunks.index.PackedEntries.digest_table`), only those
    digests are kept, which bounds the memory to the target's chunks rather
    than the seed's. A seed shorter than ``length`` is cut as far as it goes.
    """
    index = SeedIndex(expected=0 if wanted is None else len(wanted))
    offset = 0
    for chunk in iter_chunks(_Bounded(active_slot_reader, length), params):
        n = len(chunk)
        digest = hashlib.sha256(chunk).digest()
        if wanted is None or digest in wanted:
            index.add(digest, offset, n)
        offset += n
    return index


class _Bounded:
    """At most ``left`` bytes of ``stream``."""

    def __init__(self, stream: Readable, left: int) -> None:
        self._stream = stream
        self._left = left

    def readinto(self, b: memoryview, /) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(b).cast("B")
        n = self._stream.readinto(view[: min(len(view), self._left)])
        self._left -= n
        return n


def make_plan(
    entries: Sequence[ChunkEntry],
    seed: Mapping[bytes, tuple[int, int]],
    *,
    verified: Collection[int] = frozenset(),
    cached: Mapping[bytes, tuple[int, int]] | None = None,
    max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES,
    max_ranges_per_request: int = DEFAULT_MAX_RANGES_PER_REQUEST,
    max_range_bytes: int = DEFAULT_MAX_RANGE_BYTES,
) -> InstallPlan:
    """Decide, for each chunk of the target in order, where its bytes come from.

    ``entries`` is the verified index; ``seed`` from :func:`seed_index`;
    ``verified`` the ordinals an interrupted install already wrote and
    verified, which are left out; ``cached`` the chunk cache's
    ``{digest: (offset, length)}``. The first that has a chunk gives it:
    verified, seed, cache, an earlier chunk of the target, the pack.

    Raises:
        PlanError: a verified ordinal is out of range.
        ValueError: a coalescing limit is out of range.
    """
    packed = entries if isinstance(entries, PackedEntries) else PackedEntries(entries)
    offsets = pack_offsets(packed)
    skipped = verified
    if any(not 0 <= i < len(packed) for i in skipped):
        raise PlanError("the install journal names chunks the index does not have")
    steps = PlanSteps(packed, offsets)
    # digest -> offset of its first copy written (fetched, or verified before)
    first_in_target = SeedIndex()
    cache = cached or None
    chunks = [0] * len(_SOURCES)  # per source code
    nbytes = [0] * len(_SOURCES)
    skipped_bytes = 0
    for i, (offset, length, _, _, digest) in enumerate(packed.iter_fields()):
        if i in skipped:
            first_in_target.add(digest, offset, length)
            skipped_bytes += length
            continue
        hit = seed.get(digest)
        if hit is not None and hit[1] == length:
            code, source_offset = _SEED, hit[0]
        elif cache is not None and (kept := cache.get(digest)) is not None and kept[1] == length:
            code, source_offset = _CACHE, kept[0]
        elif (earlier := first_in_target.get(digest)) is not None:
            code, source_offset = _TARGET, earlier[0]
        else:
            code, source_offset = _PACK, 0
            first_in_target.add(digest, offset, length)
        steps._add(i, code, source_offset)
        chunks[code] += 1
        nbytes[code] += length
    del first_in_target  # one entry a distinct fetched digest: not held while coalescing
    fetch = (
        (offsets[i], offsets[i + 1])
        for i, code in zip(steps._ordinals, steps._sources, strict=True)
        if code == _PACK
    )
    requests = _coalesce_sorted(
        fetch,
        max_gap_bytes=max_gap_bytes,
        max_ranges_per_request=max_ranges_per_request,
        max_range_bytes=max_range_bytes,
    )
    size = packed.total_length()
    totals = PlanTotals(
        chunks=len(packed),
        target_bytes=size,
        skipped_chunks=len(skipped),
        skipped_bytes=skipped_bytes,
        seed_chunks=chunks[_SEED],
        seed_bytes=nbytes[_SEED],
        target_copy_chunks=chunks[_TARGET],
        target_copy_bytes=nbytes[_TARGET],
        fetch_chunks=chunks[_PACK],
        fetch_bytes=nbytes[_PACK],
        download_bytes=sum(r.length for req in requests for r in req.ranges),
        requests=len(requests),
        cache_chunks=chunks[_CACHE],
        cache_bytes=nbytes[_CACHE],
    )
    return InstallPlan(
        size=size,
        entries=packed,
        steps=steps,
        requests=tuple(requests),
        totals=totals,
        skipped=skipped,
    )


def coalesce(
    ranges: Iterable[ByteRange],
    *,
    max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES,
    max_ranges_per_request: int = DEFAULT_MAX_RANGES_PER_REQUEST,
    max_range_bytes: int = DEFAULT_MAX_RANGE_BYTES,
) -> list[FetchRequest]:
    """Merge ``ranges`` into few requests of few ranges.

    Two ranges are merged when at most ``max_gap_bytes`` lie between them and
    the merged range stays within ``max_range_bytes`` (a single range larger
    than that stays whole). Then at most ``max_ranges_per_request`` ranges go
    into one request. Every input byte is in exactly one output range.

    Raises:
        ValueError: a limit is out of range, or the ranges overlap.
    """
    return _coalesce_sorted(
        ((r.start, r.end) for r in sorted(ranges)),
        max_gap_bytes=max_gap_bytes,
        max_ranges_per_request=max_ranges_per_request,
        max_range_bytes=max_range_bytes,
    )


def _coalesce_sorted(
    ranges: Iterable[tuple[int, int]],
    *,
    max_gap_bytes: int,
    max_ranges_per_request: int,
    max_range_bytes: int,
) -> list[FetchRequest]:
    """:func:`coalesce` of ``(start, end)`` pairs in ascending order, read once (not held)."""
    if max_gap_bytes < 0 or max_ranges_per_request < 1 or max_range_bytes < 1:
        raise ValueError("coalescing limits must be positive")
    merged: list[ByteRange] = []
    current: tuple[int, int] | None = None  # the range being merged
    for start, end in ranges:
        if end <= start:
            continue
        if current is not None:
            first, last = current
            if start < last:
                raise ValueError("ranges to fetch overlap")
            if start - last <= max_gap_bytes and end - first <= max_range_bytes:
                current = (first, end)
                continue
            merged.append(ByteRange(first, last))
        current = (start, end)
    if current is not None:
        merged.append(ByteRange(*current))
    return [
        FetchRequest(tuple(merged[i : i + max_ranges_per_request]))
        for i in range(0, len(merged), max_ranges_per_request)
    ]
