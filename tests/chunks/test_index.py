"""The chunk index: page chains verify page by page and refuse any change."""

from __future__ import annotations

import hashlib
import io
import os
import random

import pytest
import zstandard

from bundle.conftest import realistic_payload  # tests/ is on sys.path under pytest
from skylift.chunks import (
    CODEC_NONE,
    CODEC_ZSTD,
    ChunkDataError,
    ChunkEntry,
    ChunkingParams,
    IndexBuilder,
    IndexCorruptError,
    IndexTotalsError,
    PackedEntries,
    PageChainVerifier,
    decode_chunk,
    encode_chunk,
    iter_chunks,
)
from skylift.chunks.index import PAGE_HEADER_SIZE, parse_page_header


def _builder(n: int, per_page: int = 3) -> IndexBuilder:
    b = IndexBuilder(entries_per_page=per_page)
    for i in range(n):
        data = i.to_bytes(4, "big") * 100
        b.add(len(data), CODEC_NONE, hashlib.sha256(data).digest(), data)
    return b


def _verify_all(
    b: IndexBuilder, pages: list[bytes], trusted: bytes | None = None
) -> list[ChunkEntry]:
    """Walk ``pages`` from ``trusted`` (the digest a signed manifest would carry)."""
    first = trusted or IndexBuilder.first_digest(b.pages())
    v = PageChainVerifier(first, chunks=b.count, payload_length=b.payload_length)
    out = []
    for p in pages:
        out += v.accept(p).entries
    assert v.done
    return out


@pytest.mark.parametrize(("n", "pages"), [(0, 1), (1, 1), (3, 1), (4, 2), (6, 2), (7, 3)])
def test_pages_chain_and_carry_offsets(n: int, pages: int) -> None:
    b = _builder(n)
    built = b.pages()
    assert len(built) == pages
    entries = _verify_all(b, built)
    assert entries == list(b.entries())
    assert [e.offset for e in entries] == [i * 400 for i in range(n)]


def test_pages_carry_the_digest_of_their_stored_chunks() -> None:
    b = _builder(5)
    first = IndexBuilder.first_digest(b.pages())
    v = PageChainVerifier(first, chunks=5, payload_length=b.payload_length)
    stored = [i.to_bytes(4, "big") * 100 for i in range(5)]
    pages = [v.accept(p) for p in b.pages()]
    assert [p.stored_sha256 for p in pages] == [
        hashlib.sha256(b"".join(stored[0:3])).digest(),
        hashlib.sha256(b"".join(stored[3:5])).digest(),
    ]


def test_every_flipped_byte_in_any_page_is_refused() -> None:
    b = _builder(7)
    pages = b.pages()
    for p_index, page in enumerate(pages):
        for i in range(len(page)):
            bad = bytearray(page)
            bad[i] ^= 0x01
            tampered = [*pages[:p_index], bytes(bad), *pages[p_index + 1 :]]
            with pytest.raises(IndexCorruptError):
                _verify_all(b, tampered)


def test_swapped_or_dropped_or_extra_pages_are_refused() -> None:
    b = _builder(7)
    p = b.pages()
    for tampered in ([p[1], p[0], p[2]], [p[0], p[2]], [*p, p[2]]):
        with pytest.raises(IndexCorruptError):
            _verify_all(b, tampered)


def test_more_bytes_than_declared_is_an_overflow() -> None:
    b = _builder(4)
    pages = b.pages()
    v = PageChainVerifier(
        IndexBuilder.first_digest(pages), chunks=b.count, payload_length=b.payload_length - 1
    )
    with pytest.raises(IndexTotalsError, match="more bytes"):
        for page in pages:
            v.accept(page)


def test_fewer_chunks_than_declared_is_refused() -> None:
    b = _builder(4)
    pages = b.pages()
    v = PageChainVerifier(IndexBuilder.first_digest(pages), chunks=5, payload_length=10**6)
    with pytest.raises(IndexCorruptError, match="ends before"):
        for page in pages:
            v.accept(page)


def test_page_header_bounds_the_entry_count() -> None:
    page = _builder(3).pages()[0]
    assert parse_page_header(page[:PAGE_HEADER_SIZE], max_entries=3) == 3 * 41
    assert PAGE_HEADER_SIZE == 72
    with pytest.raises(IndexCorruptError, match="more than 2"):
        parse_page_header(page[:PAGE_HEADER_SIZE], max_entries=2)
    with pytest.raises(IndexCorruptError, match="magic"):
        parse_page_header(b"XXXX" + page[4:PAGE_HEADER_SIZE], max_entries=3)


def test_builder_refuses_impossible_entries() -> None:
    b = IndexBuilder()
    for args in [
        (0, 0, bytes(32), b"x"),
        (10, 9, bytes(32), b"x" * 10),
        (10, 0, bytes(31), b"x" * 10),
        (10, 0, bytes(32), b"x" * 9),
    ]:
        with pytest.raises(ValueError, match="invalid chunk entry"):
            b.add(*args)


@pytest.fixture
def zstd_pair() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    return zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()


def test_encode_keeps_incompressible_chunks_raw(zstd_pair) -> None:  # type: ignore[no-untyped-def]
    c, d = zstd_pair
    noise = os.urandom(5000)
    assert encode_chunk(noise, c) == (CODEC_NONE, noise)
    codec, stored = encode_chunk(bytes(5000), c)
    assert codec == CODEC_ZSTD and len(stored) < 100
    entry = ChunkEntry(0, 5000, len(stored), codec, hashlib.sha256(bytes(5000)).digest())
    assert decode_chunk(entry, stored, d) == bytes(5000)


def test_decode_refuses_a_frame_that_claims_another_size(zstd_pair) -> None:  # type: ignore[no-untyped-def]
    c, d = zstd_pair
    big = c.compress(bytes(10_000_000))  # a small frame that would inflate to 10 MB
    entry = ChunkEntry(0, 5000, len(big), CODEC_ZSTD, hashlib.sha256(bytes(5000)).digest())
    with pytest.raises(ChunkDataError, match="wrong size"):
        decode_chunk(entry, big, d)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s[:-1], "stored length"),
        (lambda s: b"\x00" + s[1:], "not a zstd frame"),
        (lambda s: s[:-4] + bytes(4), "corrupt|digest"),
    ],
)
def test_decode_refuses_damaged_chunks(zstd_pair, mutate, message) -> None:  # type: ignore[no-untyped-def]
    c, d = zstd_pair
    data = b"hello world " * 500
    codec, stored = encode_chunk(data, c)
    entry = ChunkEntry(0, len(data), len(stored), codec, hashlib.sha256(data).digest())
    bad = mutate(stored)
    if len(bad) == len(stored):
        entry = ChunkEntry(0, len(data), len(bad), codec, entry.digest)
    with pytest.raises(ChunkDataError, match=message):
        decode_chunk(entry, bad, d)


def test_decode_refuses_bytes_after_the_frame(zstd_pair) -> None:  # type: ignore[no-untyped-def]
    """Only one stored form per chunk: zstd would ignore what follows the frame."""
    c, d = zstd_pair
    data = b"hello world " * 500
    codec, stored = encode_chunk(data, c)
    padded = stored + b"junk"
    entry = ChunkEntry(0, len(data), len(padded), codec, hashlib.sha256(data).digest())
    with pytest.raises(ChunkDataError, match="exactly one zstd frame"):
        decode_chunk(entry, padded, d)


def test_decode_refuses_a_wrong_digest(zstd_pair) -> None:  # type: ignore[no-untyped-def]
    _, d = zstd_pair
    data = os.urandom(1000)
    entry = ChunkEntry(0, 1000, 1000, CODEC_NONE, hashlib.sha256(data + b"x").digest())
    with pytest.raises(ChunkDataError, match="digest mismatch"):
        decode_chunk(entry, data, d)


# -- PackedEntries: the agent's form of a verified index ---------------------------------


def _real_index() -> tuple[IndexBuilder, list[bytes]]:
    """An index as the bundle writer makes it: CDC chunks, zstd where it helps, a repeat."""
    image = realistic_payload(300_000, seed=3)
    noise = random.Random(5).randbytes(40_000)  # stored raw
    image = image + noise + bytes(64 * 1024) + image[:50_000]  # zeros, chunks seen before
    compressor = zstandard.ZstdCompressor(level=3)
    b = IndexBuilder(entries_per_page=16)
    for chunk in iter_chunks(io.BytesIO(image), ChunkingParams.cdc(4096)):
        codec, stored = encode_chunk(chunk, compressor)
        b.add(len(chunk), codec, hashlib.sha256(chunk).digest(), stored)
    return b, b.pages()


def _fields(e: ChunkEntry) -> tuple[int, int, int, int, bytes]:
    return e.offset, e.length, e.stored_length, e.codec, e.digest


def test_packed_entries_yield_what_the_list_of_a_real_index_holds() -> None:
    b, pages = _real_index()
    listed = _verify_all(b, pages)
    v = PageChainVerifier(
        IndexBuilder.first_digest(pages), chunks=b.count, payload_length=b.payload_length
    )
    packed = PackedEntries()
    for page in pages:
        packed.extend(v.accept(page).entries)
    # The case is one where mixing up two fields would show.
    assert len(listed) > 20
    assert {e.codec for e in listed} == {CODEC_NONE, CODEC_ZSTD}
    assert any(e.stored_length != e.length for e in listed)
    assert len({e.digest for e in listed}) < len(listed)

    assert len(packed) == len(listed)
    assert list(packed) == listed
    assert [packed[i] for i in range(len(listed))] == listed
    assert [packed[-i] for i in range(1, len(listed) + 1)] == listed[::-1]
    assert list(packed.iter_fields()) == [_fields(e) for e in listed]
    for i, e in enumerate(listed):
        j = i - len(listed) if i % 2 else i  # negative indices too
        got = (
            packed.offset(j),
            packed.length(j),
            packed.stored_length(j),
            packed.codec(j),
            packed.digest(j),
        )
        assert got == _fields(e)
    assert set(packed.digest_table()) == {e.digest for e in listed}
    assert packed.total_length() == b.payload_length
    assert PackedEntries(listed) == packed
    assert PackedEntries(listed[:-1]) != packed


@pytest.mark.parametrize(
    "part",
    [
        slice(None),
        slice(3, 17),
        slice(-5, None),
        slice(None, -7),
        slice(2, 40, 3),
        slice(None, None, -1),
        slice(30, 4, -4),
        slice(10, 3),
        slice(500, 900),
    ],
)
def test_packed_entries_slice_as_a_list_does(part: slice) -> None:
    b, pages = _real_index()
    listed = _verify_all(b, pages)
    packed = PackedEntries(listed)
    cut = packed[part]
    assert isinstance(cut, PackedEntries)
    assert list(cut) == listed[part]
    assert [cut.digest(i) for i in range(len(cut))] == [e.digest for e in listed[part]]


def test_packed_entries_bounds_are_index_errors() -> None:
    listed = list(_builder(5).entries())
    packed = PackedEntries(listed)
    for i in (5, 6, -6, 1 << 70):
        with pytest.raises(IndexError):
            packed[i]
        for accessor in (packed.offset, packed.length, packed.stored_length, packed.codec):
            with pytest.raises(IndexError):
                accessor(i)
        with pytest.raises(IndexError):
            packed.digest(i)
    assert packed[-5] == listed[0]
    empty = PackedEntries()
    assert len(empty) == 0
    assert list(empty) == []
    assert empty.total_length() == 0
    assert len(empty.digest_table()) == 0
    with pytest.raises(IndexError):
        empty[0]
    with pytest.raises(TypeError):
        packed["1"]  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (ChunkEntry(0, 10, 10, CODEC_NONE, bytes(31)), ValueError),
        (ChunkEntry(-1, 10, 10, CODEC_NONE, bytes(32)), OverflowError),
        (ChunkEntry(1 << 64, 10, 10, CODEC_NONE, bytes(32)), OverflowError),
        (ChunkEntry(0, 1 << 32, 10, CODEC_NONE, bytes(32)), OverflowError),
        (ChunkEntry(0, 10, 1 << 32, CODEC_NONE, bytes(32)), OverflowError),
        (ChunkEntry(0, 10, 10, 256, bytes(32)), ValueError),
    ],
)
def test_packed_entries_refuse_what_does_not_fit_and_stay_whole(
    bad: ChunkEntry, error: type[Exception]
) -> None:
    listed = list(_builder(3).entries())
    packed = PackedEntries(listed)
    with pytest.raises(error):
        packed.append(bad)
    packed.append(listed[0])  # the columns still line up
    assert list(packed) == [*listed, listed[0]]
