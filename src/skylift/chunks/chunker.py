"""Cutting a byte stream into chunks with the compiled FastCDC or fixed blocks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, Protocol, cast

from pyfastcdc import FastCDC

from skylift.chunks.params import ChunkingParams

__all__ = ["Readable", "iter_chunks"]


class Readable(Protocol):
    """What the chunker reads from: a file, a pipe, a socket file, BytesIO."""

    def readinto(self, b: memoryview, /) -> int: ...


def iter_chunks(stream: Readable, params: ChunkingParams) -> Iterator[memoryview]:
    """Yield the chunks of ``stream`` in order, reading it once, front to back.

    Memory stays bounded by ``params.max_size`` plus the chunker's read-ahead
    whatever the stream's length. A yielded view is valid only until the next
    chunk is requested: copy it (``bytes(view)``) to keep it.
    """
    if params.algorithm == "fixed":
        yield from _fixed_blocks(stream, params.avg_size)
        return
    cdc = FastCDC(
        params.avg_size,
        min_size=params.min_size,
        max_size=params.max_size,
        normalized_chunking=cast(Literal[0, 1, 2, 3], params.normalization),
        seed=params.seed,
    )
    for chunk in cdc.cut_stream(stream):
        yield chunk.data


def _fixed_blocks(stream: Readable, block_size: int) -> Iterator[memoryview]:
    buf = bytearray(block_size)
    view = memoryview(buf)
    while True:
        filled = 0
        while filled < block_size:  # pipes return short reads: fill the block
            n = stream.readinto(view[filled:])
            if not n:
                break
            filled += n
        if filled == 0:
            return
        yield view[:filled]
        if filled < block_size:
            return
