"""The bundle format: a signed manifest, then hooks, then each payload's chunks.

Pure: functions take file objects and return typed objects; no I/O of their own.
See docs/bundle-format.md for the byte layout.
"""

from skylift.bundle.errors import (
    BundleError,
    ChunkDigestError,
    CorruptIndexError,
    HardwareMismatchError,
    ManifestError,
    NotABundleError,
    PayloadDigestError,
    PayloadSizeError,
    SectionTooLargeError,
    SignatureError,
    TrailingDataError,
    TruncatedBundleError,
    UnsafePayloadNameError,
    UnsupportedFormatError,
)
from skylift.bundle.format import Limits
from skylift.bundle.manifest import HOOK_PHASES, HookEntry, Manifest, PayloadEntry, check_name
from skylift.bundle.reader import (
    BundleHead,
    ChunkData,
    HookData,
    IndexPageData,
    PayloadEnd,
    PayloadStart,
    read_body,
    read_head,
)
from skylift.bundle.signature import TrustedKeys
from skylift.bundle.writer import (
    HookSource,
    PayloadSource,
    default_chunking,
    detect_payload_type,
    write_bundle,
)

__all__ = [
    "HOOK_PHASES",
    "BundleError",
    "BundleHead",
    "ChunkData",
    "ChunkDigestError",
    "CorruptIndexError",
    "HardwareMismatchError",
    "HookData",
    "HookEntry",
    "HookSource",
    "IndexPageData",
    "Limits",
    "Manifest",
    "ManifestError",
    "NotABundleError",
    "PayloadDigestError",
    "PayloadEnd",
    "PayloadEntry",
    "PayloadSizeError",
    "PayloadSource",
    "PayloadStart",
    "SectionTooLargeError",
    "SignatureError",
    "TrailingDataError",
    "TruncatedBundleError",
    "TrustedKeys",
    "UnsafePayloadNameError",
    "UnsupportedFormatError",
    "check_name",
    "default_chunking",
    "detect_payload_type",
    "read_body",
    "read_head",
    "write_bundle",
]
