"""The install plan: seed copies, fetches coalesced into few ranges, resume skips verified chunks."""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import replace

import pytest

from bundle.conftest import build, realistic_payload  # tests/ is on sys.path under pytest
from skylift.agent.journal import OrdinalRanges
from skylift.agent.plan import (
    ByteRange,
    ChunkStep,
    FetchRequest,
    PlanError,
    PlanSteps,
    Source,
    coalesce,
    held_in_place,
    make_plan,
    pack_offsets,
    seed_index,
)
from skylift.agent.updater import verify_index
from skylift.bundle import ChunkData, IndexPageData, PayloadEntry, TrustedKeys, read_body, read_head
from skylift.chunks import DEFAULT_CDC, ChunkEntry, ChunkingParams, PackedEntries, iter_chunks
from skylift.trust.keys import generate_private_key, signer_for

PARAMS = ChunkingParams.cdc(16 * 1024)


def index_of(image: bytes, params: ChunkingParams = PARAMS) -> tuple[list[ChunkEntry], list[int]]:
    """Entries (stored raw, codec 0) and pack offsets, as the hub would serve them."""
    entries: list[ChunkEntry] = []
    offsets = [0]
    offset = 0
    for chunk in iter_chunks(io.BytesIO(image), params):
        entries.append(
            ChunkEntry(offset, len(chunk), len(chunk), 0, hashlib.sha256(chunk).digest())
        )
        offset += len(chunk)
        offsets.append(offsets[-1] + 1 + len(chunk))
    return entries, offsets


V1 = realistic_payload(1_500_000, seed=11)
# v2: a few bytes changed in two places, and 3000 bytes inserted: most chunks survive.
V2 = V1[:300_000] + b"patched!" + V1[300_008:900_000] + bytes(range(256)) * 12 + V1[900_000:]


def test_seeded_plan_downloads_only_the_changed_chunks() -> None:
    entries, _offsets = index_of(V2)
    seed = seed_index(io.BytesIO(V1), PARAMS, len(V1))
    plan = make_plan(entries, seed)
    v1_digests = {e.digest for e in index_of(V1)[0]}
    fetched = [s for s in plan.steps if s.source is Source.PACK]
    assert fetched, "the patched regions cannot come from the seed"
    assert all(s.entry.digest not in v1_digests for s in fetched)
    for s in plan.steps_from(Source.SEED):
        off, length = seed[s.entry.digest]
        assert s.source_offset == off
        assert hashlib.sha256(V1[off : off + length]).digest() == s.entry.digest
    t = plan.totals
    assert t.chunks == len(entries) == len(plan.steps)
    assert t.seed_bytes + t.target_copy_bytes + t.fetch_bytes == len(V2) == plan.size
    assert t.fetch_bytes < len(V2) // 5
    assert t.download_bytes < len(V2) // 5
    assert t.requests == 1


def test_seed_index_keeps_the_first_of_repeated_chunks_whatever_the_wanted_form() -> None:
    image = realistic_payload(200_000, seed=5) + bytes(40_960) + realistic_payload(9000, seed=6)
    entries, _offsets = index_of(image, ChunkingParams.fixed(4096))
    packed = PackedEntries(entries)
    zero = hashlib.sha256(bytes(4096)).digest()
    by_table = seed_index(io.BytesIO(image), ChunkingParams.fixed(4096), len(image),
                          wanted=packed.digest_table())  # fmt: skip
    by_set = seed_index(io.BytesIO(image), ChunkingParams.fixed(4096), len(image),
                        wanted={e.digest for e in entries})  # fmt: skip
    assert by_table == by_set == {e.digest: (e.offset, e.length) for e in reversed(entries)}
    assert len(by_table) == len(packed.digest_table()) < len(entries)  # the zeros, once
    first_zero = next(e.offset for e in entries if e.digest == zero)
    assert by_table[zero] == (first_zero, 4096) and by_table.get(zero) == (first_zero, 4096)
    missing = hashlib.sha256(b"not in the image").digest()
    assert missing not in by_table and by_table.get(missing) is None
    with pytest.raises(KeyError):
        by_table[missing]


def test_unseeded_plan_fetches_everything_once_and_copies_repeats() -> None:
    image = realistic_payload(400_000, seed=3) + bytes(300_000)  # zero chunks repeat
    entries, _offsets = index_of(image, ChunkingParams.fixed(4096))
    plan = make_plan(entries, {})
    fetched = plan.steps_from(Source.PACK)
    repeats = plan.steps_from(Source.TARGET)
    assert repeats, "repeated zero blocks are copied within the target"
    assert len({s.entry.digest for s in fetched}) == len(fetched)  # each content fetched once
    for s in repeats:
        first = next(f for f in fetched if f.entry.digest == s.entry.digest)
        assert s.source_offset == first.entry.offset < s.entry.offset
    assert plan.totals.seed_chunks == 0
    assert plan.totals.fetch_chunks + plan.totals.target_copy_chunks == len(entries)


def test_seed_is_cut_with_the_payloads_parameters_only_up_to_length() -> None:
    seed = seed_index(io.BytesIO(V1 + b"junk after the image"), PARAMS, len(V1))
    assert seed == {
        e.digest: (e.offset, e.length) for e in reversed(index_of(V1)[0])
    }  # first occurrence of each digest wins
    wanted = {e.digest for e in index_of(V1)[0][:3]}
    assert set(seed_index(io.BytesIO(V1), PARAMS, len(V1), wanted=wanted)) == wanted
    # Other parameters cut elsewhere: almost nothing is shared.
    other = seed_index(io.BytesIO(V1), DEFAULT_CDC, len(V1))
    assert len(set(other) & set(seed)) <= 2


@pytest.mark.parametrize("params", [ChunkingParams.fixed(4096), PARAMS], ids=["fixed", "cdc"])
def test_held_in_place_finds_the_chunks_the_inactive_slot_already_holds(
    params: ChunkingParams,
) -> None:
    data = random.Random(4).randbytes(300_000) + bytes(300_000) + V1[:300_000]
    entries = PackedEntries(index_of(data, params)[0])
    n = len(entries)
    assert n > 10
    # Everything, in one span.
    assert held_in_place(io.BytesIO(data), entries) == [(0, n)]
    # A slot of zeros holds the chunks of zeros, and only those.
    zeros = [
        i for i, e in enumerate(entries) if e.digest == hashlib.sha256(bytes(e.length)).digest()
    ]
    assert zeros
    held = held_in_place(io.BytesIO(bytes(len(data))), entries)
    assert [i for start, end in held for i in range(start, end)] == zeros
    # A changed byte costs its chunk; a short slot holds what it has.
    changed = bytearray(data)
    k = n // 2
    changed[entries[k].offset + 5] ^= 1
    assert held_in_place(io.BytesIO(bytes(changed)), entries) == [(0, k), (k + 1, n)]
    cut = entries[n - 3].offset + 10
    assert held_in_place(io.BytesIO(data[:cut]), entries) == [(0, n - 3)]
    assert held_in_place(io.BytesIO(b""), entries) == []
    # Read through a stream that returns short reads, as pipes and slots may.
    assert held_in_place(_Trickle(data), entries) == [(0, n)]


class _Trickle:
    """A stream that returns at most 1000 bytes a read."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def readinto(self, b: memoryview, /) -> int:
        return self._f.readinto(memoryview(b)[:1000])


def test_held_in_place_takes_chunks_larger_than_its_buffer() -> None:
    big = ChunkingParams.fixed(2 * 1024 * 1024)
    data = random.Random(6).randbytes(5 * 1024 * 1024)
    entries = PackedEntries(index_of(data, big)[0])
    assert len(entries) == 3
    assert held_in_place(io.BytesIO(data), entries) == [(0, 3)]


def test_resume_skips_verified_chunks() -> None:
    entries, _offsets = index_of(V2)
    verified = set(range(0, len(entries), 2))
    plan = make_plan(entries, {}, verified=verified)
    assert {s.ordinal for s in plan.steps}.isdisjoint(verified)
    assert {s.ordinal for s in plan.steps} | verified == set(range(len(entries)))
    assert plan.totals.skipped_chunks == len(verified)
    for s in plan.steps_from(Source.PACK):
        assert any(
            r.start <= s.pack_range.start and s.pack_range.end <= r.end
            for req in plan.requests
            for r in req.ranges
        )
    full = make_plan(entries, {})
    assert plan.totals.fetch_bytes < full.totals.fetch_bytes


def test_cached_chunks_come_after_the_seed_and_before_everything_else() -> None:
    entries, _offsets = index_of(V2)
    seed = seed_index(io.BytesIO(V1), PARAMS, len(V1))
    fetched = make_plan(entries, seed).steps_from(Source.PACK)
    assert len(fetched) >= 2
    in_seed = next(e for e in entries if e.digest in seed)
    only_cached = fetched[0].entry
    cached = {
        in_seed.digest: (5_000, in_seed.length),
        only_cached.digest: (123, only_cached.length),
        fetched[1].entry.digest: (0, fetched[1].entry.length - 1),  # another length: not it
    }
    plan = make_plan(entries, seed, cached=cached)
    by_ordinal = {s.ordinal: s for s in plan.steps}
    steps = [s for s in plan.steps if s.entry.digest == in_seed.digest]
    assert steps and all(s.source is Source.SEED for s in steps)
    (from_cache,) = plan.steps_from(Source.CACHE)
    assert from_cache.entry == only_cached and from_cache.source_offset == 123
    assert by_ordinal[fetched[1].ordinal].source is Source.PACK
    # The cache wins over the pack, not over what is already in place.
    skipped = make_plan(entries, seed, cached=cached, verified={fetched[0].ordinal})
    assert not skipped.steps_from(Source.CACHE)
    t, before = plan.totals, make_plan(entries, seed).totals
    assert (t.cache_chunks, t.cache_bytes) == (1, only_cached.length)
    assert t.fetch_chunks == before.fetch_chunks - 1
    assert t.fetch_bytes == before.fetch_bytes - only_cached.length
    assert t.download_bytes < before.download_bytes
    assert t.seed_chunks == before.seed_chunks


def test_resume_rejects_ordinals_outside_the_index() -> None:
    entries, _offsets = index_of(V1[:100_000])
    with pytest.raises(PlanError, match="journal names chunks"):
        make_plan(entries, {}, verified={len(entries)})


def R(a: int, b: int) -> ByteRange:
    return ByteRange(a, b)


COALESCE = [
    ("adjacent merge", [R(0, 10), R(10, 20)], {}, [[R(0, 20)]]),
    ("small gap merged", [R(0, 10), R(100, 120)], {"max_gap_bytes": 90}, [[R(0, 120)]]),
    ("large gap kept", [R(0, 10), R(100, 120)], {"max_gap_bytes": 89}, [[R(0, 10), R(100, 120)]]),
    ("unsorted input", [R(100, 120), R(0, 10)], {"max_gap_bytes": 0}, [[R(0, 10), R(100, 120)]]),
    (
        "range size cap",
        [R(0, 10), R(10, 20), R(20, 30)],
        {"max_range_bytes": 20},
        [[R(0, 20), R(20, 30)]],
    ),
    ("oversized single range", [R(0, 50)], {"max_range_bytes": 20}, [[R(0, 50)]]),
    (
        "ranges per request",
        [R(i * 100, i * 100 + 10) for i in range(5)],
        {"max_gap_bytes": 0, "max_ranges_per_request": 2},
        [[R(0, 10), R(100, 110)], [R(200, 210), R(300, 310)], [R(400, 410)]],
    ),
    ("nothing", [], {}, []),
]


@pytest.mark.parametrize(
    ("ranges", "limits", "expected"), [c[1:] for c in COALESCE], ids=[c[0] for c in COALESCE]
)
def test_coalesce(
    ranges: list[ByteRange], limits: dict[str, int], expected: list[list[ByteRange]]
) -> None:
    assert coalesce(ranges, **limits) == [FetchRequest(tuple(r)) for r in expected]


def test_coalesce_refuses_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        coalesce([R(0, 10), R(5, 15)])


def test_scattered_changes_need_few_requests() -> None:
    entries, _offsets = index_of(V1)
    seed = {e.digest: (e.offset, e.length) for i, e in enumerate(entries) if i % 3}
    plan = make_plan(entries, seed, max_gap_bytes=64 * 1024, max_ranges_per_request=16)
    missing = len(entries) - len(seed)
    # Every third chunk is missing; gaps of two ~20 KiB chunks are merged.
    assert plan.totals.fetch_chunks >= missing - 1
    assert plan.totals.requests == 1
    assert len(plan.requests[0].ranges) < missing
    covered = [s.pack_range for s in plan.steps_from(Source.PACK)]
    for r in covered:
        assert any(q.start <= r.start and r.end <= q.end for q in plan.requests[0].ranges)


def test_pack_offsets_are_the_running_sum_of_the_chunk_objects() -> None:
    entries, offsets = index_of(V1[:200_000])
    assert list(pack_offsets(entries)) == offsets
    # Stored lengths, not lengths, decide: a compressed chunk moves every later start.
    squeezed = [entries[0], replace(entries[1], stored_length=10, codec=1), *entries[2:]]
    got = pack_offsets(squeezed)
    assert got[2] == offsets[1] + 1 + 10
    assert got[-1] == offsets[-1] - (entries[1].stored_length - 10)
    assert list(pack_offsets([])) == [0]
    plan = make_plan(squeezed, {})
    assert [s.pack_range.start for s in plan.steps] == list(got[:-1])


# -- the packed plan gives what the list form gave ----------------------------------------


def _list_form_steps(
    entries: list[ChunkEntry],
    seed: dict[bytes, tuple[int, int]],
    skipped: set[int],
    cached: dict[bytes, tuple[int, int]],
) -> list[ChunkStep]:
    """The steps as make_plan builds them, one object each (as before the plan was packed)."""
    offsets = [0]
    for e in entries:
        offsets.append(offsets[-1] + 1 + e.stored_length)
    steps: list[ChunkStep] = []
    first_in_target: dict[bytes, int] = {}
    for i, e in enumerate(entries):
        pack = ByteRange(offsets[i], offsets[i + 1])
        if i in skipped:
            first_in_target.setdefault(e.digest, e.offset)
            continue
        hit = seed.get(e.digest)
        kept = cached.get(e.digest)
        if hit is not None and hit[1] == e.length:
            steps.append(ChunkStep(i, e, Source.SEED, hit[0], pack))
        elif kept is not None and kept[1] == e.length:
            steps.append(ChunkStep(i, e, Source.CACHE, kept[0], pack))
        elif e.digest in first_in_target:
            steps.append(ChunkStep(i, e, Source.TARGET, first_in_target[e.digest], pack))
        else:
            steps.append(ChunkStep(i, e, Source.PACK, 0, pack))
            first_in_target[e.digest] = e.offset
    return steps


# v2, plus content v1 lacks, twice (copied within the target), and zeros.
NEW = random.Random(99).randbytes(120_000)
V3 = V2[:500_000] + NEW + V2[500_000:1_200_000] + NEW + bytes(50_000) + V2[1_200_000:]


@pytest.fixture(scope="module")
def real_v3() -> tuple[PayloadEntry, list[ChunkEntry], bytes]:
    """A real bundle of V3: its payload, its entries (from the chunks) and its index pages."""
    signer = signer_for(generate_private_key())
    stream = io.BytesIO(build([signer], {"rootfs": V3}, chunking=PARAMS))
    head = read_head(stream)
    head.verify(TrustedKeys((signer.public_key,)))
    entries: list[ChunkEntry] = []
    pages: list[bytes] = []
    for ev in read_body(stream, head):
        if isinstance(ev, ChunkData):
            entries.append(ev.entry)
        elif isinstance(ev, IndexPageData):
            pages.append(ev.page)
    return head.manifest.payloads[0], entries, b"".join(pages)


def test_the_updaters_index_is_packed_and_holds_the_bundles_entries(
    real_v3: tuple[PayloadEntry, list[ChunkEntry], bytes],
) -> None:
    payload, entries, pages = real_v3
    packed = verify_index(payload, pages)
    assert isinstance(packed, PackedEntries)
    assert list(packed) == entries
    assert packed == PackedEntries(entries)
    assert set(packed.digest_table()) == {e.digest for e in entries}
    assert pack_offsets(packed) == pack_offsets(entries)


def test_packed_steps_are_the_steps_of_the_list_form(
    real_v3: tuple[PayloadEntry, list[ChunkEntry], bytes],
) -> None:
    payload, entries, pages = real_v3
    seed = seed_index(io.BytesIO(V1), PARAMS, len(V1))
    skipped = {3, 4, 5, len(entries) - 1, *range(20, len(entries), 9)}
    # Every fifth chunk (some of them in the seed too), but no chunk of zeros; one length wrong.
    cached = {
        e.digest: (7 + 1000 * k, e.length)
        for k, e in enumerate(entries[::5])
        if e.digest != hashlib.sha256(bytes(e.length)).digest()
    }
    cached[entries[1].digest] = (0, entries[1].length + 1)
    expected = _list_form_steps(entries, seed, skipped, cached)
    # A case where a field mixed up would show: every source; ordinals that are not
    # positions; seed offsets that are not target offsets; pack ranges of compressed chunks.
    assert {s.source for s in expected} == set(Source)
    assert any(s.ordinal != k for k, s in enumerate(expected))
    assert any(s.source is Source.SEED and s.source_offset != s.entry.offset for s in expected)
    assert any(
        s.source is Source.TARGET and s.source_offset not in (0, s.entry.offset) for s in expected
    )
    assert any(s.entry.stored_length != s.entry.length for s in expected)

    verified = OrdinalRanges((i, i + 1) for i in skipped)  # as the journal hands it over
    for index in (verify_index(payload, pages), entries):
        plan = make_plan(index, seed, verified=verified, cached=cached)
        steps = plan.steps
        assert isinstance(steps, PlanSteps)
        assert len(steps) == len(expected)
        assert [(s.ordinal, s.source, s.source_offset, s.pack_range, s.entry) for s in steps] == [
            (s.ordinal, s.source, s.source_offset, s.pack_range, s.entry) for s in expected
        ]
        assert list(steps) == expected
        assert [steps[k] for k in range(len(expected))] == expected
        assert [steps[-k] for k in range(1, len(expected) + 1)] == expected[::-1]
        for part in (slice(2, 30), slice(-10, None), slice(None, None, -3), slice(5, 5)):
            assert list(steps[part]) == expected[part]
        with pytest.raises(IndexError):
            steps[len(expected)]
        with pytest.raises(IndexError):
            steps[-len(expected) - 1]
        for source in Source:
            chosen = [s for s in expected if s.source is source]
            assert plan.steps_from(source) == chosen
            assert list(steps.iter_from(source)) == chosen
            assert list(steps.select(source)) == chosen
            # The packed fields the installer walks say the same, and build the same steps.
            fields = list(steps.fields_from(source))
            assert fields == [
                (s.ordinal, s.entry.offset, s.entry.length, s.entry.digest, s.source_offset)
                for s in chosen
            ]
            assert [steps.step(f[0], source, f[4]) for f in fields] == chosen
        some_seeds = [s for s in expected if s.source is Source.SEED][::4]
        assert list(steps.select(Source.PACK, also=some_seeds)) == [
            s for s in expected if s.source is Source.PACK or s in some_seeds
        ]
        for k in (0, 7, len(expected) - 1):
            assert steps.index(expected[k]) == k
            assert expected[k] in steps
        moved = replace(expected[7], source_offset=expected[7].source_offset + 1)
        assert moved not in steps
        assert steps.pack_starts().tolist() == [s.pack_range.start for s in expected]
        assert list(plan.entries) == entries
        assert plan.size == len(V3)
        assert plan.skipped is verified

        t = plan.totals
        by = {src: [s.entry.length for s in expected if s.source is src] for src in Source}
        assert (t.seed_chunks, t.seed_bytes) == (len(by[Source.SEED]), sum(by[Source.SEED]))
        assert (t.target_copy_chunks, t.target_copy_bytes) == (
            len(by[Source.TARGET]),
            sum(by[Source.TARGET]),
        )
        assert (t.fetch_chunks, t.fetch_bytes) == (len(by[Source.PACK]), sum(by[Source.PACK]))
        assert (t.cache_chunks, t.cache_bytes) == (len(by[Source.CACHE]), sum(by[Source.CACHE]))
        assert (t.skipped_chunks, t.skipped_bytes) == (
            len(skipped),
            sum(entries[i].length for i in skipped),
        )
        assert t.chunks == len(entries)
        assert t.target_bytes == len(V3)
        requests = coalesce([s.pack_range for s in expected if s.source is Source.PACK])
        assert list(plan.requests) == requests
        assert t.requests == len(requests)
        assert t.download_bytes == sum(r.length for q in requests for r in q.ranges)
    assert (
        make_plan(entries, seed, cached=cached).steps
        == make_plan(PackedEntries(entries), seed, cached=cached).steps
    )
