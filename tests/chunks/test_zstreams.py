"""zlib deltas: payloads made of zlib streams travel as deltas of their inflated forms."""

from __future__ import annotations

import hashlib
import io
import lzma
import random
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from skylift import deltamaker
from skylift.chunks import ChunkingParams, zstreams
from skylift.chunks.delta import DeltaError
from skylift.chunks.zstreams import (
    HEADER_SIZE,
    InflatedView,
    Stream,
    deflate_pieces,
    encode_table,
    find_streams,
    parse_table,
    rebuild,
    reproducible,
    write_inflated,
)

PARAMS = ChunkingParams.cdc(16384)
_WORDS = [
    "".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=3 + i % 9)) for i in range(400)
]


def _text(rng: random.Random, n: int) -> bytes:
    """Compressible bytes, different for each seed (as files in a root filesystem)."""
    out = bytearray()
    while len(out) < n:
        out += rng.choice(_WORDS).encode() + rng.choice((b" ", b"\n", b"=", b"/"))
    return bytes(out[:n])


def _image(blocks: list[bytes], levels: list[int], *, gap: int = 0) -> tuple[bytes, list[int]]:
    """A block image as squashfs lays one out: a raw header, then zlib streams (offsets too)."""
    out = bytearray(b"hsqs" + bytes(92))
    offsets = []
    for i, (block, level) in enumerate(zip(blocks, levels, strict=True)):
        if gap and i % 3 == 2:
            out += bytes(range(gap % 256)) * (gap // 256 + 1)
        offsets.append(len(out))
        out += zlib.compress(block, level)
    out += struct.pack(">Q", len(out))  # a raw trailer
    return bytes(out), offsets


def _pair(changed: tuple[int, ...] = (3, 11), count: int = 16) -> tuple[list[bytes], list[bytes]]:
    old = [_text(random.Random(n), 40_000 + 977 * n) for n in range(count)]
    new = list(old)
    for n in changed:  # a few bytes changed in a few files: their whole blocks change
        block = bytearray(new[n])
        block[1000:1010] = b"0123456789"
        new[n] = bytes(block)
    new.insert(8, _text(random.Random(99), 30_000))  # and a new file
    return old, new


def _reader(data: bytes):  # type: ignore[no-untyped-def]
    return lambda offset, n: data[offset : offset + n]


def _files(tmp_path: Path, old: bytes, new: bytes) -> tuple[Path, Path]:
    a, b = tmp_path / "old.img", tmp_path / "new.img"
    a.write_bytes(old)
    b.write_bytes(new)
    return a, b


def _make(tmp_path: Path, old: bytes, new: bytes) -> tuple[deltamaker.MadeDelta, bytes]:
    a, b = _files(tmp_path, old, new)
    made = deltamaker.make_delta(
        a,
        b,
        PARAMS,
        tmp_path / "delta",
        old_sha256=hashlib.sha256(old).hexdigest(),
        new_sha256=hashlib.sha256(new).hexdigest(),
    )
    return made, (tmp_path / "delta").read_bytes()


def _apply(delta: bytes, old: bytes, new: bytes) -> bytes:
    out = bytearray()
    stream = io.BytesIO(delta)
    for offset, data in rebuild(
        stream.read,
        _reader(old),
        from_sha256=hashlib.sha256(old).hexdigest(),
        from_size=len(old),
        to_sha256=hashlib.sha256(new).hexdigest(),
        to_size=len(new),
    ):
        assert offset == len(out)
        out += data
    return bytes(out)


# -- finding streams ------------------------------------------------------------------------------


def test_find_streams_finds_each_stream_where_it_was_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocks, _ = _pair()
    levels = [(9, 6, 1, 5)[n % 4] for n in range(len(blocks))]
    image, offsets = _image(blocks, levels, gap=700)
    # A small scan window, so that streams straddle its edges.
    monkeypatch.setattr(zstreams, "_SCAN_WINDOW", 50_000)
    found = find_streams(_reader(image), len(image))
    assert [s.offset for s in found] == offsets
    assert [s.size for s in found] == [len(b) for b in blocks]
    assert [s.length for s in found] == [
        len(zlib.compress(b, lv)) for b, lv in zip(blocks, levels, strict=True)
    ]
    assert found == find_streams(_reader(image), len(image))  # the window does not matter


def test_a_stream_at_the_very_end_is_found() -> None:
    block = _text(random.Random(1), 5000)
    image = b"raw bytes first " + zlib.compress(block, 9)
    (s,) = find_streams(_reader(image), len(image))
    assert (s.offset, s.size) == (16, 5000)


def test_inflated_form_stays_within_its_bound() -> None:
    zeros = zlib.compress(bytes(1024 * 1024), 9)  # about 1 KiB that inflates to 1 MiB
    image = b"x" * 10_000 + zeros + b"y" * 10_000 + zeros
    # By default at most 8 times the payload: neither stream fits.
    assert find_streams(_reader(image), len(image)) == []
    both = find_streams(_reader(image), len(image), max_inflated=len(image) + 2 * 1024 * 1024)
    assert [s.offset for s in both] == [10_000, 20_000 + len(zeros)]
    (first,) = find_streams(_reader(image), len(image), max_inflated=len(image) + 1024 * 1024)
    assert first.offset == 10_000


def test_the_search_gives_up_on_a_payload_of_false_starts() -> None:
    """Headers that start no stream cost an inflate each: at most 1024 per MiB are tried."""
    stream = zlib.compress(_text(random.Random(3), 50_000), 9)
    few = b"\x78\x01" * 1000 + stream
    assert [s.offset for s in find_streams(_reader(few), len(few))] == [2000]
    many = b"\x78\x01" * (1024 * 1024) + stream  # 2 MiB: a million false starts
    assert find_streams(_reader(many), len(many)) == []


@pytest.mark.parametrize(
    ("make", "level"),
    [
        (lambda b: zlib.compress(b, 9), 9),
        (lambda b: zlib.compress(b, 6), 6),
        (lambda b: zlib.compress(b, 3), 3),
        (lambda b: zlib.compress(b, 1), 1),
        # Another memory level or strategy writes other bytes: the device could not
        # make them, so the stream stays as it is.
        (lambda b: _compressobj(b, 9, mem_level=1), -1),
        (lambda b: _compressobj(b, 6, strategy=zlib.Z_FILTERED), -1),
    ],
)
def test_reproducible_names_the_level_that_writes_the_same_bytes(make, level) -> None:  # type: ignore[no-untyped-def]
    block = _text(random.Random(5), 60_000)
    assert reproducible(make(block)) == level


def _compressobj(data: bytes, level: int, *, mem_level: int = 8, strategy: int = 0) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 15, mem_level, strategy)
    return c.compress(data) + c.flush()


def test_xz_streams_are_made_again_with_the_container_liblzma_writes() -> None:
    block = _text(random.Random(7), 100_000)
    made = zstreams._compress(block, zstreams.XZ | 17 << 8 | 1 << 3)  # preset 6, CRC32, 128 KiB
    assert made[:6] == b"\xfd7zXZ\x00" and lzma.decompress(made) == block
    recipe = reproducible(made)
    assert recipe == zstreams.XZ | 17 << 8 | 1 << 3
    image = b"raw" * 100 + made + b"tail" * 100
    (s,) = find_streams(_reader(image), len(image))
    assert (s.offset, s.length, s.size, s.level) == (300, len(made), len(block), zstreams.XZ)
    # What Python's own xz writer makes (no sizes in the block header), a CRC64, another
    # preset: none is made again, so they travel as they are.
    assert reproducible(lzma.compress(block, format=lzma.FORMAT_XZ)) == -1
    crc64 = lzma.compress(block, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)
    assert reproducible(crc64) == -1
    assert reproducible(zstreams._compress(block, zstreams.XZ | 17 << 8 | 1 << 3)[:-1]) == -1


def test_gzip_members_and_other_windows_are_not_taken_for_zlib_streams() -> None:
    block = _text(random.Random(6), 20_000)
    image = b"\0" * 64 + _compressobj_wbits(block, 31) + b"\0" * 64 + _compressobj_wbits(block, 12)
    assert find_streams(_reader(image), len(image)) == []


def _compressobj_wbits(data: bytes, wbits: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


# -- the inflated form ----------------------------------------------------------------------------


def test_inflated_view_reads_what_write_inflated_writes() -> None:
    blocks, _ = _pair()
    image, _ = _image(blocks, [9] * len(blocks), gap=300)
    streams = find_streams(_reader(image), len(image))
    whole = bytearray()
    write_inflated(_reader(image), len(image), streams, whole.extend, piece=1000)
    view = InflatedView(_reader(image), len(image), streams)
    assert view.size == len(whole) == len(image) + sum(s.size - s.length for s in streams)
    rng = random.Random(7)
    for _ in range(300):
        offset = rng.randrange(0, len(whole))
        n = rng.choice((1, 17, 4096, 70_000, 300_000))
        assert view.read(offset, n) == whole[offset : offset + n]
    assert view.read(len(whole) - 5, 100) == whole[-5:]


def test_deflate_pieces_makes_the_payload_from_any_cut_of_its_inflated_form() -> None:
    blocks, _ = _pair()
    image, _ = _image(blocks, [9, 6] * (len(blocks) // 2) + [9] * (len(blocks) % 2), gap=300)
    streams = [
        Stream(s.offset, s.length, s.size, reproducible(image[s.offset : s.offset + s.length]))
        for s in find_streams(_reader(image), len(image))
    ]
    whole = bytearray()
    write_inflated(_reader(image), len(image), streams, whole.extend)
    rng = random.Random(8)

    def cut() -> Iterator[tuple[int, bytes]]:
        at = 0
        while at < len(whole):
            n = rng.choice((1, 5, 1000, 65_536, 500_000))
            yield at, bytes(whole[at : at + n])
            at += n

    out = b"".join(data for _, data in deflate_pieces(cut(), streams, len(image), _reader(b"")))
    assert out == image


# -- deltas ---------------------------------------------------------------------------------------


def test_a_zlib_delta_rebuilds_the_payload_and_sends_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_blocks, new_blocks = _pair()
    old, _ = _image(old_blocks, [9] * len(old_blocks))
    new, _ = _image(new_blocks, [9] * len(new_blocks))
    made, delta = _make(tmp_path, old, new)
    assert delta[:4] == b"SKZ1"
    assert (made.kind, made.streams, made.deflated) == ("zlib", 17, 3)  # 2 changed, 1 new
    assert made.length == len(delta)
    assert _apply(delta, old, new) == new
    # Through the compressed bytes, each changed block is new bytes from end to end.
    monkeypatch.setattr(deltamaker, "ZLIB_MIN_SHARE", 0)
    plain, plain_delta = _make(tmp_path, old, new)
    assert plain.kind == "plain" and plain_delta[:4] == b"SKD2"
    assert len(delta) * 3 < len(plain_delta)


def test_streams_zlib_cannot_make_again_travel_as_bytes(tmp_path: Path) -> None:
    old_blocks, new_blocks = _pair(changed=(2, 5, 9))
    old, _ = _image(old_blocks, [9] * len(old_blocks))
    new = bytearray(b"hsqs" + bytes(92))
    for n, block in enumerate(new_blocks):
        # Block 5 changed and is written by another deflate than zlib's defaults.
        new += _compressobj(block, 9, mem_level=1) if n == 5 else zlib.compress(block, 9)
    made, delta = _make(tmp_path, old, bytes(new))
    assert made.kind == "zlib" and made.streams == len(new_blocks) - 1 and made.deflated == 3
    assert _apply(delta, old, bytes(new)) == bytes(new)


def test_a_payload_without_zlib_streams_gets_a_plain_delta(tmp_path: Path) -> None:
    rng = random.Random(10)
    old = _text(rng, 300_000)
    new = old[:1000] + b"changed" + old[1000:]
    made, delta = _make(tmp_path, old, new)
    assert made == deltamaker.MadeDelta(len(delta), "plain")
    assert delta[:4] == b"SKD2" and _apply(delta, old, new) == new


@pytest.mark.parametrize("compressor", ["gzip", "xz"])
def test_a_real_squashfs_update_is_a_small_zlib_delta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compressor: str
) -> None:
    """mksquashfs with its defaults (gzip, level 9, 128 KiB blocks, as the corpus's images), or xz."""
    mksquashfs = shutil.which("mksquashfs") or shutil.which("mksquashfs", path="/usr/sbin")
    if mksquashfs is None:
        pytest.skip("mksquashfs is not installed (Debian package squashfs-tools)")
    tree = tmp_path / "tree"
    for n in range(24):
        path = tree / f"d{n % 4}" / f"f{n}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_text(random.Random(n), 20_000 + 5000 * n))
    images = []
    for version in ("old", "new"):
        if version == "new":  # ten bytes of one file changed, and a file added
            target = tree / "d1" / "f5.txt"
            data = bytearray(target.read_bytes())
            data[100:110] = b"0123456789"
            target.write_bytes(bytes(data))
            (tree / "d2" / "added.conf").write_bytes(b"key = value\n" * 50)
        image = tmp_path / f"{version}.sqfs"
        subprocess.run(
            [mksquashfs, str(tree), str(image), "-noappend", "-no-progress", "-quiet",
             "-mkfs-time", "0", "-all-time", "0", "-all-root", "-comp", compressor],
            check=True,
            capture_output=True,
        )  # fmt: skip
        images.append(image.read_bytes())
    old, new = images
    made, delta = _make(tmp_path, old, new)
    assert made.kind == "zlib" and 0 < made.deflated < made.streams
    assert _apply(delta, old, new) == new
    monkeypatch.setattr(deltamaker, "ZLIB_MIN_SHARE", 0)
    _, plain_delta = _make(tmp_path, old, new)
    assert len(delta) * 2 < len(plain_delta)


# -- bad deltas: one-line errors, nothing made ---------------------------------------------------


def _split(delta: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    old_len, new_len = struct.unpack(">I4xI", delta[HEADER_SIZE - 12 : HEADER_SIZE])
    tables = delta[HEADER_SIZE:]
    return (
        delta[:HEADER_SIZE],
        tables[:old_len],
        tables[old_len : old_len + new_len],
        tables[old_len + new_len :],
    )


def _with_tables(delta: bytes, old_table: bytes, new_table: bytes) -> bytes:
    header, _, _, inner = _split(delta)
    header = header[: HEADER_SIZE - 16] + struct.pack(
        ">IIII",
        struct.unpack(">I", header[HEADER_SIZE - 16 : HEADER_SIZE - 12])[0],
        len(old_table),
        struct.unpack(">I", header[HEADER_SIZE - 8 : HEADER_SIZE - 4])[0],
        len(new_table),
    )
    return header + old_table + new_table + inner


@pytest.fixture(scope="module")
def zlib_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, bytes]:
    old_blocks, new_blocks = _pair()
    old, _ = _image(old_blocks, [9] * len(old_blocks))
    new, _ = _image(new_blocks, [9] * len(new_blocks))
    _, delta = _make(tmp_path_factory.mktemp("zlib"), old, new)
    return old, new, delta


def _new_streams(delta: bytes, new: bytes) -> list[Stream]:
    header, _, new_table, _ = _split(delta)
    count = struct.unpack(">I", header[HEADER_SIZE - 8 : HEADER_SIZE - 4])[0]
    return parse_table(new_table, count, len(new))


def _bad(delta: bytes, old: bytes, new: bytes, message: str) -> None:
    with pytest.raises(DeltaError, match=message) as raised:
        _apply(delta, old, new)
    assert "\n" not in str(raised.value)


def test_a_device_whose_zlib_deflates_otherwise_stops_at_that_stream(
    zlib_pair: tuple[bytes, bytes, bytes],
) -> None:
    old, new, delta = zlib_pair
    streams = _new_streams(delta, new)
    k = next(i for i, s in enumerate(streams) if s.source < 0)
    streams[k] = Stream(streams[k].offset, streams[k].length, streams[k].size, 1)
    _, old_table, _, _ = _split(delta)
    tampered = _with_tables(delta, old_table, encode_table(streams))
    _bad(tampered, old, new, f"stream at {streams[k].offset} .* this zlib writes other bytes")


def test_an_old_payload_whose_streams_do_not_inflate_is_refused(
    zlib_pair: tuple[bytes, bytes, bytes],
) -> None:
    old, new, delta = zlib_pair
    (first, *_) = find_streams(_reader(old), len(old))
    broken = bytearray(old)
    broken[first.offset + 50] ^= 0xFF
    # Given as the old payload it claims to be (the hashes of the slot are checked elsewhere).
    out = bytearray()
    with pytest.raises(DeltaError, match="inflate|not the new payload|corrupt"):
        for _, data in rebuild(
            io.BytesIO(delta).read,
            _reader(bytes(broken)),
            from_sha256=hashlib.sha256(old).hexdigest(),
            from_size=len(old),
            to_sha256=hashlib.sha256(new).hexdigest(),
            to_size=len(new),
        ):
            out += data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d[:4] + b"\0" + d[5:], "another payload"),
        (lambda d: b"SKZ9" + d[4:], "bad magic"),
        (lambda d: d[:-10], "ends in its"),
        (lambda d: d + b"\0", "bytes after its last literal"),
        (lambda d: d[: HEADER_SIZE + 3] + b"\xff" + d[HEADER_SIZE + 4 :], "stream table"),
    ],
)
def test_malformed_zlib_deltas_are_one_line_errors(
    zlib_pair: tuple[bytes, bytes, bytes],
    change,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    old, new, delta = zlib_pair
    _bad(change(delta), old, new, message)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (Stream(10**9, 100, 1000, 9), "outside its payload"),
        (Stream(100, 0, 1000, 9), "impossible size"),
        (Stream(100, 100, 2 * 1024 * 1024, 9), "impossible size"),
        (Stream(100, 100, 1000, 12), "unknown codec or level"),
        (Stream(100, 100, 1000, zstreams.XZ | 4 << 3), "unknown codec or level"),  # CRC64
        (Stream(100, 100, 1000, zstreams.XZ | 1 << 3 | 5), "unknown codec or level"),
        (Stream(100, 100, 1000, zstreams.XZ | 41 << 8 | 1 << 3), "unknown codec or level"),
        (Stream(100, 100, 1000, zstreams.XZ), "names no recipe"),
        (Stream(100, 100, 1000, 0, source=10**9), "outside the old payload"),
    ],
)
def test_stream_records_out_of_range_are_refused(
    zlib_pair: tuple[bytes, bytes, bytes], stream: Stream, message: str
) -> None:
    old, new, delta = zlib_pair
    _, old_table, _, _ = _split(delta)
    header = bytearray(_split(delta)[0])
    header[HEADER_SIZE - 8 : HEADER_SIZE - 4] = struct.pack(">I", 1)
    tampered = _with_tables(bytes(header) + delta[HEADER_SIZE:], old_table, encode_table([stream]))
    _bad(tampered, old, new, message)


def test_unchanged_streams_are_neither_inflated_nor_deflated(tmp_path: Path) -> None:
    """They are copied compressed; only the literals' dictionaries make the device inflate."""
    old_blocks, new_blocks = _pair(changed=(12,), count=64)
    old, _ = _image(old_blocks, [9] * len(old_blocks))
    new, _ = _image(new_blocks, [9] * len(new_blocks))
    _, delta = _make(tmp_path, old, new)
    read_bytes = 0

    def read_old(offset: int, n: int) -> bytes:
        nonlocal read_bytes
        read_bytes += n
        return old[offset : offset + n]

    stream = io.BytesIO(delta)
    made = b"".join(
        data
        for _, data in rebuild(
            stream.read,
            read_old,
            from_sha256=hashlib.sha256(old).hexdigest(),
            from_size=len(old),
            to_sha256=hashlib.sha256(new).hexdigest(),
            to_size=len(new),
        )
    )
    assert made == new
    # Each unchanged stream read once, compressed, to be copied; a few more to be inflated
    # for the dictionaries of the changed and the new block (not every one a second time).
    assert len(old) < read_bytes < 1.2 * len(old)


def test_random_updates_of_block_images_all_rebuild(tmp_path: Path) -> None:
    """Changes, insertions, removals, level changes and raw gaps, in random mixes.

    What a device skips making (bytes of streams copied compressed) and what
    it deflates on its threads must still make exactly the new payload.
    """
    rng = random.Random(2026)
    for round_ in range(12):
        count = rng.randrange(3, 30)
        blocks = [
            _text(random.Random(rng.random()), rng.randrange(500, 90_000)) for _ in range(count)
        ]
        levels = [rng.choice((9, 9, 9, 6, 1)) for _ in range(count)]
        new_blocks, new_levels = list(blocks), list(levels)
        for _ in range(rng.randrange(1, 5)):
            k = rng.randrange(len(new_blocks))
            action = rng.choice(("edit", "insert", "remove", "level"))
            if action == "edit":
                b = bytearray(new_blocks[k])
                at = rng.randrange(len(b))
                b[at : at + 20] = rng.randbytes(20)
                new_blocks[k] = bytes(b)
            elif action == "insert":
                new_blocks.insert(k, _text(random.Random(rng.random()), rng.randrange(500, 60_000)))
                new_levels.insert(k, 9)
            elif action == "remove" and len(new_blocks) > 1:
                del new_blocks[k], new_levels[k]
            elif action == "level":
                new_levels[k] = 6 if new_levels[k] == 9 else 9
        old, _ = _image(blocks, levels, gap=rng.choice((0, 300, 5000)))
        new, _ = _image(new_blocks, new_levels, gap=rng.choice((0, 300)))
        made, delta = _make(tmp_path, old, new)
        assert made.kind == "zlib", round_
        assert _apply(delta, old, new) == new, round_
