"""Chunking: same cuts from a file, a pipe and a buffer; shifts keep later chunks."""

from __future__ import annotations

import hashlib
import io
import os
import random

import pytest
from pyfastcdc import FastCDC

from skylift.chunks import DEFAULT_CDC, ChunkingParams, ChunkingParamsError, iter_chunks


class TrickleReader(io.RawIOBase):
    """Returns at most ``step`` bytes per read, as a pipe or socket may."""

    def __init__(self, data: bytes, step: int) -> None:
        self._buf = io.BytesIO(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def, override]
        chunk = self._buf.read(min(len(b), self._step))
        b[: len(chunk)] = chunk
        return len(chunk)


def _data(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def _cuts(stream, params: ChunkingParams) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    return [(len(c), hashlib.sha256(c).hexdigest()) for c in iter_chunks(stream, params)]


@pytest.mark.parametrize(
    "params", [DEFAULT_CDC, ChunkingParams.cdc(4096), ChunkingParams.fixed(4096)]
)
@pytest.mark.parametrize("step", [1 << 20, 4093, 1])
def test_short_reads_give_the_same_chunks(params: ChunkingParams, step: int) -> None:
    data = _data(300_000 if step == 1 else 2_000_000)
    expected = _cuts(io.BytesIO(data), params)
    assert _cuts(TrickleReader(data, step), params) == expected
    assert b"".join(bytes(c) for c in iter_chunks(io.BytesIO(data), params)) == data


def test_cdc_matches_the_compiled_library_cut_points() -> None:
    data = _data(3_000_000)
    lib = FastCDC(65536, min_size=16384, max_size=262144, normalized_chunking=1)
    assert [len(c) for c in iter_chunks(io.BytesIO(data), DEFAULT_CDC)] == [
        c.length for c in lib.cut_buf(data)
    ]


def test_cdc_chunks_survive_an_insertion() -> None:
    data = _data(4_000_000)
    shifted = data[:1000] + b"inserted!" + data[1000:]
    before = {h for _, h in _cuts(io.BytesIO(data), DEFAULT_CDC)}
    after = _cuts(io.BytesIO(shifted), DEFAULT_CDC)
    shared = sum(1 for _, h in after if h in before)
    assert shared >= len(after) - 2  # only the chunk(s) around the insertion change


def test_fixed_blocks_have_the_block_size_but_the_last() -> None:
    lengths = [len(c) for c in iter_chunks(io.BytesIO(_data(10_000)), ChunkingParams.fixed(4096))]
    assert lengths == [4096, 4096, 1808]
    lengths = [len(c) for c in iter_chunks(io.BytesIO(_data(2048)), ChunkingParams.fixed(512))]
    assert lengths == [512] * 4


def test_empty_stream_has_no_chunks() -> None:
    for params in (DEFAULT_CDC, ChunkingParams.fixed(512)):
        assert list(iter_chunks(io.BytesIO(b""), params)) == []


def test_chunks_from_a_real_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _data(1_000_000)
    path = tmp_path / "img"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert _cuts(f, DEFAULT_CDC) == _cuts(io.BytesIO(data), DEFAULT_CDC)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fastcdc-2020", 65536, 16384, 262144, 1, 0), None),
        (("rabin", 65536, 16384, 262144, 1, 0), "unknown chunking algorithm"),
        (("fastcdc-2020", 65000, 16384, 262144, 1, 0), "power of two"),
        (("fastcdc-2020", 65536, 70000, 262144, 1, 0), "min_size <= avg_size"),
        (("fastcdc-2020", 65536, 16384, 64 << 20, 1, 0), "larger than"),
        (("fastcdc-2020", 65536, 16384, 262144, 7, 0), "normalization"),
        (("fastcdc-2020", 65536, 16384, 262144, 1, -1), "seed"),
        (("fixed", 4096, 4096, 8192, 0, 0), "min_size == avg_size == max_size"),
        (("fixed", 32, 32, 32, 0, 0), "64 <= min_size"),
        (("fixed", 1000, 1000, 1000, 0, 0), "power of two"),
        (("fixed", 256, 256, 256, 0, 0), "at least 512"),
        (("fixed", "4096", 4096, 4096, 0, 0), "integer"),
    ],
)
def test_params_are_validated(args: tuple, message: str | None) -> None:  # type: ignore[type-arg]
    if message is None:
        params = ChunkingParams(*args)
        assert ChunkingParams.from_dict(params.to_dict()) == params
        return
    with pytest.raises(ChunkingParamsError, match=message):
        ChunkingParams(*args)


def test_from_dict_refuses_unknown_fields() -> None:
    d = DEFAULT_CDC.to_dict() | {"extra": 1}
    with pytest.raises(ChunkingParamsError, match="unknown fields"):
        ChunkingParams.from_dict(d)


def test_describe() -> None:
    assert DEFAULT_CDC.describe() == "fastcdc-2020 16K/64K/256K"
    assert ChunkingParams.fixed(4096).describe() == "fixed 4K"


def test_os_pipe_chunks_like_a_buffer() -> None:
    data = _data(1_500_000)
    r, w = os.pipe()
    import threading

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(data)

    t = threading.Thread(target=feed)
    t.start()
    with os.fdopen(r, "rb", buffering=0) as f:
        got = _cuts(f, DEFAULT_CDC)
    t.join(10)
    assert got == _cuts(io.BytesIO(data), DEFAULT_CDC)
