"""The bundle's fixed framing: magic number, format version, section sizes, limits."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from skylift.bundle.errors import (
    NotABundleError,
    SectionTooLargeError,
    UnsupportedFormatError,
)
from skylift.bundle.manifest import FORMAT_VERSION
from skylift.chunks import MAX_CHUNK_BYTES

__all__ = ["MAGIC", "PREAMBLE_SIZE", "Limits", "pack_preamble", "unpack_preamble"]

# PNG-style: a high byte and CR LF ^Z LF catch 7-bit and text-mode transfers.
MAGIC = b"\x89SKY\r\n\x1a\n"
_PREAMBLE = struct.Struct(">8sIII")
PREAMBLE_SIZE = _PREAMBLE.size


@dataclass(frozen=True)
class Limits:
    """What a reader accepts before it refuses to read further.

    Every size read from a bundle is checked against one of these before any
    memory is allocated for it.
    """

    max_manifest_bytes: int = 1 << 20
    max_signature_bytes: int = 64 << 10
    max_entries_per_page: int = 65536
    max_chunk_bytes: int = MAX_CHUNK_BYTES


def pack_preamble(manifest_len: int, signatures_len: int) -> bytes:
    """The first bytes of every bundle."""
    return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, manifest_len, signatures_len)


def unpack_preamble(data: bytes, limits: Limits) -> tuple[int, int]:
    """Check magic, version and section sizes; return (manifest_len, signatures_len).

    Raises:
        NotABundleError, UnsupportedFormatError, SectionTooLargeError.
    """
    magic, version, manifest_len, signatures_len = _PREAMBLE.unpack(data)
    if magic != MAGIC:
        raise NotABundleError("not a Skylift bundle (wrong magic number)")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"bundle format version {version} is not supported (this skylift reads "
            f"version {FORMAT_VERSION})"
        )
    if not 0 < manifest_len <= limits.max_manifest_bytes:
        raise SectionTooLargeError(
            f"bundle manifest declares {manifest_len} bytes; the limit is "
            f"{limits.max_manifest_bytes}"
        )
    if not 0 < signatures_len <= limits.max_signature_bytes:
        raise SectionTooLargeError(
            f"bundle signature section declares {signatures_len} bytes; the limit is "
            f"{limits.max_signature_bytes}"
        )
    return manifest_len, signatures_len
