"""Making a per-pair delta from two payload files: the hub's, the CLI's and the bench's.

One function, so that what ``skylift delta plan --pair-delta`` and the
bench measure is what the hub stores. It picks the kind of delta:

- a *zlib delta* (:mod:`skylift.chunks.zstreams`) when compressed streams
  (zlib or xz) make at least a quarter of the new payload (a squashfs image
  compressed with gzip or xz): the delta joins both payloads' inflated
  forms, and the device compresses again the streams that changed;
- a plain delta (:mod:`skylift.chunks.delta`) otherwise.

Both are written through a spool beside ``dest``: a delta's literal frames
follow its header and operations, which are known only at the end.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from skylift.chunks.delta import (
    PAIR_CDC_BYTES,
    DeltaError,
    build_delta,
    cut_chunks,
    pair_chunking,
)
from skylift.chunks.params import ChunkingParams
from skylift.chunks.zstreams import (
    Stream,
    ZlibDeltaHeader,
    encode_table,
    encode_zlib_header,
    find_streams,
    inflated_size,
    reproducible,
    write_inflated,
)
from skylift.fsutil import pread_full

__all__ = ["ZLIB_MIN_SHARE", "MadeDelta", "cut_file", "make_delta", "reader"]

#: A zlib delta is made when the new payload's zlib and xz streams cover at least 1/this of it.
ZLIB_MIN_SHARE = 4
_COPY_BYTES = 1024 * 1024

Chunks = Iterable[tuple[int, int, bytes]]


@dataclass(frozen=True, slots=True)
class MadeDelta:
    """What :func:`make_delta` wrote.

    ``streams`` counts the new payload's compressed streams (zlib, xz) the
    delta goes through (0 for a plain delta), ``deflated`` those a device
    compresses again (the others it copies from the old payload compressed).
    """

    length: int
    kind: str  # "plain" or "zlib"
    streams: int = 0
    deflated: int = 0


def make_delta(
    old: Path,
    new: Path,
    chunking: ChunkingParams,
    dest: Path,
    *,
    old_sha256: str,
    new_sha256: str,
    chunks: tuple[Chunks, Chunks] | None = None,
    zlib: bool = True,
) -> MadeDelta:
    """Write the delta from the payload in ``old`` to the one in ``new`` into ``dest``.

    ``chunking`` is the new payload's; both are cut with its
    :func:`~skylift.chunks.delta.pair_chunking` (or ``chunks``, the old and
    the new payload's chunks already cut so, is used for a plain delta).
    Temporary files go beside ``dest`` (for a zlib delta, both inflated
    forms: up to a few times the payloads' sizes). ``zlib`` False: a plain
    delta whatever the payloads hold.

    Raises:
        DeltaError: the files changed while being read.
        OSError: reading or writing failed.
    """
    old_size, new_size = old.stat().st_size, new.stat().st_size
    with open(old, "rb") as old_f, open(new, "rb") as new_f:
        new_streams = find_streams(reader(new_f), new_size) if zlib else []
        if sum(s.length for s in new_streams) * ZLIB_MIN_SHARE < new_size:
            if chunks is None:
                pair = pair_chunking(chunking)
                chunks = (cut_file(old, pair), cut_file(new, pair))
            length = _write_plain(
                old_f, new_f, old_sha256, new_sha256, chunks, dest, sizes=(old_size, new_size)
            )
            return MadeDelta(length, "plain")
        old_streams = find_streams(reader(old_f), old_size)
        new_streams = _pair_streams(reader(new_f), new_streams, old_streams)
        with tempfile.TemporaryDirectory(prefix=".zlib-", dir=dest.parent) as tmp:
            old_x, new_x = Path(tmp) / "old", Path(tmp) / "new"
            old_x_sha = _inflate(old_f, old_size, old_streams, old_x)
            new_x_sha = _inflate(new_f, new_size, new_streams, new_x)
            inner = Path(tmp) / "inner"
            pair = ChunkingParams.cdc(PAIR_CDC_BYTES)
            with open(old_x, "rb") as ox, open(new_x, "rb") as nx:
                _write_plain(
                    ox,
                    nx,
                    old_x_sha,
                    new_x_sha,
                    (cut_file(old_x, pair), cut_file(new_x, pair)),
                    inner,
                    sizes=(
                        inflated_size(old_size, old_streams),
                        inflated_size(new_size, new_streams),
                    ),
                )
            old_table, new_table = encode_table(old_streams), encode_table(new_streams)
            header = ZlibDeltaHeader(
                bytes.fromhex(old_sha256),
                bytes.fromhex(new_sha256),
                old_size,
                new_size,
                len(old_streams),
                len(old_table),
                len(new_streams),
                len(new_table),
            )
            with open(dest, "wb") as out, open(inner, "rb") as inner_f:
                out.write(encode_zlib_header(header) + old_table + new_table)
                shutil.copyfileobj(inner_f, out, _COPY_BYTES)
    deflated = sum(1 for s in new_streams if s.source < 0)
    return MadeDelta(dest.stat().st_size, "zlib", len(new_streams), deflated)


def _pair_streams(
    read: Callable[[int, int], bytes], new: Sequence[Stream], old: Sequence[Stream]
) -> list[Stream]:
    """The new payload's streams a device can make: copied from the old payload, or deflated.

    A stream with the same compressed bytes as one of the old payload's is
    copied from there; the others are kept when zlib compresses them back
    to their bytes (the level is recorded), left as plain bytes otherwise.
    """
    old_at = {s.digest: s.offset for s in old}
    kept: list[Stream] = []
    for s in new:
        source = old_at.get(s.digest)
        if source is not None:
            kept.append(replace(s, level=max(s.level, 0), source=source))  # the codec
            continue
        level = reproducible(read(s.offset, s.length))
        if level >= 0:
            kept.append(replace(s, level=level))
    return kept


def _inflate(f: BinaryIO, size: int, streams: Sequence[Stream], dest: Path) -> str:
    """Write the inflated form of the payload in ``f`` to ``dest``; its SHA-256 (hex)."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:

        def write(data: bytes) -> None:
            digest.update(data)
            out.write(data)

        write_inflated(reader(f), size, streams, write)
    return digest.hexdigest()


def _write_plain(
    old_f: BinaryIO,
    new_f: BinaryIO,
    old_sha256: str,
    new_sha256: str,
    chunks: tuple[Chunks, Chunks],
    dest: Path,
    *,
    sizes: tuple[int, int],
) -> int:
    """Write the plain delta between two open files into ``dest``; its length."""
    spool = dest.with_name(dest.name + ".frames")
    try:
        with open(spool, "wb") as frames:

            def write_frame(frame: bytes) -> None:
                frames.write(frame)

            header, ops = build_delta(
                old_chunks=list(chunks[0]),
                new_chunks=chunks[1],
                old_size=sizes[0],
                new_size=sizes[1],
                from_sha256=bytes.fromhex(old_sha256),
                to_sha256=bytes.fromhex(new_sha256),
                read_old=reader(old_f),
                read_new=reader(new_f),
                write_frame=write_frame,
            )
        with open(dest, "wb") as out, open(spool, "rb") as frames_in:
            out.write(header + ops)
            shutil.copyfileobj(frames_in, out, _COPY_BYTES)
        return dest.stat().st_size
    finally:
        spool.unlink(missing_ok=True)


def cut_file(path: Path, params: ChunkingParams) -> list[tuple[int, int, bytes]]:
    """``(offset, length, sha256)`` of the file's chunks, cut with ``params``."""
    with open(path, "rb") as f:
        return list(cut_chunks(f, params))


def reader(f: BinaryIO) -> Callable[[int, int], bytes]:
    """``read(offset, length)`` of exactly that many bytes of ``f``."""
    fd = f.fileno()

    def read(offset: int, length: int) -> bytes:
        data = pread_full(fd, length, offset)
        if len(data) != length:
            raise DeltaError("a delta reaches past the end of a payload")
        return data

    return read
