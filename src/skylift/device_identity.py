"""What a device holds to prove who it is: its id, its private key, and the CSR it enrolls with.

Shared by the agent (which makes its key and CSR) and the hub's CA (which
checks them and issues certificates): the agent may not import the hub, so
the device's half lives here. Pure functions over ``cryptography`` objects;
nothing opens a file.

P-256 by default: TLS client authentication with it works on every TLS stack
and secure element found on devices (see :mod:`skylift.hub.ca`). A device id
names the device in a SAN URI ``urn:skylift:device:<id>`` and in the subject CN.
"""

from __future__ import annotations

import re
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from skylift.errors import SkyliftError

__all__ = [
    "DEVICE_ID",
    "DEVICE_URI_PREFIX",
    "MAX_CN_CHARS",
    "CertificateError",
    "DeviceIdError",
    "DevicePrivateKey",
    "device_subject",
    "device_uri",
    "generate_device_key",
    "hash_for",
    "make_csr",
    "private_key_pem",
    "validate_device_id",
]

DEVICE_URI_PREFIX = "urn:skylift:device:"
#: A device id: it names the device's director repository in the object store
#: and appears in URLs, file names and log lines, so no ':' or '/'.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: X.509 caps a CN at 64 characters; longer ids live in the SAN URI only.
MAX_CN_CHARS = 64

DevicePrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
"""Private keys a device may hold: P-256 (preferred) or ed25519."""


class CertificateError(SkyliftError):
    """A certificate, CSR or device id cannot be trusted or used."""


class DeviceIdError(CertificateError):
    """A device id is not of the allowed form, or a certificate names no single device."""


def generate_device_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 private key for a device."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: DevicePrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM; the caller stores it with mode 0600."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is 1-128 characters of ``[A-Za-z0-9._-]`` starting alphanumeric.

    The form keeps ids safe in URLs, file names, object-store keys, log lines and URNs.

    Raises:
        DeviceIdError: it is not.
    """
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        shown = repr(device_id) if len(str(device_id)) <= 40 else repr(str(device_id)[:40]) + "..."
        raise DeviceIdError(
            f"invalid device id {shown}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return device_id


def device_uri(device_id: str) -> str:
    """The SAN URI that names ``device_id`` in its certificate."""
    return DEVICE_URI_PREFIX + device_id


def device_subject(device_id: str) -> x509.Name:
    """The subject of ``device_id``'s CSR and certificate: its id as CN when it fits."""
    if len(device_id) > MAX_CN_CHARS:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])


def hash_for(key: DevicePrivateKey) -> hashes.SHA256 | None:
    """The hash to sign with ``key``: none for ed25519, which hashes the message itself."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def make_csr(private_key: DevicePrivateKey, device_id: str) -> bytes:
    """A PEM CSR for ``device_id`` signed by ``private_key``; what an agent sends to enroll.

    The hub ignores the CSR's subject and extensions; they are filled in only so
    that the request describes itself to a human reading it.

    Raises:
        DeviceIdError: ``device_id`` is not of the allowed form.
    """
    validate_device_id(device_id)
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(device_subject(device_id))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_uri(device_id))]),
            critical=False,
        )
    )
    csr = builder.sign(private_key, hash_for(private_key))
    return csr.public_bytes(serialization.Encoding.PEM)
