"""Ed25519 keys: generation, (encrypted) PEM files, TUF key objects, signers.

Pure functions over bytes: reading and writing the files is the caller's job.
No function here puts key material into an exception message.
"""

from __future__ import annotations

import hashlib
import json

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, Key, SSlibKey

from skylift.trust.errors import KeyFileError, PassphraseRequiredError, WrongPassphraseError

__all__ = [
    "MAX_KEY_FILE_BYTES",
    "generate_private_key",
    "load_private_key",
    "load_public_key",
    "private_key_pem",
    "public_key_pem",
    "signer_for",
    "tuf_key",
    "tuf_key_id",
]

#: No key file, public or private, is anywhere near this large.
MAX_KEY_FILE_BYTES = 64 * 1024


def generate_private_key() -> Ed25519PrivateKey:
    """Return a new random ed25519 private key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey, passphrase: bytes | None) -> bytes:
    """Serialise ``key`` as PKCS#8 PEM, encrypted with ``passphrase`` unless it is None."""
    encryption: serialization.KeySerializationEncryption
    if passphrase is None:
        encryption = serialization.NoEncryption()
    else:
        if not passphrase:
            raise KeyFileError("an empty passphrase does not protect a key")
        encryption = serialization.BestAvailableEncryption(passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def load_private_key(data: bytes, passphrase: bytes | None) -> Ed25519PrivateKey:
    """Parse a PEM private key written by :func:`private_key_pem`.

    Raises:
        PassphraseRequiredError: the key is encrypted and ``passphrase`` is None.
        WrongPassphraseError: ``passphrase`` does not decrypt it.
        KeyFileError: not a PEM ed25519 private key, or oversized.
    """
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file is larger than {MAX_KEY_FILE_BYTES} bytes")
    encrypted = b"ENCRYPTED" in data
    if encrypted and passphrase is None:
        raise PassphraseRequiredError("the private key is encrypted and no passphrase was given")
    try:
        key = serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except TypeError as e:  # cryptography: password given for an unencrypted key, or missing
        raise KeyFileError("the private key file is not in the expected form") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        if encrypted:
            raise WrongPassphraseError(
                "the passphrase does not decrypt the private key (or the file is damaged)"
            ) from e
        raise KeyFileError("not a PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError("the private key is not an ed25519 key")
    return key


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """Serialise a public key as SubjectPublicKeyInfo PEM."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def tuf_key(key: Ed25519PublicKey) -> SSlibKey:
    """The TUF key for ``key``; its ``keyid`` is TUF's (sha256 of the canonical key)."""
    return SSlibKey.from_crypto(key)


def load_public_key(data: bytes) -> Key:
    """Parse a public key: PEM (as ``skylift keys export-public`` writes) or a TUF key JSON.

    Raises:
        KeyFileError: neither form, not ed25519, or oversized.
    """
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file is larger than {MAX_KEY_FILE_BYTES} bytes")
    if data.lstrip().startswith(b"{"):
        try:
            obj = json.loads(data)
            keyid = obj.pop("keyid")
            key = Key.from_dict(keyid, obj)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise KeyFileError("not a TUF public key document") from e
        if key.keytype != "ed25519":
            raise KeyFileError(f"unsupported key type {key.keytype!r}; expected ed25519")
        if key.keyid != tuf_key_id(key):
            raise KeyFileError("the key id in the key document does not match the key")
        return key
    if b"PRIVATE KEY" in data:
        raise KeyFileError("this is a private key; give the public key")
    try:
        pub = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError("not a PEM public key") from e
    if not isinstance(pub, Ed25519PublicKey):
        raise KeyFileError("the public key is not an ed25519 key")
    return tuf_key(pub)


def tuf_key_id(key: Key) -> str:
    """Recompute the TUF key id of ``key`` (sha256 of its canonical JSON form).

    securesystemslib computes ids only when it builds a key from a public key
    object; recomputing here means a key document cannot carry a false id.
    """
    canonical = encode_canonical(
        {"keytype": key.keytype, "scheme": key.scheme, "keyval": key.keyval}
    )
    assert isinstance(canonical, str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def signer_for(key: Ed25519PrivateKey) -> CryptoSigner:
    """A securesystemslib signer (what python-tuf signs with) for ``key``."""
    return CryptoSigner(key, tuf_key(key.public_key()))
