"""Exceptions of the trust core: keys, signatures and TUF metadata."""

from __future__ import annotations

from skylift.errors import SkyliftError

__all__ = [
    "InsufficientSignaturesError",
    "KeyFileError",
    "MetadataError",
    "PassphraseRequiredError",
    "RepositoryError",
    "SignatureThresholdError",
    "TrustError",
    "WrongPassphraseError",
]


class TrustError(SkyliftError):
    """Something about keys, signatures or metadata cannot be trusted or used."""


class KeyFileError(TrustError):
    """A key file is malformed, of the wrong type, or cannot be opened."""


class PassphraseRequiredError(KeyFileError):
    """The private key is encrypted and no passphrase was given."""

    hint = "set SKYLIFT_KEY_PASSPHRASE or run interactively to be prompted"


class WrongPassphraseError(KeyFileError):
    """The passphrase does not decrypt the private key."""


class RepositoryError(TrustError):
    """A TUF repository cannot be built, loaded or changed as asked."""


class InsufficientSignaturesError(RepositoryError):
    """Fewer valid signatures than a role's threshold were available."""


class MetadataError(TrustError):
    """Untrusted TUF metadata is malformed, oversized or of the wrong type."""


class SignatureThresholdError(MetadataError):
    """Fewer distinct valid signatures than the role's threshold: do not trust the payload."""
