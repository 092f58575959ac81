"""Reading a bundle from a stream: verify the manifest first, then every chunk.

Works on a non-seekable stream (a pipe, an HTTP body) and keeps one index
page and one chunk in memory at a time, whatever the payload's size. No
byte is handed to the caller before it is verified:

1. :func:`read_head` reads the preamble, the manifest and the signatures;
   :meth:`BundleHead.verify` checks the signatures against trusted keys.
2. :func:`read_body` then yields hooks and chunks, each checked against the
   digests the signed manifest vouches for, and :class:`PayloadEnd` once a
   payload's whole-payload digest matched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import zstandard
from securesystemslib.signer import Signature

from skylift.bundle.errors import (
    BundleError,
    ChunkDigestError,
    CorruptIndexError,
    PayloadDigestError,
    PayloadSizeError,
    TrailingDataError,
    TruncatedBundleError,
)
from skylift.bundle.format import PREAMBLE_SIZE, Limits, unpack_preamble
from skylift.bundle.manifest import HookEntry, Manifest, PayloadEntry
from skylift.bundle.signature import TrustedKeys, decode_signatures
from skylift.chunks import (
    ChunkDataError,
    ChunkEntry,
    ChunkError,
    IndexTotalsError,
    PageChainVerifier,
    decode_chunk,
)
from skylift.chunks.index import PAGE_HEADER_SIZE, parse_page_header

__all__ = [
    "BundleHead",
    "ChunkData",
    "HookData",
    "IndexPageData",
    "PayloadEnd",
    "PayloadStart",
    "ReadStream",
    "read_body",
    "read_head",
]


class ReadStream(Protocol):
    """Anything with ``read(n)``: a file, a pipe, a response body."""

    def read(self, n: int = -1, /) -> bytes: ...


@dataclass
class BundleHead:
    """A bundle's manifest bytes and signatures; the manifest once verified."""

    manifest_bytes: bytes
    signatures: list[Signature]
    signature_bytes: bytes = b""
    verified_by: list[str] = field(default_factory=list)
    _manifest: Manifest | None = None

    @property
    def length(self) -> int:
        """Bytes from the start of the bundle to its first payload: the TUF target.

        Preamble, manifest, signature section and hooks (ADR 0004).

        Raises:
            BundleError: the manifest was not verified.
        """
        return (
            PREAMBLE_SIZE
            + len(self.manifest_bytes)
            + len(self.signature_bytes)
            + sum(h.size for h in self.manifest.hooks)
        )

    @property
    def verified(self) -> bool:
        """True once :meth:`verify` succeeded."""
        return self._manifest is not None

    def verify(self, trusted: TrustedKeys) -> list[str]:
        """Check the signatures, then parse the manifest; return the key ids that signed.

        The manifest's JSON is parsed only after its signature verified.

        Raises:
            SignatureError: not enough trusted keys signed the manifest.
            ManifestError, UnsafePayloadNameError: signed, but invalid.
        """
        signed_by = trusted.verify(self.manifest_bytes, self.signatures)
        self._manifest = Manifest.from_bytes(self.manifest_bytes)
        self.verified_by = signed_by
        return signed_by

    @property
    def manifest(self) -> Manifest:
        """The verified manifest.

        Raises:
            BundleError: :meth:`verify` has not succeeded.
        """
        if self._manifest is None:
            raise BundleError("refusing to use a bundle manifest that was not verified")
        return self._manifest

    def unverified_manifest(self) -> Manifest:
        """Parse the manifest without trusting it: for display only (``inspect``).

        Raises:
            ManifestError, UnsafePayloadNameError: it is invalid.
        """
        return self._manifest or Manifest.from_bytes(self.manifest_bytes)


@dataclass(frozen=True)
class HookData:
    """A hook's verified bytes."""

    hook: HookEntry
    data: bytes


@dataclass(frozen=True)
class PayloadStart:
    """The chunks of ``payload`` follow."""

    payload: PayloadEntry


@dataclass(frozen=True)
class IndexPageData:
    """One verified index page of a payload, as bytes (the hub stores them)."""

    payload: PayloadEntry
    page: bytes


@dataclass(frozen=True)
class ChunkData:
    """One verified chunk of a payload, in order: its content and its stored form."""

    payload: PayloadEntry
    entry: ChunkEntry
    data: bytes
    stored: bytes


@dataclass(frozen=True)
class PayloadEnd:
    """All of ``payload`` was yielded and its whole-payload digest matched."""

    payload: PayloadEntry


Event = HookData | PayloadStart | IndexPageData | ChunkData | PayloadEnd


def _read_exact(stream: ReadStream, n: int, what: str) -> bytes:
    parts = []
    left = n
    while left:
        block = stream.read(left)
        if not block:
            raise TruncatedBundleError(f"bundle ends in the middle of {what}")
        parts.append(block)
        left -= len(block)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_head(stream: ReadStream, *, limits: Limits | None = None) -> BundleHead:
    """Read and parse the preamble, manifest and signature section.

    The manifest is neither parsed nor trusted yet: call
    :meth:`BundleHead.verify` before using it.

    Raises:
        BundleError: (a subclass) for any malformed, truncated or oversized part.
    """
    limits = limits or Limits()
    manifest_len, signatures_len = unpack_preamble(
        _read_exact(stream, PREAMBLE_SIZE, "the preamble"), limits
    )
    manifest_bytes = _read_exact(stream, manifest_len, "the manifest")
    signature_bytes = _read_exact(stream, signatures_len, "the signatures")
    return BundleHead(manifest_bytes, decode_signatures(signature_bytes), signature_bytes)


def read_body(
    stream: ReadStream, head: BundleHead, *, limits: Limits | None = None
) -> Iterator[Event]:
    """Yield the hooks, then each payload's chunks, all verified; then check the end.

    Raises:
        BundleError: the head was not verified, or anything in the body is
            truncated, corrupt, or disagrees with the manifest. Chunk and
            index failures (:class:`~skylift.chunks.ChunkError`) are
            translated to :class:`BundleError` subclasses.
    """
    if not head.verified:
        raise BundleError("refusing to read a bundle whose manifest was not verified")
    limits = limits or Limits()
    for hook in head.manifest.hooks:
        data = _read_exact(stream, hook.size, f"the {hook.phase} hook")
        if hashlib.sha256(data).hexdigest() != hook.sha256:
            raise PayloadDigestError(f"the {hook.phase} hook does not match its digest")
        yield HookData(hook, data)
    decompressor = zstandard.ZstdDecompressor()
    for payload in head.manifest.payloads:
        yield PayloadStart(payload)
        yield from _read_payload(stream, payload, limits, decompressor)
        yield PayloadEnd(payload)
    if stream.read(1):
        raise TrailingDataError("there are bytes after the end of the bundle")


def _read_payload(
    stream: ReadStream,
    payload: PayloadEntry,
    limits: Limits,
    decompressor: zstandard.ZstdDecompressor,
) -> Iterator[IndexPageData | ChunkData]:
    where = f"payload {payload.name!r}"
    chain = PageChainVerifier(
        bytes.fromhex(payload.index.first_page_sha256),
        chunks=payload.chunks,
        payload_length=payload.size,
        max_chunk_bytes=min(limits.max_chunk_bytes, payload.chunking.max_size),
    )
    max_entries = min(limits.max_entries_per_page, payload.index.entries_per_page)
    digest = hashlib.sha256()
    pages = 0
    stored_total = 0
    try:
        while not chain.done:
            if pages == payload.index.pages:
                raise CorruptIndexError(f"{where}: index has more pages than the manifest declares")
            header = _read_exact(stream, PAGE_HEADER_SIZE, f"the index of {where}")
            body = _read_exact(
                stream, parse_page_header(header, max_entries=max_entries), f"the index of {where}"
            )
            pages += 1
            page = chain.accept(header + body)
            yield IndexPageData(payload, header + body)
            stored_hash = hashlib.sha256()
            for entry in page.entries:
                stored = _read_exact(stream, entry.stored_length, f"a chunk of {where}")
                stored_hash.update(stored)
                stored_total += len(stored)
                data = decode_chunk(entry, stored, decompressor)
                digest.update(data)
                yield ChunkData(payload, entry, data, stored)
            # Each chunk above was verified by the digest of its content; this
            # also catches changes a decompressor ignores, so no byte goes unchecked.
            if stored_hash.digest() != page.stored_sha256:
                raise ChunkDigestError(f"{where}: stored chunk bytes differ from the index")
    except ChunkError as e:
        raise _as_bundle_error(e, where) from e
    if pages != payload.index.pages:
        raise CorruptIndexError(f"{where}: index has fewer pages than the manifest declares")
    if stored_total != payload.stored_size:
        raise PayloadSizeError(f"{where}: stored size differs from the manifest")
    if digest.hexdigest() != payload.sha256:
        raise PayloadDigestError(f"{where} does not match its sha256 in the manifest")


def _as_bundle_error(e: ChunkError, where: str) -> BundleError:
    if isinstance(e, IndexTotalsError):
        return PayloadSizeError(f"{where} differs from its declared size: {e.message}")
    if isinstance(e, ChunkDataError):
        return ChunkDigestError(f"{where}: {e.message}")
    return CorruptIndexError(f"{where}: {e.message}")
