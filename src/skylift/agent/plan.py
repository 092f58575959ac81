"""The install plan: for every chunk of the target image, where its bytes come from.

Plan, then execute. The plan is data, computed from

- the payload's verified chunk index (``ChunkEntry`` list, from the signed
  manifest's page chain),
- the pack layout, derived from the index: the hub's pack holds each chunk
  as one codec byte and its stored bytes, in index order, so chunk *i*
  starts at the sum of ``1 + stored_length`` of the chunks before it
  (:func:`pack_offsets`; the hub's unsigned ``.offsets`` table is not needed),
- the seed: the active slot of the same class, cut with the payload's own
  chunking parameters (:func:`seed_index`),
- the chunks an interrupted install already wrote and verified (the journal).

Each chunk is then copied from the seed, copied from an earlier chunk of the
target with the same digest (zero blocks repeat a lot), or fetched from the
pack; fetches are coalesced into few byte ranges and few HTTP requests. The
executor (:mod:`skylift.agent.install`) verifies every chunk before it
writes it, whatever its source.

Pure: the only I/O is reading the seed through the file object passed in.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from skylift.chunks import ChunkEntry, ChunkingParams, iter_chunks
from skylift.chunks.chunker import Readable
from skylift.errors import SkyliftError

__all__ = [
    "ByteRange",
    "ChunkStep",
    "FetchRequest",
    "InstallPlan",
    "PlanError",
    "PlanTotals",
    "SeedIndex",
    "Source",
    "coalesce",
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

#: digest -> (offset, length) of one chunk with that content in the seed.
SeedIndex = dict[bytes, tuple[int, int]]


class PlanError(SkyliftError):
    """The inputs of a plan are inconsistent; nothing was written."""


class Source(Enum):
    """Where a chunk's bytes come from."""

    SEED = "seed"  # the active slot, at ``source_offset``
    TARGET = "target"  # the slot being written, an earlier chunk at ``source_offset``
    PACK = "pack"  # downloaded: ``pack_range`` of the release's pack


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


@dataclass(frozen=True)
class InstallPlan:
    """Steps in target order (chunks already verified left out), and the requests."""

    size: int
    entries: tuple[ChunkEntry, ...]
    steps: tuple[ChunkStep, ...]
    requests: tuple[FetchRequest, ...]
    totals: PlanTotals
    skipped: Collection[int] = field(default_factory=frozenset)

    def steps_from(self, source: Source) -> list[ChunkStep]:
        """The steps whose bytes come from ``source``, in target order."""
        return [s for s in self.steps if s.source is source]


def pack_offsets(entries: Sequence[ChunkEntry]) -> array[int]:
    """Where each chunk object starts in the pack, plus the pack's end.

    The pack is the chunks of the index in order, each as one codec byte and
    its stored bytes, so the offsets follow from the signed index alone (8
    bytes a chunk the device no longer downloads). Packed: a 512 MiB image
    in 4 KiB blocks is 131 073 offsets, 1 MiB here.
    """
    offsets = array("Q", bytes(8 * (len(entries) + 1)))
    position = 0
    for i, e in enumerate(entries):
        position += PACK_OBJECT_OVERHEAD + e.stored_length
        offsets[i + 1] = position
    return offsets


def seed_index(
    active_slot_reader: Readable,
    params: ChunkingParams,
    length: int,
    *,
    wanted: Collection[bytes] | None = None,
) -> SeedIndex:
    """Cut the first ``length`` bytes of the active slot as the payload was cut.

    Returns ``{digest: (offset, length)}`` (the first occurrence of each
    digest). With ``wanted``, only those digests are kept, which bounds the
    memory to the target's chunks rather than the seed's. A seed shorter
    than ``length`` is cut as far as it goes.
    """
    index: SeedIndex = {}
    offset = 0
    for chunk in iter_chunks(_Bounded(active_slot_reader, length), params):
        digest = hashlib.sha256(chunk).digest()
        if (wanted is None or digest in wanted) and digest not in index:
            index[digest] = (offset, len(chunk))
        offset += len(chunk)
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
    max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES,
    max_ranges_per_request: int = DEFAULT_MAX_RANGES_PER_REQUEST,
    max_range_bytes: int = DEFAULT_MAX_RANGE_BYTES,
) -> InstallPlan:
    """Decide, for each chunk of the target in order, where its bytes come from.

    ``entries`` is the verified index; ``seed`` from :func:`seed_index`;
    ``verified`` the ordinals an interrupted install already wrote and
    verified, which are left out.

    Raises:
        PlanError: a verified ordinal is out of range.
        ValueError: a coalescing limit is out of range.
    """
    offsets = pack_offsets(entries)
    skipped = verified
    if any(not 0 <= i < len(entries) for i in skipped):
        raise PlanError("the install journal names chunks the index does not have")
    steps: list[ChunkStep] = []
    first_in_target: dict[bytes, int] = {}  # digest -> offset of its first fetched copy
    for i, e in enumerate(entries):
        pack = ByteRange(offsets[i], offsets[i + 1])
        if i in skipped:
            first_in_target.setdefault(e.digest, e.offset)
            continue
        hit = seed.get(e.digest)
        if hit is not None and hit[1] == e.length:
            steps.append(ChunkStep(i, e, Source.SEED, hit[0], pack))
        elif e.digest in first_in_target:
            steps.append(ChunkStep(i, e, Source.TARGET, first_in_target[e.digest], pack))
        else:
            steps.append(ChunkStep(i, e, Source.PACK, 0, pack))
            first_in_target[e.digest] = e.offset
    fetch = [s.pack_range for s in steps if s.source is Source.PACK]
    requests = coalesce(
        fetch,
        max_gap_bytes=max_gap_bytes,
        max_ranges_per_request=max_ranges_per_request,
        max_range_bytes=max_range_bytes,
    )
    totals = _totals(entries, steps, skipped, requests)
    return InstallPlan(
        size=sum(e.length for e in entries),
        entries=tuple(entries),
        steps=tuple(steps),
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
    if max_gap_bytes < 0 or max_ranges_per_request < 1 or max_range_bytes < 1:
        raise ValueError("coalescing limits must be positive")
    merged: list[ByteRange] = []
    for r in sorted(ranges):
        if r.length <= 0:
            continue
        if merged:
            last = merged[-1]
            if r.start < last.end:
                raise ValueError("ranges to fetch overlap")
            if r.start - last.end <= max_gap_bytes and r.end - last.start <= max_range_bytes:
                merged[-1] = ByteRange(last.start, r.end)
                continue
        merged.append(r)
    return [
        FetchRequest(tuple(merged[i : i + max_ranges_per_request]))
        for i in range(0, len(merged), max_ranges_per_request)
    ]


def _totals(
    entries: Sequence[ChunkEntry],
    steps: Sequence[ChunkStep],
    skipped: Collection[int],
    requests: Sequence[FetchRequest],
) -> PlanTotals:
    def count(source: Source) -> tuple[int, int]:
        chosen = [s.entry.length for s in steps if s.source is source]
        return len(chosen), sum(chosen)

    seed_n, seed_b = count(Source.SEED)
    target_n, target_b = count(Source.TARGET)
    fetch_n, fetch_b = count(Source.PACK)
    return PlanTotals(
        chunks=len(entries),
        target_bytes=sum(e.length for e in entries),
        skipped_chunks=len(skipped),
        skipped_bytes=sum(entries[i].length for i in skipped),
        seed_chunks=seed_n,
        seed_bytes=seed_b,
        target_copy_chunks=target_n,
        target_copy_bytes=target_b,
        fetch_chunks=fetch_n,
        fetch_bytes=fetch_b,
        download_bytes=sum(r.length for req in requests for r in req.ranges),
        requests=len(requests),
    )
