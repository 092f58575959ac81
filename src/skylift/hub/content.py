"""Release content on the hub: content-addressed chunks, heads, index pages, packs.

Layout in the object store:

    chunks/<aa>/<sha256>                  one chunk: codec byte + stored bytes
    releases/<product>/<version>/head     the bundle head (the TUF target)
    releases/<product>/<version>/<payload>.index    its chunk index pages
    releases/<product>/<version>/<payload>.index.zst  the same, one zstd frame
    releases/<product>/<version>/<payload>.pack     the payload's chunks, in order
    releases/<product>/<version>/<payload>.offsets  u64 start of each chunk in the pack
    releases/<product>/<version>/<payload>.<old sha256>.delta  a per-pair delta
                                          (skylift.hub.deltas), from the old payload

Chunks are named by the SHA-256 of their content and verified by decoding
before they are stored, so one upload serves every later release that
shares them. A pack is immutable and lets a device fetch what it lacks in
a few HTTP range requests; its offsets table is not signed (a device checks
each chunk against the signed index), only convenient, and agents derive it
from the index since they no longer fetch it (kept for older agents). The
compressed index (:func:`skylift.chunks.compress_index`) is what agents
fetch; they verify the pages they decompress, as ever.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import zstandard

from skylift.bundle import BundleError, Manifest, TrustedKeys, read_head
from skylift.chunks import (
    CODEC_NONE,
    CODEC_ZSTD,
    ChunkEntry,
    ChunkError,
    PageChainVerifier,
    compress_index,
    decode_chunk,
)
from skylift.chunks.index import PAGE_HEADER_SIZE, parse_page_header
from skylift.errors import SkyliftError
from skylift.hub.storage import ObjectStore

__all__ = [
    "MAX_INDEX_BYTES",
    "ContentError",
    "IngestedRelease",
    "ReleaseContent",
    "chunk_key",
    "verify_index",
    "version_segment",
]

_DIGEST = re.compile(r"[0-9a-f]{64}")
_OFFSET = struct.Struct(">Q")
#: 48 MiB of index pages: 1.2 M chunks, a 16 GiB image in 16 KiB chunks.
MAX_INDEX_BYTES = 48 * 1024 * 1024
_MAX_CHUNK_OBJECT = 4 * 1024 * 1024 + 1024 + 1


class ContentError(SkyliftError):
    """Uploaded release content is malformed, inconsistent or incomplete (HTTP 400/409)."""


def version_segment(version: str) -> str:
    """A release version as an object-key segment, reversibly.

    Versions may hold ``+`` and ``~`` (semantic versions, Debian versions);
    keys may not. ``_`` escapes: ``_`` -> ``__``, ``+`` -> ``_p``, ``~`` -> ``_t``.
    """
    return version.replace("_", "__").replace("+", "_p").replace("~", "_t")


def chunk_key(digest: str) -> str:
    """``chunks/<aa>/<sha256>``; raises ContentError for anything but 64 lowercase hex."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ContentError(f"{digest[:80]!r} is not a chunk digest (64 lowercase hex)")
    return f"chunks/{digest[:2]}/{digest}"


@dataclass(frozen=True)
class IngestedRelease:
    """What :meth:`ReleaseContent.ingest` stored and checked."""

    manifest: Manifest
    head: bytes
    signed_by: list[str]
    chunks: int
    stored_bytes: int


class ReleaseContent:
    """Stores and serves release content in ``store``."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._decompressor = zstandard.ZstdDecompressor()

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests among ``digests`` whose chunks the hub does not have, sorted."""
        keys = {chunk_key(d): d for d in digests}
        return sorted(keys[k] for k in self._store.missing(keys))

    def put_chunk(self, digest: str, codec: int, stored: bytes) -> None:
        """Store one chunk after checking that it decodes to content with ``digest``.

        Raises:
            ContentError: unknown codec, oversized, or it does not decode to ``digest``.
        """
        self._check_chunk(digest, codec, stored)
        self._store.put(chunk_key(digest), bytes([codec]) + stored)

    def put_chunks(self, chunks: Sequence[tuple[str, int, bytes]]) -> int:
        """Store the ``(digest, codec, stored)`` chunks the hub lacks, once each; how many.

        Every chunk is checked first (as :meth:`put_chunk` checks one): if one
        is refused, none is stored.

        Raises:
            ContentError: a chunk has an unknown codec, is oversized, or does
                not decode to its digest.
        """
        for digest, codec, stored in chunks:
            self._check_chunk(digest, codec, stored)
        first = {digest: (codec, stored) for digest, codec, stored in reversed(chunks)}
        lacking = self.missing(first)
        for digest in lacking:
            codec, stored = first[digest]
            self._store.put(chunk_key(digest), bytes([codec]) + stored)
        return len(lacking)

    def _check_chunk(self, digest: str, codec: int, stored: bytes) -> None:
        if codec not in (CODEC_NONE, CODEC_ZSTD):
            raise ContentError(f"chunk {digest[:16]}…: unknown codec {codec}")
        if len(stored) + 1 > _MAX_CHUNK_OBJECT:
            raise ContentError(f"chunk {digest[:16]}… is larger than a chunk may be")
        length = len(stored) if codec == CODEC_NONE else _frame_size(stored, digest)
        entry = ChunkEntry(0, length, len(stored), codec, bytes.fromhex(digest))
        try:
            decode_chunk(entry, stored, self._decompressor)
        except ChunkError as e:
            raise ContentError(f"chunk {digest[:16]}…: {e.message}") from e

    def read_chunk(self, digest: str) -> tuple[int, bytes]:
        """(codec, stored bytes) of a stored chunk."""
        data = self._store.get(chunk_key(digest), max_bytes=_MAX_CHUNK_OBJECT)
        return data[0], data[1:]

    @staticmethod
    def _prefix(product: str, version: str) -> str:
        return f"releases/{product}/{version_segment(version)}/"

    def ingest(
        self,
        product: str,
        *,
        head: bytes,
        indexes: dict[str, bytes],
        trusted: TrustedKeys,
    ) -> IngestedRelease:
        """Check and store a release's head, index pages and packs.

        The head must be signed by ``trusted`` (the product's release keys),
        name ``product``, and be exactly a head (nothing after its hooks);
        every payload's index must verify against the manifest, and every
        chunk it names must be stored already (:meth:`put_chunk`).

        Raises:
            ContentError: anything fails; nothing under the release is written then.
        """
        stream = io.BytesIO(head)
        try:
            parsed = read_head(stream)
            signed_by = parsed.verify(trusted)
            if parsed.length != len(head):
                raise ContentError("the head sent is not exactly a bundle head")
        except BundleError as e:
            raise ContentError(f"bundle head refused: {e.message}") from e
        manifest = parsed.manifest
        if manifest.product != product:
            raise ContentError(f"the bundle is for product {manifest.product}, not {product}")
        if set(indexes) != {p.name for p in manifest.payloads}:
            raise ContentError("send one chunk index for each payload of the manifest")
        entries = {
            p.name: verify_index(p.name, indexes[p.name], manifest) for p in manifest.payloads
        }
        needed = {e.hexdigest for es in entries.values() for e in es}
        absent = self.missing(needed)
        if absent:
            raise ContentError(
                f"{len(absent)} chunk(s) are missing, e.g. {absent[0][:16]}…",
                hint="upload them first (skylift release push does)",
            )
        prefix = self._prefix(product, manifest.version)
        stored_total = 0
        for payload in manifest.payloads:
            pack, offsets = self._build_pack(entries[payload.name])
            stored_total += len(pack)
            self._store.put(f"{prefix}{payload.name}.pack", pack)
            self._store.put(f"{prefix}{payload.name}.offsets", offsets)
            self._store.put(f"{prefix}{payload.name}.index", indexes[payload.name])
            self._store.put(
                f"{prefix}{payload.name}.index.zst", compress_index(indexes[payload.name])
            )
        self._store.put(f"{prefix}head", head)
        return IngestedRelease(manifest, head, signed_by, len(needed), stored_total)

    def _build_pack(self, entries: Sequence[ChunkEntry]) -> tuple[bytes, bytes]:
        # Packs hold each chunk object as stored (codec byte + bytes), in index order.
        parts: list[bytes] = []
        offsets = bytearray()
        position = 0
        for e in entries:
            obj = self._store.get(chunk_key(e.hexdigest), max_bytes=_MAX_CHUNK_OBJECT)
            offsets += _OFFSET.pack(position)
            parts.append(obj)
            position += len(obj)
        offsets += _OFFSET.pack(position)
        return b"".join(parts), bytes(offsets)


def _frame_size(stored: bytes, digest: str) -> int:
    try:
        size = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as e:
        raise ContentError(f"chunk {digest[:16]}…: not a zstd frame") from e
    if not 0 < size <= 4 * 1024 * 1024:
        raise ContentError(f"chunk {digest[:16]}…: zstd frame of impossible size")
    return int(size)


def verify_index(name: str, data: bytes, manifest: Manifest) -> list[ChunkEntry]:
    """The entries of payload ``name``'s index pages ``data``, each page checked.

    The chain starts at the manifest's first page digest and must make
    exactly the payload's chunks and bytes, with nothing after its last page.

    Raises:
        ContentError: the pages are oversized, do not verify, or are followed by bytes.
    """
    payload = manifest.payload(name)
    if len(data) > MAX_INDEX_BYTES:
        raise ContentError(f"the index of {name} is larger than {MAX_INDEX_BYTES} bytes")
    chain = PageChainVerifier(
        bytes.fromhex(payload.index.first_page_sha256),
        chunks=payload.chunks,
        payload_length=payload.size,
        max_chunk_bytes=payload.chunking.max_size,
    )
    entries: list[ChunkEntry] = []
    view = memoryview(data)
    pos = 0
    try:
        while not chain.done:
            body = parse_page_header(
                bytes(view[pos : pos + PAGE_HEADER_SIZE]),
                max_entries=payload.index.entries_per_page,
            )
            page = bytes(view[pos : pos + PAGE_HEADER_SIZE + body])
            pos += len(page)
            entries += chain.accept(page).entries
    except ChunkError as e:
        raise ContentError(f"the index of {name} does not verify: {e.message}") from e
    if pos != len(data):
        raise ContentError(f"the index of {name} has bytes after its last page")
    return entries
