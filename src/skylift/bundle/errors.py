"""Exceptions for bundles: all of them mean "do not trust or install this"."""

from __future__ import annotations

from skylift.errors import SkyliftError

__all__ = [
    "BundleError",
    "ChunkDigestError",
    "CorruptIndexError",
    "HardwareMismatchError",
    "ManifestError",
    "NotABundleError",
    "PayloadDigestError",
    "PayloadSizeError",
    "SectionTooLargeError",
    "SignatureError",
    "TrailingDataError",
    "TruncatedBundleError",
    "UnsafePayloadNameError",
    "UnsupportedFormatError",
]


class BundleError(SkyliftError):
    """A bundle is malformed, corrupt, unsigned or not meant for this device."""


class NotABundleError(BundleError):
    """The data does not start with the bundle magic number."""

    hint = "is this a Skylift bundle?"


class UnsupportedFormatError(BundleError):
    """The bundle uses a format version this program does not know."""

    hint = "upgrade skylift, or rebuild the bundle with this version"


class TruncatedBundleError(BundleError):
    """The data ended before the bundle did."""

    hint = "the download or copy is incomplete"


class SectionTooLargeError(BundleError):
    """A section declares a size over the reader's limit."""


class ManifestError(BundleError):
    """The manifest is not valid JSON of the expected shape and values."""


class SignatureError(BundleError):
    """The manifest is not signed by enough of the trusted keys."""

    hint = "check that you verify with the product's release key or root metadata"


class PayloadSizeError(BundleError):
    """A payload holds more or fewer bytes than its manifest declares."""


class PayloadDigestError(BundleError):
    """A payload's bytes do not hash to the digest its manifest declares."""


class HardwareMismatchError(BundleError):
    """The bundle is not compatible with the given hardware id."""


class UnsafePayloadNameError(BundleError):
    """A payload or hook name could escape the directory it is extracted to."""


class TrailingDataError(BundleError):
    """There are bytes after the end of the bundle."""


class ChunkDigestError(BundleError):
    """A chunk does not decode to the bytes its index entry names."""


class CorruptIndexError(BundleError):
    """A payload's chunk index is malformed or does not match its digest."""
