"""Writing a bundle: chunk and compress each payload once, then lay the bundle out.

The manifest comes first in a bundle but depends on every payload's digest,
so writing takes two passes: the payloads are read once, front to back,
their compressed chunks going to a caller-provided spool file; then the
manifest is signed and the bundle is written from the spool. Payload
streams may be pipes; no payload is ever held in memory whole.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

import zstandard
from securesystemslib.signer import Signer

from skylift.bundle.errors import BundleError
from skylift.bundle.format import pack_preamble
from skylift.bundle.manifest import (
    HOOK_PHASES,
    HookEntry,
    IndexRef,
    Manifest,
    PayloadEntry,
    check_name,
)
from skylift.bundle.signature import encode_signatures, sign_manifest
from skylift.chunks import ChunkingParams, IndexBuilder, encode_chunk, iter_chunks
from skylift.chunks.chunker import Readable
from skylift.chunks.index import ENTRIES_PER_PAGE, ENTRY_SIZE, PAGE_HEADER_SIZE

__all__ = [
    "HookSource",
    "PayloadSource",
    "default_chunking",
    "detect_payload_type",
    "write_bundle",
]

#: Enough for every superblock sniffed here (ext4's ends at 2048, erofs's starts at 1024).
_SNIFF_BYTES = 4096
_COPY_BLOCK = 1 << 20


@dataclass
class PayloadSource:
    """A payload to put in a bundle. ``stream`` is read once, front to back."""

    name: str
    stream: Readable
    slot_class: str | None = None
    chunking: ChunkingParams | None = None


@dataclass(frozen=True)
class HookSource:
    """An executable for one install phase."""

    phase: str
    data: bytes


def detect_payload_type(head: bytes) -> str:
    """Name the payload's kind from its first bytes (at least 4 KiB when there are)."""
    if head[1080:1082] == b"\x53\xef":
        return "ext4"  # ext2/3/4 share the superblock magic; all are block-aligned
    if head[1024:1028] == b"\xe2\xe1\xf5\xe0":
        return "erofs"
    if head[:4] == b"hsqs":
        return "squashfs"
    if head[257:262] == b"ustar":
        return "tar"
    if head[510:512] == b"\x55\xaa" and (
        head[54:59] in (b"FAT12", b"FAT16") or head[82:87] == b"FAT32"
    ):
        return "vfat"
    return "raw"


#: Fixed blocks are never smaller than this, nor larger than ``_MAX_FIXED``.
_MIN_FIXED = 4096
_MAX_FIXED = 65536
#: A filesystem whose blocks would exceed this many chunks gets larger blocks: the
#: index stays under 22 MB on the wire and in a device's memory (a 2 GiB ext4
#: image in 4 KiB blocks; 4 GiB in 8 KiB, and so on up to 64 KiB).
_MAX_FIXED_CHUNKS = 1 << 19
#: Where content shifts (tar, squashfs, unknown data): FastCDC 4K/16K/64K (ADR 0005).
_SHIFTING = ChunkingParams.cdc(16384)


def default_chunking(kind: str, head: bytes) -> ChunkingParams:
    """The chunking a payload of ``kind`` gets unless the caller chose one (ADR 0005).

    Block-aligned filesystems (``ext4``, ``erofs``, ``vfat``) with blocks or
    clusters of at least 4 KiB are cut in fixed blocks of that size, read from
    ``head`` (the payload's first bytes, as given to
    :func:`detect_payload_type`); larger blocks when the filesystem would make
    more than 512 Ki chunks. Everything else (tar, squashfs, unknown data,
    filesystems of smaller blocks, whose files move in steps a 4 KiB chunk
    cannot follow, and a superblock that makes no sense) gets FastCDC 16 KiB,
    which never does badly where content shifts. Never raises.
    """
    if kind == "ext4":
        return _ext4_chunking(head)
    if kind == "erofs":
        return _erofs_chunking(head)
    if kind == "vfat":
        return _vfat_chunking(head)
    return _SHIFTING


def _u8(head: bytes, at: int) -> int | None:
    return head[at] if at < len(head) else None


def _u16(head: bytes, at: int) -> int | None:
    return int.from_bytes(head[at : at + 2], "little") if at + 2 <= len(head) else None


def _u32(head: bytes, at: int) -> int | None:
    return int.from_bytes(head[at : at + 4], "little") if at + 4 <= len(head) else None


def _ext4_chunking(head: bytes) -> ChunkingParams:
    log = _u32(head, 1024 + 24)  # s_log_block_size: block size = 1024 << log
    if log is None or log > 6:  # ext4 blocks are at most 64 KiB
        return _SHIFTING
    if 1024 << log < _MIN_FIXED:
        # 1 or 2 KiB blocks: files move by less than a 4 KiB chunk when a file
        # before them grows, which fixed chunks cannot follow (the demo's 32 MiB
        # image, rebuilt with four files changed, shared 78 of 3 336 chunks).
        return _SHIFTING
    block = 1024 << log
    # s_blocks_count_lo, and _hi when the 64bit feature (incompat 0x80) is on.
    blocks = _u32(head, 1024 + 4) or 0
    incompat = _u32(head, 1024 + 0x60) or 0
    if incompat & 0x80:
        blocks |= (_u32(head, 1024 + 0x150) or 0) << 32
    size = blocks * (1024 << log)
    while size > _MAX_FIXED_CHUNKS * block and block < _MAX_FIXED:
        block *= 2
    return ChunkingParams.fixed(block)


def _erofs_chunking(head: bytes) -> ChunkingParams:
    bits = _u8(head, 1024 + 12)  # blkszbits, after magic, checksum and feature_compat
    if bits is None or not 12 <= bits <= 16:  # below 4 KiB: as ext4's small blocks
        return _SHIFTING
    return ChunkingParams.fixed(1 << bits)


def _vfat_chunking(head: bytes) -> ChunkingParams:
    """The cluster size when the data area starts on a cluster boundary, else 4 KiB."""
    fallback = ChunkingParams.fixed(_MIN_FIXED)
    sector = _u16(head, 11)
    per_cluster = _u8(head, 13)
    reserved = _u16(head, 14)
    fats = _u8(head, 16)
    root_entries = _u16(head, 17)
    fat_size = _u16(head, 22)
    if fat_size == 0:
        fat_size = _u32(head, 36)  # FAT32 keeps its FAT size here
    if (
        sector is None
        or per_cluster is None
        or reserved is None
        or fats is None
        or root_entries is None
        or fat_size is None
        or sector not in (512, 1024, 2048, 4096)
        or per_cluster not in (1, 2, 4, 8, 16, 32, 64, 128)
        or not reserved
        or not fats
        or not fat_size
    ):
        return _SHIFTING
    cluster = sector * per_cluster
    if cluster < _MIN_FIXED:
        return _SHIFTING  # files move by less than a 4 KiB chunk (see _ext4_chunking)
    root_dir_sectors = (root_entries * 32 + sector - 1) // sector
    data_start = (reserved + fats * fat_size + root_dir_sectors) * sector
    if data_start % cluster:
        # Files still move by whole clusters, multiples of 4 KiB: 4 KiB blocks follow them.
        return fallback
    # Both powers of two: a cluster above 64 KiB is still a multiple of 64 KiB blocks.
    return ChunkingParams.fixed(min(cluster, _MAX_FIXED))


class _Prefixed:
    """A readable stream that replays ``head`` and then continues with ``rest``."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def readinto(self, b: memoryview) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._rest.readinto(b)


def _read_head(stream: Readable, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    filled = 0
    while filled < size:
        n = stream.readinto(view[filled:])
        if not n:
            break
        filled += n
    return bytes(buf[:filled])


@dataclass
class _Spooled:
    source: PayloadSource
    type: str
    chunking: ChunkingParams
    index: IndexBuilder
    sha256: str
    spool_offset: int


class _Encoder:
    """Hashes and compresses chunks, on ``workers`` threads when there are several.

    zstd and hashlib release the GIL on large buffers, so threads scale here.
    Results come back in order; at most ``window`` chunks are in flight.
    """

    def __init__(self, level: int, workers: int) -> None:
        self._level = level
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self._window = 4 * workers

    def _compressor(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = zstandard.ZstdCompressor(level=self._level, write_content_size=True)
            self._local.c = c
        return c

    def _encode(self, data: bytes) -> tuple[int, bytes, int, bytes]:
        codec, stored = encode_chunk(data, self._compressor())
        h = hashlib.sha256()
        h.update(data)  # update() releases the GIL; the constructor does not (3.11)
        return len(data), h.digest(), codec, stored

    def run(
        self,
        chunks: Iterable[memoryview],
        sink: Callable[[int, bytes, int, bytes], None],
        payload_hash: hashlib._Hash,
    ) -> None:
        if self._pool is None:
            for view in chunks:
                data = bytes(view)
                payload_hash.update(data)
                sink(*self._encode(data))
            return
        pending: deque[Future[tuple[int, bytes, int, bytes]]] = deque()
        for view in chunks:
            data = bytes(view)
            pending.append(self._pool.submit(self._encode, data))
            payload_hash.update(data)
            while len(pending) > self._window:
                sink(*pending.popleft().result())
        while pending:
            sink(*pending.popleft().result())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def write_bundle(
    out: BinaryIO,
    *,
    product: str,
    version: str,
    compatible: Sequence[str],
    payloads: Sequence[PayloadSource],
    signers: Sequence[Signer],
    spool: BinaryIO,
    created: datetime,
    hooks: Sequence[HookSource] = (),
    min_agent_version: str = "0.1.0",
    compression_level: int = 3,
    workers: int = 1,
    entries_per_page: int = ENTRIES_PER_PAGE,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Write a signed bundle to ``out`` and return its manifest.

    ``spool`` is an empty, seekable scratch file (a temporary file beside the
    output) that receives the compressed chunks on the first pass.
    ``progress`` is called with the number of payload bytes just read.
    ``entries_per_page`` sets the index page size, which bounds a reader's memory.

    Raises:
        ManifestError, UnsafePayloadNameError: a name, version or field is invalid.
        BundleError: duplicate payloads or hooks, an unknown hook phase.
    """
    names = [check_name(p.name) for p in payloads]
    if len(set(names)) != len(names):
        raise BundleError("two payloads with the same name")
    for h in hooks:
        if h.phase not in HOOK_PHASES:
            raise BundleError(
                f"unknown hook phase {h.phase!r}; use one of {', '.join(HOOK_PHASES)}"
            )
    if len({h.phase for h in hooks}) != len(hooks):
        raise BundleError("two hooks for the same phase")

    encoder = _Encoder(compression_level, workers)
    try:
        spooled = [
            _spool_payload(
                p, spool, encoder, IndexBuilder(entries_per_page=entries_per_page), progress
            )
            for p in payloads
        ]
    finally:
        encoder.close()

    page_lists = [s.index.pages() for s in spooled]
    manifest = Manifest(
        product=product,
        version=version,
        compatible=tuple(compatible),
        created=created,
        min_agent_version=min_agent_version,
        hooks=tuple(
            HookEntry(h.phase, len(h.data), hashlib.sha256(h.data).hexdigest()) for h in hooks
        ),
        payloads=tuple(
            PayloadEntry(
                name=s.source.name,
                slot_class=s.source.slot_class or s.source.name,
                type=s.type,
                size=s.index.payload_length,
                sha256=s.sha256,
                chunking=s.chunking,
                compression_level=compression_level,
                chunks=s.index.count,
                stored_size=s.index.stored_length,
                index=IndexRef(
                    first_page_sha256=IndexBuilder.first_digest(pages).hex(),
                    pages=len(pages),
                    entries_per_page=s.index.entries_per_page,
                ),
            )
            for s, pages in zip(spooled, page_lists, strict=True)
        ),
    )
    manifest_bytes = manifest.to_bytes()
    signatures = encode_signatures(sign_manifest(manifest_bytes, signers))
    out.write(pack_preamble(len(manifest_bytes), len(signatures)))
    out.write(manifest_bytes)
    out.write(signatures)
    for h in hooks:
        out.write(h.data)
    for s, pages in zip(spooled, page_lists, strict=True):
        spool.seek(s.spool_offset)
        entries = s.index.entries()
        for page in pages:
            out.write(page)
            n = (len(page) - PAGE_HEADER_SIZE) // ENTRY_SIZE
            _copy(spool, out, sum(next(entries).stored_length for _ in range(n)))
    return manifest


def _spool_payload(
    source: PayloadSource,
    spool: BinaryIO,
    encoder: _Encoder,
    index: IndexBuilder,
    progress: Callable[[int], None] | None,
) -> _Spooled:
    head = _read_head(source.stream, _SNIFF_BYTES)
    kind = detect_payload_type(head)
    params = source.chunking or default_chunking(kind, head)
    offset = spool.seek(0, 2)
    payload_hash = hashlib.sha256()

    def sink(length: int, digest: bytes, codec: int, stored: bytes) -> None:
        spool.write(stored)
        index.add(length, codec, digest, stored)
        if progress is not None:
            progress(length)

    encoder.run(iter_chunks(_Prefixed(head, source.stream), params), sink, payload_hash)
    return _Spooled(source, kind, params, index, payload_hash.hexdigest(), offset)


def _copy(src: BinaryIO, dst: BinaryIO, n: int) -> None:
    while n:
        block = src.read(min(n, _COPY_BLOCK))
        if not block:
            raise BundleError("spool file ended early (was it changed while writing?)")
        dst.write(block)
        n -= len(block)
