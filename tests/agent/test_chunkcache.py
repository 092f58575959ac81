"""The local chunk cache on real files: round trip, bounds, modes, and malformed caches."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from skylift.agent.chunkcache import CACHE_DIR, ChunkCache, clear_cache
from skylift.agent.slots import SlotError
from skylift.chunks import MAX_CHUNK_BYTES

RECORD = struct.Struct(">32sQI")


def chunk(n: int, length: int = 1000) -> tuple[bytes, bytes]:
    data = bytes([n % 256]) * length + n.to_bytes(4, "big")
    return hashlib.sha256(data).digest(), data


def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / CACHE_DIR


def filled(tmp_path: Path, count: int = 3, max_bytes: int = 1 << 20) -> list[tuple[bytes, bytes]]:
    chunks = [chunk(i) for i in range(count)]
    with ChunkCache.open(cache_dir(tmp_path), max_bytes) as cache:
        for digest, data in chunks:
            cache.add(digest, data)
    return chunks


def test_added_chunks_are_found_and_read_back_after_reopening(tmp_path: Path) -> None:
    chunks = filled(tmp_path)
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        assert set(cache.chunks) == {d for d, _ in chunks}
        reader = cache.reader()
        for digest, data in chunks:
            offset, length = cache.chunks[digest]
            assert length == len(data)
            assert reader.read_range(offset, length) == data
        assert reader.size() == sum(len(d) for _, d in chunks)
        with pytest.raises(SlotError):
            reader.write_at(0, b"x")


def test_a_chunk_already_cached_is_not_appended_again(tmp_path: Path) -> None:
    digest, data = chunk(1)
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        cache.add(digest, data)
        cache.add(digest, data)
        assert cache.data_bytes == len(data)
    assert (cache_dir(tmp_path) / "data").stat().st_size == len(data)
    assert (cache_dir(tmp_path) / "index").stat().st_size == RECORD.size


def test_appending_stops_at_max_bytes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="skylift.agent")
    chunks = [chunk(i) for i in range(5)]  # 1004 bytes each
    with ChunkCache.open(cache_dir(tmp_path), 3500) as cache:
        for digest, data in chunks:
            cache.add(digest, data)
        assert set(cache.chunks) == {d for d, _ in chunks[:3]}
    assert (cache_dir(tmp_path) / "data").stat().st_size == 3 * 1004
    assert sum("chunk cache is full" in r.message for r in caplog.records) == 1


def test_files_are_0600_in_a_0700_directory(tmp_path: Path) -> None:
    filled(tmp_path)
    directory = cache_dir(tmp_path)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("data", "index"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600


def test_clear_empties_the_cache_and_the_files(tmp_path: Path) -> None:
    filled(tmp_path)
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        cache.clear()
        assert not cache.chunks
        digest, data = chunk(9)
        cache.add(digest, data)  # appends from the start again
        assert cache.chunks[digest] == (0, len(data))
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        assert list(cache.chunks) == [digest]
    clear_cache(cache_dir(tmp_path))
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        assert not cache.chunks


def test_clear_cache_creates_nothing(tmp_path: Path) -> None:
    clear_cache(cache_dir(tmp_path))
    assert not (tmp_path / "state").exists()


def _truncate_index(d: Path) -> None:
    with open(d / "index", "r+b") as f:
        f.truncate(RECORD.size * 2 + 7)


def test_a_torn_last_record_is_dropped_and_the_others_kept(tmp_path: Path) -> None:
    # A power cut while the third record was appended: 7 of its bytes made it.
    chunks = filled(tmp_path)
    _truncate_index(cache_dir(tmp_path))
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        assert set(cache.chunks) == {chunks[0][0], chunks[1][0]}
        digest, data = chunk(9)
        cache.add(digest, data)
    # The torn bytes were cut off: the record added after them is read back whole.
    assert (cache_dir(tmp_path) / "index").stat().st_size == RECORD.size * 3
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        assert set(cache.chunks) == {chunks[0][0], chunks[1][0], digest}
        assert cache.reader().read_range(*cache.chunks[digest]) == data


def _index_too_large(d: Path) -> None:
    (d / "index").write_bytes(bytes(RECORD.size * 2000))  # more records than 64 KiB allows


def _data_too_large(d: Path) -> None:
    with open(d / "data", "r+b") as f:
        f.truncate(65 * 1024)


MALFORMED: list[tuple[str, Callable[[Path], None]]] = [
    ("index beyond the bound", _index_too_large),
    ("data beyond the bound", _data_too_large),
]


@pytest.mark.parametrize("damage", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_cache_is_discarded_and_starts_empty(
    tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    filled(tmp_path, max_bytes=64 * 1024)
    damage(cache_dir(tmp_path))
    with ChunkCache.open(cache_dir(tmp_path), 64 * 1024) as cache:
        assert not cache.chunks
        digest, data = chunk(7)
        cache.add(digest, data)  # and works again
        assert cache.reader().read_range(*cache.chunks[digest]) == data
    assert sum("discarded" in r.message for r in caplog.records) == 1


def _beyond_data(records: list[tuple[bytes, int, int]]) -> None:
    digest, offset, length = records[1]
    records[1] = (digest, offset + 10_000, length)


def _zero_length(records: list[tuple[bytes, int, int]]) -> None:
    records[1] = (records[1][0], records[1][1], 0)


def _absurd_length(records: list[tuple[bytes, int, int]]) -> None:
    records[1] = (records[1][0], 0, MAX_CHUNK_BYTES + 1)


BAD_RECORDS: list[tuple[str, Callable[[list[tuple[bytes, int, int]]], None]]] = [
    ("beyond the data file", _beyond_data),
    ("length 0", _zero_length),
    ("longer than any chunk", _absurd_length),
]


@pytest.mark.parametrize("spoil", [c[1] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_bad_records_are_dropped_and_the_rest_kept(
    tmp_path: Path, spoil: Callable[[list[tuple[bytes, int, int]]], None]
) -> None:
    chunks = filled(tmp_path)
    index = cache_dir(tmp_path) / "index"
    records = list(RECORD.iter_unpack(index.read_bytes()))
    spoil(records)
    index.write_bytes(b"".join(RECORD.pack(*r) for r in records))
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        assert set(cache.chunks) == {chunks[0][0], chunks[2][0]}
        digest, data = chunk(8)
        cache.add(digest, data)
    # The index was rewritten without the bad record: the new one is found after reopening.
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        assert set(cache.chunks) == {chunks[0][0], chunks[2][0], digest}
        assert cache.reader().read_range(*cache.chunks[digest]) == data


def test_torn_bytes_read_as_they_are_and_missing_bytes_as_zeros(tmp_path: Path) -> None:
    # A power cut after the record but before its bytes: the executor's hash catches it.
    chunks = filled(tmp_path)
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        offset, length = cache.chunks[chunks[2][0]]
        os.truncate(cache_dir(tmp_path) / "data", offset + 10)
        got = cache.reader().read_range(offset, length)
    assert len(got) == length
    assert got[:10] == chunks[2][1][:10] and got[10:] == bytes(length - 10)
    assert hashlib.sha256(got).digest() != chunks[2][0]


def test_chunks_too_small_to_keep_are_left_out(tmp_path: Path) -> None:
    data = b"tail"
    with ChunkCache.open(cache_dir(tmp_path), 1 << 20) as cache:
        cache.add(hashlib.sha256(data).digest(), data)
        assert not cache.chunks
