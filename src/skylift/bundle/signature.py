"""Signing a manifest with release keys and checking it against trusted keys.

Signatures are made over ``SIGNING_CONTEXT + manifest_bytes`` so that a
manifest signature can never be replayed as a signature over anything else
(TUF metadata in particular) made with the same key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from securesystemslib.signer import Key, Signature, Signer

from skylift.bundle.errors import ManifestError, SignatureError
from skylift.bundle.manifest import canonical_json
from skylift.trust.errors import SignatureThresholdError
from skylift.trust.repository import verify_threshold

__all__ = [
    "SIGNING_CONTEXT",
    "TrustedKeys",
    "decode_signatures",
    "encode_signatures",
    "sign_manifest",
]

SIGNING_CONTEXT = b"skylift-bundle-manifest-v1\x00"
_HEX = re.compile(r"(?:[0-9a-f]{2}){1,512}")
_MAX_SIGNATURES = 32


def sign_manifest(manifest_bytes: bytes, signers: Sequence[Signer]) -> list[Signature]:
    """Sign manifest bytes with each signer (at least one, no key twice)."""
    if not signers:
        raise ValueError("a bundle needs at least one signing key")
    keyids = [s.public_key.keyid for s in signers]
    if len(set(keyids)) != len(keyids):
        raise ValueError("the same key was given twice")
    return [s.sign(SIGNING_CONTEXT + manifest_bytes) for s in signers]


def encode_signatures(signatures: Iterable[Signature]) -> bytes:
    """The signature section: canonical JSON ``{"signatures": [{keyid, sig}, ...]}``."""
    return canonical_json(
        {"signatures": [{"keyid": s.keyid, "sig": s.signature} for s in signatures]}
    )


def decode_signatures(data: bytes) -> list[Signature]:
    """Parse the signature section; it must be canonical, with lowercase hex.

    Raises:
        ManifestError: anything else (so that no bit of it can change unnoticed).
    """
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError("signature section is not valid JSON") from e
    if canonical_json(obj) != data or not isinstance(obj, dict) or set(obj) != {"signatures"}:
        raise ManifestError("signature section is not in canonical form")
    sigs = obj["signatures"]
    if not isinstance(sigs, list) or not 1 <= len(sigs) <= _MAX_SIGNATURES:
        raise ManifestError(f"a bundle carries 1 to {_MAX_SIGNATURES} signatures")
    out = []
    for s in sigs:
        if (
            not isinstance(s, dict)
            or set(s) != {"keyid", "sig"}
            or not all(isinstance(v, str) and _HEX.fullmatch(v) for v in s.values())
        ):
            raise ManifestError("a signature entry is malformed")
        out.append(Signature(s["keyid"], s["sig"]))
    if len({s.keyid for s in out}) != len(out):
        raise ManifestError("two signatures by the same key")
    return out


@dataclass(frozen=True)
class TrustedKeys:
    """The release keys a bundle must be signed by, and how many of them."""

    keys: tuple[Key, ...]
    threshold: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= len(self.keys):
            raise ValueError("threshold must be between 1 and the number of keys")

    def verify(self, manifest_bytes: bytes, signatures: Sequence[Signature]) -> list[str]:
        """Return the key ids whose signatures verify; raise unless they meet the threshold.

        Raises:
            SignatureError: fewer than ``threshold`` trusted keys signed these bytes.
        """
        try:
            return verify_threshold(
                SIGNING_CONTEXT + manifest_bytes, signatures, self.keys, self.threshold
            )
        except SignatureThresholdError as e:
            signed_by = ", ".join(s.keyid[:12] for s in signatures) or "nobody"
            raise SignatureError(f"bundle manifest: {e.message} (signed by key {signed_by})") from e
