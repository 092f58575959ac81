"""The per-pair delta format (skylift.chunks.delta): building, parsing, bounds."""

from __future__ import annotations

import hashlib
import io
import random
import struct

import pytest
import zstandard

from agent.simhub import make_delta  # tests/ is on sys.path under pytest
from skylift.chunks import ChunkingParams
from skylift.chunks.delta import (
    COPY,
    HEADER_SIZE,
    LITERAL,
    MAX_LITERAL_BYTES,
    MAX_RECENT_BYTES,
    OP_SIZE,
    DeltaError,
    DeltaHeader,
    DeltaOp,
    build_delta,
    compress_literal,
    cut_chunks,
    decode_literal,
    encode_header,
    encode_ops,
    pair_chunking,
    parse_header,
    parse_ops,
    plan_ops,
    read_delta,
    rebuild,
    replay,
)

FIXED = ChunkingParams.fixed(4096)
CDC = ChunkingParams.cdc(4096)


def _cut(data: bytes, params: ChunkingParams) -> list[tuple[int, int, bytes]]:
    cut = list(cut_chunks(io.BytesIO(data), params))
    # Offsets follow each other and the digests are the chunks' own.
    assert [o for o, _, _ in cut] == [0, *(o + n for o, n, _ in cut[:-1])]
    assert all(hashlib.sha256(data[o : o + n]).digest() == d for o, n, d in cut[:3])
    return cut


def _build(old: bytes, new: bytes, params: ChunkingParams) -> bytes:
    _cut(old, params)  # the cut the delta is planned from (checked there)
    return make_delta(old, new, params)


def _apply(delta: bytes, old: bytes) -> bytes:
    """What a device does, with :func:`read_delta` and :func:`replay`."""
    stream = io.BytesIO(delta)
    _, ops = read_delta(stream.read)
    pieces = list(replay(ops, stream.read, lambda o, n: old[o : o + n], piece=5000))
    assert stream.read(1) == b""  # nothing after the last frame
    # In order and contiguous; copies come in pieces of at most 5000 bytes.
    position = 0
    for offset, data in pieces:
        assert offset == position
        position += len(data)
    copies = sum(op.length for op in ops if op.kind == COPY)
    assert copies > 0 and len(pieces) >= copies // 5000
    return b"".join(d for _, d in pieces)


def _image(seed: int, size: int = 1 << 20) -> bytes:
    rng = random.Random(seed)
    data = bytearray()
    while len(data) < size:
        data += rng.randbytes(rng.randint(500, 9000)) if rng.random() < 0.6 else bytes(3000)
    return bytes(data[:size])


OLD = _image(1)


def _edited(old: bytes) -> bytes:
    new = bytearray(old)
    for at in (10_000, 300_000, 700_001):  # in place, as changed metadata blocks
        new[at : at + 200] = b"edited! " * 25
    return bytes(new[:500_000] + b"inserted " * 300 + new[500_000:])  # and a shift


NEW = _edited(OLD)


@pytest.mark.parametrize("params", [FIXED, CDC], ids=["fixed", "cdc"])
def test_a_delta_rebuilds_the_new_payload_and_is_small(params: ChunkingParams) -> None:
    delta = _build(OLD, NEW, params)
    assert _apply(delta, OLD) == NEW
    # Four edits of a few KiB in a 1 MiB payload.
    assert len(delta) < 40_000
    header = parse_header(delta[:HEADER_SIZE])
    assert header.from_sha256 == hashlib.sha256(OLD).digest()
    assert header.to_sha256 == hashlib.sha256(NEW).digest()
    assert (header.from_size, header.to_size) == (len(OLD), len(NEW))


def test_literals_compress_against_the_old_bytes_where_they_go() -> None:
    # A block changed in a few bytes: against its old self it costs almost nothing.
    old = random.Random(5).randbytes(4096)
    new = old[:100] + b"X" + old[101:]
    against_old = compress_literal(new, old)
    alone = compress_literal(new, b"")
    assert len(against_old) < 64 < len(alone)
    op = DeltaOp(LITERAL, len(new), 0, len(old), len(against_old))
    assert decode_literal(op, against_old, old) == new
    with pytest.raises(DeltaError, match="wrong length"):
        decode_literal(op, against_old, old[:-1])


def test_literals_compress_against_the_new_bytes_made_before_them() -> None:
    # Two new files, the second much like the first (a new library and its
    # debug twin, say), in an update whose old payload has neither.
    rng = random.Random(11)
    first = rng.randbytes(MAX_LITERAL_BYTES)
    second = bytearray(first)
    for at in range(0, len(second), 100_000):
        second[at : at + 8] = rng.randbytes(8)
    old = rng.randbytes(64 * 1024)
    new = first + bytes(second)
    ops = list(plan_ops(_cut(old, FIXED), _cut(new, FIXED), old_size=len(old)))
    assert [(op.kind, op.recent_length) for op in ops] == [
        (LITERAL, 0),
        (LITERAL, MAX_LITERAL_BYTES),
    ]
    delta = make_delta(old, new, FIXED)
    # The second literal costs next to nothing: against its twin just made.
    assert len(delta) < len(first) + 10_000
    stream = io.BytesIO(delta)
    _, ops = read_delta(stream.read)
    assert b"".join(d for _, d in replay(ops, stream.read, lambda o, n: old[o : o + n])) == new
    # What a literal takes of the new bytes is bounded.
    long = rng.randbytes(3 * MAX_RECENT_BYTES // 2) + new
    ops = list(plan_ops([], _cut(long, FIXED), old_size=4096))
    assert max(op.recent_length for op in ops) == MAX_RECENT_BYTES


def test_replay_refuses_a_literal_that_takes_new_bytes_not_yet_made() -> None:
    frame = compress_literal(b"z" * 100, b"")
    ops = [DeltaOp(LITERAL, 100, 0, 0, len(frame), recent_length=10)]
    with pytest.raises(DeltaError, match="not yet made"):
        list(replay(ops, io.BytesIO(frame).read, lambda o, n: OLD[o : o + n]))


def test_content_defined_payloads_are_cut_finer_for_a_delta() -> None:
    assert pair_chunking(FIXED) == FIXED  # filesystem blocks stay
    assert pair_chunking(ChunkingParams.fixed(65536)) == ChunkingParams.fixed(65536)
    assert pair_chunking(ChunkingParams.cdc(16384)) == ChunkingParams.cdc(4096)
    assert pair_chunking(ChunkingParams.cdc(2048)) == ChunkingParams.cdc(2048)
    # Why: a one-byte edit costs a literal of the chunk around it, plus the
    # neighbours the edit's new cut points join to it.
    old = random.Random(3).randbytes(400_000)
    new = bytearray(old)
    for at in range(20_000, 400_000, 50_000):
        new[at] ^= 0xFF
    coarse = ChunkingParams.cdc(16384)
    ops = {
        params: list(plan_ops(_cut(old, params), _cut(bytes(new), params), old_size=len(old)))
        for params in (coarse, pair_chunking(coarse))
    }
    literal = {p: sum(op.length for op in o if op.kind == LITERAL) for p, o in ops.items()}
    assert literal[pair_chunking(coarse)] * 2 < literal[coarse]


def test_identical_payloads_are_one_copy() -> None:
    ops = list(plan_ops(_cut(OLD, FIXED), _cut(OLD, FIXED), old_size=len(OLD)))
    assert ops == [DeltaOp(COPY, len(OLD), 0)]


def test_literal_runs_are_split_to_bound_memory() -> None:
    new = random.Random(9).randbytes(MAX_LITERAL_BYTES + 300_000)
    ops = list(plan_ops([], _cut(new, FIXED), old_size=4096))
    assert [op.kind for op in ops] == [LITERAL, LITERAL]
    assert max(op.length for op in ops) <= MAX_LITERAL_BYTES
    assert sum(op.length for op in ops) == len(new)


def _header(delta: bytes) -> DeltaHeader:
    return parse_header(delta[:HEADER_SIZE])


def test_bad_headers_are_refused_in_one_line() -> None:
    good = _build(OLD, NEW, FIXED)[:HEADER_SIZE]
    with pytest.raises(DeltaError, match="bad magic"):
        parse_header(b"XXXX" + good[4:])
    with pytest.raises(DeltaError, match="not 10"):
        parse_header(good[:10])
    h = _header(good)
    for bad in (
        DeltaHeader(h.from_sha256, h.to_sha256, 0, h.to_size, h.op_count, h.ops_length),
        DeltaHeader(h.from_sha256, h.to_sha256, h.from_size, 1 << 50, h.op_count, h.ops_length),
        DeltaHeader(h.from_sha256, h.to_sha256, h.from_size, h.to_size, 0, h.ops_length),
        DeltaHeader(h.from_sha256, h.to_sha256, h.from_size, h.to_size, h.op_count, 0),
        DeltaHeader(h.from_sha256, h.to_sha256, h.from_size, h.to_size, 10**9, h.ops_length),
    ):
        with pytest.raises(DeltaError):
            parse_header(encode_header(bad))


def _ops_delta(ops: list[DeltaOp], old_size: int, new_size: int) -> tuple[DeltaHeader, bytes]:
    frame = encode_ops(ops)
    return DeltaHeader(bytes(32), bytes(32), old_size, new_size, len(ops), len(frame)), frame


@pytest.mark.parametrize(
    ("ops", "reason"),
    [
        ([DeltaOp(COPY, 100, 4000)], "outside the old payload"),
        ([DeltaOp(COPY, 50, 0), DeltaOp(COPY, 60, 0)], "beyond the new payload"),
        ([DeltaOp(COPY, 50, 0)], "do not make the whole"),
        ([DeltaOp(COPY, 100, 0, dict_length=5)], "copy with a dictionary"),
        ([DeltaOp(LITERAL, 100, 0, 10, 0)], "impossible size"),
        ([DeltaOp(LITERAL, 100, 4090, 100, 20)], "dictionary from outside"),
        ([DeltaOp(7, 100, 0)], "unknown kind"),
        ([DeltaOp(COPY, 100, 0, recent_length=5)], "copy with a dictionary"),
        ([DeltaOp(LITERAL, 100, 0, 0, 20, recent_length=1)], "more new bytes than were made"),
        (
            [DeltaOp(COPY, 50, 0), DeltaOp(LITERAL, 50, 0, 0, 20, recent_length=51)],
            "more new bytes than were made",
        ),
    ],
    ids=[
        "copy out",
        "too long",
        "too short",
        "copy dict",
        "empty frame",
        "dict out",
        "kind",
        "copy recent",
        "recent first",
        "recent beyond",
    ],
)
def test_ops_out_of_bounds_are_refused(ops: list[DeltaOp], reason: str) -> None:
    header, frame = _ops_delta(ops, 4096, 100)
    with pytest.raises(DeltaError, match=reason):
        parse_ops(header, frame)


def test_an_ops_frame_that_is_not_one_frame_of_its_size_is_refused() -> None:
    header, frame = _ops_delta([DeltaOp(COPY, 100, 0)], 4096, 100)
    with pytest.raises(DeltaError, match="wrong length"):
        parse_ops(header, frame + b"x")
    raw = struct.pack(">BQqIII", COPY, 100, 0, 0, 0, 0)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    fake = DeltaHeader(bytes(32), bytes(32), 4096, 100, 1, len(unsized))
    with pytest.raises(DeltaError, match="declares the wrong size"):
        parse_ops(fake, unsized)
    two = DeltaHeader(bytes(32), bytes(32), 4096, 100, 2, len(frame))
    with pytest.raises(DeltaError, match="declares the wrong size"):
        parse_ops(two, frame)
    assert len(raw) != OP_SIZE * 2


def test_a_literal_that_lies_about_its_size_is_refused() -> None:
    frame = compress_literal(b"a" * 1000, b"")
    with pytest.raises(DeltaError, match="declares the wrong size"):
        decode_literal(DeltaOp(LITERAL, 999, 0, 0, len(frame)), frame, b"")
    with pytest.raises(DeltaError, match="not a zstd frame"):
        decode_literal(DeltaOp(LITERAL, 4, 0, 0, 4), b"abcd", b"")


def test_replay_refuses_a_truncated_delta_or_a_short_old_payload() -> None:
    delta = _build(OLD, NEW, FIXED)
    short = io.BytesIO(delta[:-5])
    _, ops = read_delta(short.read)
    with pytest.raises(DeltaError, match="ends in its literal"):
        for _ in replay(ops, short.read, lambda o, n: OLD[o : o + n]):
            pass
    whole = io.BytesIO(delta)
    _, ops = read_delta(whole.read)
    with pytest.raises(DeltaError, match="old payload ends before"):
        for _ in replay(ops, whole.read, lambda o, n: OLD[o : o + n][: n // 2]):
            pass
    with pytest.raises(DeltaError, match="ends in its header"):
        read_delta(io.BytesIO(delta[:20]).read)
    with pytest.raises(DeltaError, match="ends in its operations"):
        read_delta(io.BytesIO(delta[: HEADER_SIZE + 3]).read)


def test_rebuild_checks_the_payloads_the_trailer_and_the_result() -> None:
    old_sha, new_sha = hashlib.sha256(OLD).hexdigest(), hashlib.sha256(NEW).hexdigest()
    delta = _build(OLD, NEW, FIXED)

    def run(data: bytes, **expect: object) -> bytes:
        want = {"from_sha256": old_sha, "from_size": len(OLD), "to_sha256": new_sha,
                "to_size": len(NEW)} | expect  # fmt: skip
        stream = io.BytesIO(data)
        return b"".join(
            d
            for _, d in rebuild(stream.read, lambda o, n: OLD[o : o + n], **want)  # type: ignore[arg-type]
        )

    assert run(delta) == NEW
    with pytest.raises(DeltaError, match="starts from another payload"):
        run(delta, from_sha256="0" * 64)
    with pytest.raises(DeltaError, match="makes another payload"):
        run(delta, to_size=len(NEW) + 1)
    with pytest.raises(DeltaError, match="bytes after its last literal"):
        run(delta + b"x")
    # A header that names the new payload over bytes that are not it.
    other = bytearray(NEW)
    other[10_050] ^= 0xFF  # inside an edited block: a literal
    frames: list[bytes] = []
    cut = list(cut_chunks(io.BytesIO(OLD), FIXED))
    header, ops = build_delta(
        old_chunks=cut, new_chunks=cut_chunks(io.BytesIO(bytes(other)), FIXED),
        old_size=len(OLD), new_size=len(NEW), from_sha256=bytes.fromhex(old_sha),
        to_sha256=bytes.fromhex(new_sha), read_old=lambda o, n: OLD[o : o + n],
        read_new=lambda o, n: bytes(other[o : o + n]), write_frame=frames.append,
    )  # fmt: skip
    with pytest.raises(DeltaError, match="not the new payload"):
        run(header + ops + b"".join(frames))
