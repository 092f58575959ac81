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
from skylift.chunks import DEFAULT_CDC, ChunkingParams, IndexBuilder, encode_chunk, iter_chunks
from skylift.chunks.chunker import Readable
from skylift.chunks.index import ENTRIES_PER_PAGE, ENTRY_SIZE, PAGE_HEADER_SIZE

__all__ = ["HookSource", "PayloadSource", "detect_payload_type", "write_bundle"]

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
    params = source.chunking or DEFAULT_CDC
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
