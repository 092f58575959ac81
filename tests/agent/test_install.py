"""apply_plan against an in-memory hub built from a real bundle: verify before write, resume, read-back."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from bundle.conftest import build, realistic_payload  # tests/ is on sys.path under pytest
from skylift.agent.chunkcache import ChunkCache
from skylift.agent.config import SlotConfig
from skylift.agent.install import (
    ChunkRejectedError,
    InstallError,
    InstallResult,
    Progress,
    SlotVerifyError,
    apply_plan,
    zero_digests,
)
from skylift.agent.journal import InstallJournal, install_id
from skylift.agent.plan import ByteRange, InstallPlan, Source, make_plan, seed_index
from skylift.agent.slots import SlotDevice, open_for_install, open_for_reading
from skylift.bundle import ChunkData, PayloadEntry, TrustedKeys, read_body, read_head
from skylift.chunks import ChunkEntry, ChunkingParams, PackedEntries
from skylift.trust.keys import generate_private_key, signer_for

PARAMS = ChunkingParams.cdc(8 * 1024)


@dataclass
class Release:
    """What the hub serves for one payload: verified entries, the pack, its offsets."""

    payload: PayloadEntry
    entries: list[ChunkEntry]
    pack: bytes
    offsets: list[int]


def release_of(signer: CryptoSigner, image: bytes) -> Release:
    data = build([signer], {"rootfs": image}, chunking=PARAMS)
    stream = io.BytesIO(data)
    head = read_head(stream)
    head.verify(TrustedKeys((signer.public_key,)))
    entries: list[ChunkEntry] = []
    pack = bytearray()
    offsets = [0]
    for ev in read_body(stream, head):
        if isinstance(ev, ChunkData):
            entries.append(ev.entry)
            pack += bytes([ev.entry.codec]) + ev.stored  # the hub's pack object layout
            offsets.append(len(pack))
    return Release(head.manifest.payloads[0], entries, bytes(pack), offsets)


@dataclass
class FakeHub:
    """The fetcher port, in memory; records every range asked for; can fail or lie."""

    pack: bytes
    asked: list[ByteRange] = field(default_factory=list)
    fail_after_ranges: int | None = None
    corrupt_at: int | None = None  # pack offset of a byte to flip

    def __call__(self, ranges: Sequence[ByteRange]) -> Iterator[tuple[ByteRange, bytes]]:
        for r in ranges:
            if self.fail_after_ranges is not None and len(self.asked) >= self.fail_after_ranges:
                raise ConnectionError("network cut")
            self.asked.append(r)
            body = bytearray(self.pack[r.start : r.end])
            if self.corrupt_at is not None and r.start <= self.corrupt_at < r.end:
                body[self.corrupt_at - r.start] ^= 0x40
            yield r, bytes(body)


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return signer_for(generate_private_key())


V1 = realistic_payload(600_000, seed=21)
V2 = V1[:200_000] + b"a new feature" * 500 + V1[200_000:450_000] + b"\x01" * 777 + V1[451_000:]


@pytest.fixture(scope="module")
def v2(signer: CryptoSigner) -> Release:
    return release_of(signer, V2)


def slot_cfg(path: Path, name: str) -> SlotConfig:
    return SlotConfig("rootfs", name, "file", path, size_bytes=4 << 20)


def run(
    tmp_path: Path,
    release: Release,
    hub: FakeHub,
    *,
    seed_image: bytes | None = None,
    progress: list[Progress] | None = None,
    small_ranges: bool = False,
) -> tuple[InstallPlan, InstallJournal]:
    journal = InstallJournal(
        tmp_path / "rootfs.journal", install_id("rootfs/B", release.payload.sha256)
    )
    seed_dev: SlotDevice | None = None
    seed: dict[bytes, tuple[int, int]] = {}
    if seed_image is not None:
        (tmp_path / "a.img").write_bytes(seed_image)
        seed_dev = open_for_reading(slot_cfg(tmp_path / "a.img", "A"))
        with open(tmp_path / "a.img", "rb") as f:
            wanted = {e.digest for e in release.entries}
            seed = seed_index(f, release.payload.chunking, len(seed_image), wanted=wanted)
    plan = make_plan(
        release.entries,
        seed,
        verified=journal.verified,
        max_gap_bytes=0 if small_ranges else 64 * 1024,
        max_range_bytes=16 * 1024 if small_ranges else 1 << 20,
        max_ranges_per_request=2 if small_ranges else 16,
    )
    slot = open_for_install(slot_cfg(tmp_path / "b.img", "B"), plan.size)
    try:
        apply_plan(
            plan,
            fetch_ranges=hub,
            slot=slot,
            seed=seed_dev,
            journal=journal,
            on_progress=None if progress is None else progress.append,
            payload_sha256=release.payload.sha256,
        )
    finally:
        slot.close()
        if seed_dev is not None:
            seed_dev.close()
    return plan, journal


def ordinals_in(release: Release, ranges: Sequence[ByteRange]) -> set[int]:
    return {
        i
        for i in range(len(release.entries))
        for r in ranges
        if r.start <= release.offsets[i] and release.offsets[i + 1] <= r.end
    }


def test_full_install_without_seed(tmp_path: Path, v2: Release) -> None:
    hub = FakeHub(v2.pack)
    progress: list[Progress] = []
    plan, journal = run(tmp_path, v2, hub, progress=progress)
    assert (tmp_path / "b.img").read_bytes() == V2
    assert len(journal.verified) == len(v2.entries)
    assert progress[-1] == Progress("verify", len(V2), len(V2), plan.totals.download_bytes)
    assert [p.done_bytes for p in progress if p.phase == "fetch"] == sorted(
        p.done_bytes for p in progress if p.phase == "fetch"
    )


def test_seeded_install_downloads_only_what_changed(tmp_path: Path, v2: Release) -> None:
    hub = FakeHub(v2.pack)
    plan, _ = run(tmp_path, v2, hub, seed_image=V1)
    assert (tmp_path / "b.img").read_bytes() == V2
    downloaded = sum(r.length for r in hub.asked)
    assert downloaded == plan.totals.download_bytes
    assert downloaded < len(v2.pack) // 3
    assert plan.totals.seed_chunks > len(v2.entries) // 2


def test_corrupt_chunk_is_refused_and_not_marked_verified(tmp_path: Path, v2: Release) -> None:
    victim = len(v2.entries) // 2
    hub = FakeHub(v2.pack, corrupt_at=v2.offsets[victim] + 5)
    with pytest.raises(ChunkRejectedError, match="refused") as info:
        run(tmp_path, v2, hub)
    assert "nothing of it was written" in info.value.diagnostics()
    journal = InstallJournal(tmp_path / "rootfs.journal", install_id("rootfs/B", v2.payload.sha256))
    assert victim not in journal.verified
    assert all(i < victim for i in journal.verified)
    entry = v2.entries[victim]
    written = (tmp_path / "b.img").read_bytes()[entry.offset : entry.offset + entry.length]
    assert written != V2[entry.offset : entry.offset + entry.length]


def test_wrong_codec_byte_is_refused(tmp_path: Path, v2: Release) -> None:
    hub = FakeHub(v2.pack, corrupt_at=v2.offsets[3])  # the codec byte of chunk 3
    with pytest.raises(ChunkRejectedError):
        run(tmp_path, v2, hub)


def test_interrupted_install_resumes_without_refetching(tmp_path: Path, v2: Release) -> None:
    first = FakeHub(v2.pack, fail_after_ranges=3)
    with pytest.raises(ConnectionError):
        run(tmp_path, v2, first, small_ranges=True)
    fetched_first = ordinals_in(v2, first.asked)
    assert fetched_first
    second = FakeHub(v2.pack)
    plan, journal = run(tmp_path, v2, second, small_ranges=True)
    fetched_second = ordinals_in(v2, second.asked)
    assert fetched_first.isdisjoint(fetched_second)
    assert plan.totals.skipped_chunks >= len(fetched_first)
    # Every distinct chunk came over the wire once (repeats are copied within the slot).
    fetched_digests = {v2.entries[i].digest for i in fetched_first | fetched_second}
    assert fetched_digests == {e.digest for e in v2.entries}
    assert (tmp_path / "b.img").read_bytes() == V2
    assert len(journal.verified) == len(v2.entries)


def test_stale_seed_falls_back_to_the_pack(tmp_path: Path, v2: Release) -> None:
    # The seed index says "you have these", but the active slot's bytes changed since.
    hub = FakeHub(v2.pack)
    journal = InstallJournal(tmp_path / "j", install_id("x"))
    (tmp_path / "a.img").write_bytes(V1)
    seed = seed_index(io.BytesIO(V1), v2.payload.chunking, len(V1))
    (tmp_path / "a.img").write_bytes(bytes(len(V1)))  # overwritten after indexing
    plan = make_plan(v2.entries, seed)
    slot = open_for_install(slot_cfg(tmp_path / "b.img", "B"), plan.size)
    seed_dev = open_for_reading(slot_cfg(tmp_path / "a.img", "A"))
    try:
        result = apply_plan(
            plan, fetch_ranges=hub, slot=slot, seed=seed_dev, journal=journal, on_progress=None
        )
    finally:
        slot.close()
        seed_dev.close()
    assert 0 < result.stale_seed_chunks <= plan.totals.seed_chunks  # zero chunks still match
    assert (tmp_path / "b.img").read_bytes() == V2


def _install_with_cache(
    tmp_path: Path, v2: Release, *, corrupt: ChunkEntry | None = None
) -> tuple[InstallPlan, InstallResult, FakeHub, list[tuple[bytes, bytes]], set[bytes]]:
    """Install v2 with every third distinct non-zero chunk in the cache (in reverse order)."""
    zero = {hashlib.sha256(bytes(e.length)).digest() for e in v2.entries}
    wanted = {e.digest: e for e in v2.entries if e.digest not in zero}
    kept = list(wanted.values())[::3]
    with ChunkCache.open(tmp_path / "cache", 4 << 20) as cache:
        for e in reversed(kept):
            cache.add(e.digest, V2[e.offset : e.offset + e.length])
        if corrupt is not None:
            with open(tmp_path / "cache" / "data", "r+b") as f:
                f.seek(cache.chunks[corrupt.digest][0] + corrupt.length // 2)
                byte = f.read(1)
                f.seek(-1, io.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0x20]))
        plan = make_plan(v2.entries, {}, cached=cache.chunks, max_gap_bytes=0)
        hub = FakeHub(v2.pack)
        fetched: list[tuple[bytes, bytes]] = []
        slot = open_for_install(slot_cfg(tmp_path / "b.img", "B"), plan.size)
        try:
            result = apply_plan(
                plan,
                fetch_ranges=hub,
                slot=slot,
                seed=None,
                journal=InstallJournal(tmp_path / "j", install_id("x")),
                cache=cache.reader(),
                on_fetched=lambda digest, data: fetched.append((digest, data)),
            )
        finally:
            slot.close()
    return plan, result, hub, fetched, {e.digest for e in kept}


def test_cached_chunks_are_copied_and_only_the_rest_fetched(tmp_path: Path, v2: Release) -> None:
    plan, result, hub, fetched, kept = _install_with_cache(tmp_path, v2)
    assert (tmp_path / "b.img").read_bytes() == V2
    cached_steps = plan.steps_from(Source.CACHE)
    assert {s.entry.digest for s in cached_steps} == kept
    assert result.cache_chunks == len(cached_steps) == plan.totals.cache_chunks > 0
    assert result.cache_bytes == plan.totals.cache_bytes
    assert result.stale_cache_chunks == 0
    assert not ordinals_in(v2, hub.asked) & {s.ordinal for s in cached_steps}
    # on_fetched saw exactly the chunks fetched, decoded, in target order.
    assert fetched == [
        (s.entry.digest, V2[s.entry.offset : s.entry.offset + s.entry.length])
        for s in plan.steps_from(Source.PACK)
    ]
    assert result.fetched_chunks == len(fetched)


def test_a_corrupt_cached_chunk_is_fetched_instead(tmp_path: Path, v2: Release) -> None:
    clean = _install_with_cache(tmp_path / "clean", v2)[0]
    victim_step = clean.steps_from(Source.CACHE)[1]
    victim = victim_step.entry
    plan, result, hub, fetched, _ = _install_with_cache(tmp_path / "bad", v2, corrupt=victim)
    assert (tmp_path / "bad" / "b.img").read_bytes() == V2
    assert result.stale_cache_chunks == 1
    assert result.cache_chunks == plan.totals.cache_chunks - 1
    assert result.cache_bytes == plan.totals.cache_bytes - victim.length
    wanted = [s.entry.digest for s in plan.steps_from(Source.PACK)]
    assert sorted(d for d, _ in fetched) == sorted([*wanted, victim.digest])
    assert victim_step.ordinal in ordinals_in(v2, hub.asked)


def test_hub_answering_other_ranges_is_refused(tmp_path: Path, v2: Release) -> None:
    def liar(ranges: Sequence[ByteRange]) -> Iterator[tuple[ByteRange, bytes]]:
        r = ranges[0]
        yield ByteRange(r.start + 1, r.end), v2.pack[r.start + 1 : r.end]

    with pytest.raises(InstallError, match="not asked for"):
        run(tmp_path, v2, liar)  # type: ignore[arg-type]


def test_readback_mismatch_resets_the_journal(tmp_path: Path, v2: Release) -> None:
    class ForgetfulSlot:
        """Drops one write silently, as failing flash may."""

        def __init__(self, inner: SlotDevice, drop_offset: int) -> None:
            self.inner = inner
            self.drop_offset = drop_offset

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def write_at(self, offset: int, data: bytes | memoryview) -> None:
            if offset != self.drop_offset:
                self.inner.write_at(offset, data)

    journal = InstallJournal(tmp_path / "j", install_id("x"))
    plan = make_plan(v2.entries, {})
    inner = open_for_install(slot_cfg(tmp_path / "b.img", "B"), plan.size)
    try:
        with pytest.raises(SlotVerifyError, match="after writing"):
            apply_plan(
                plan,
                fetch_ranges=FakeHub(v2.pack),
                slot=ForgetfulSlot(inner, v2.entries[4].offset),  # type: ignore[arg-type]
                seed=None,
                journal=journal,
                on_progress=None,
            )
    finally:
        inner.close()
    assert len(InstallJournal(tmp_path / "j", install_id("x")).verified) == 0


def test_a_stale_chunk_inside_a_seed_run_is_fetched_alone(tmp_path: Path, v2: Release) -> None:
    # Seed chunks that are neighbours are copied as one run; each is still checked on its own.
    seed = seed_index(io.BytesIO(V1), v2.payload.chunking, len(V1))
    plan = make_plan(v2.entries, seed)
    seeds = plan.steps_from(Source.SEED)
    victim = next(
        s
        for a, s, b in zip(seeds, seeds[1:], seeds[2:], strict=False)
        if a.source_offset + a.entry.length == s.source_offset
        and s.source_offset + s.entry.length == b.source_offset
        and a.entry.offset + a.entry.length == s.entry.offset
    )
    stale_image = bytearray(V1)
    stale_image[victim.source_offset + 1] ^= 0xFF
    (tmp_path / "a.img").write_bytes(stale_image)
    hub = FakeHub(v2.pack)
    journal = InstallJournal(tmp_path / "j", install_id("x"))
    slot = open_for_install(slot_cfg(tmp_path / "b.img", "B"), plan.size)
    seed_dev = open_for_reading(slot_cfg(tmp_path / "a.img", "A"))
    try:
        result = apply_plan(
            plan, fetch_ranges=hub, slot=slot, seed=seed_dev, journal=journal, on_progress=None
        )
    finally:
        slot.close()
        seed_dev.close()
    assert result.stale_seed_chunks == 1
    assert victim.ordinal in ordinals_in(v2, hub.asked)
    assert (tmp_path / "b.img").read_bytes() == V2


def test_zero_chunks_are_written_without_reading_and_checked_on_read_back(
    tmp_path: Path, signer: CryptoSigner
) -> None:
    image = V1[:100_000] + bytes(300_000) + V1[100_000:200_000] + bytes(200_000)
    release = release_of(signer, image)
    zero_digests = {hashlib.sha256(bytes(e.length)).digest() for e in release.entries}
    zero_chunks = [e for e in release.entries if e.digest in zero_digests]
    assert len(zero_chunks) >= 4  # the zero stretches repeat a chunk of zeros
    hub = FakeHub(release.pack)
    (tmp_path / "b.img").write_bytes(b"\xaa" * len(image))  # whatever the slot held before
    plan, _ = run(tmp_path, release, hub)
    assert (tmp_path / "b.img").read_bytes() == image
    # Repeats of the zero chunk are copies within the target, written from memory.
    assert plan.totals.target_copy_chunks >= len(zero_chunks) - 2

    # A zero chunk that reads back with a non-zero byte fails the read-back.
    class Flipping:
        def __init__(self, inner: SlotDevice, at: int) -> None:
            self.inner, self.at = inner, at

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def read_range(self, offset: int, length: int) -> bytes:
            data = bytearray(self.inner.read_range(offset, length))
            if offset <= self.at < offset + length:
                data[self.at - offset] = 1
            return bytes(data)

    journal = InstallJournal(tmp_path / "j2", install_id("y"))
    plan = make_plan(release.entries, {})
    inner = open_for_install(slot_cfg(tmp_path / "c.img", "B"), plan.size)
    try:
        with pytest.raises(SlotVerifyError, match=f"offset {zero_chunks[-1].offset}"):
            apply_plan(
                plan,
                fetch_ranges=FakeHub(release.pack),
                slot=Flipping(inner, zero_chunks[-1].offset + 7),  # type: ignore[arg-type]
                seed=None,
                journal=journal,
                on_progress=None,
            )
    finally:
        inner.close()


def _zero_digests_by_set(entries: list[ChunkEntry]) -> frozenset[bytes]:
    """The rule zero_digests keeps: the zero digests of the lengths of repeated digests."""
    seen: set[bytes] = set()
    lengths: set[int] = set()
    for e in entries:
        if e.digest in seen:
            lengths.add(e.length)
        seen.add(e.digest)
    return frozenset(hashlib.sha256(bytes(n)).digest() for n in lengths)


def _entry(length: int, digest: bytes) -> ChunkEntry:
    return ChunkEntry(0, length, length, 0, digest)


def _zero(n: int) -> bytes:
    return hashlib.sha256(bytes(n)).digest()


# Digests alike in their first 8 bytes meet in zero_digests' bitmap without repeating.
_ALIKE = [bytes(8) + bytes([i]) * 24 for i in range(1, 4)]

ZERO_CASES = [
    ("nothing", []),
    ("a zero chunk once is no candidate", [_entry(100, _zero(100))]),
    ("zeros repeated", [_entry(100, _zero(100)), _entry(7, b"x" * 32), _entry(100, _zero(100))]),
    ("two lengths", [_entry(n, _zero(n)) for n in (100, 200, 100, 300, 200)]),
    ("another chunk repeated", [_entry(50, b"y" * 32), _entry(50, b"y" * 32)]),
    ("alike, never repeated", [_entry(10 * (i + 1), d) for i, d in enumerate(_ALIKE)]),
    (
        "alike, one repeated",
        [_entry(10, _ALIKE[0]), _entry(20, _ALIKE[1]), _entry(30, _ALIKE[1])],
    ),
    (
        "an ext4-like image",
        [_entry(4096, _zero(4096) if i % 4 else bytes([i % 251]) * 32) for i in range(3000)],
    ),
]


@pytest.mark.parametrize("entries", [c[1] for c in ZERO_CASES], ids=[c[0] for c in ZERO_CASES])
def test_zero_digests_are_those_of_the_lengths_of_repeated_digests(
    entries: list[ChunkEntry],
) -> None:
    expected = _zero_digests_by_set(entries)
    assert zero_digests(entries) == expected
    assert zero_digests(PackedEntries(entries)) == expected
