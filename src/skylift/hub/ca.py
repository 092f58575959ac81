"""The hub's certificate authority for devices, and the checks on device certificates.

Everything here is a pure function over bytes and ``cryptography`` objects; the
clock is a parameter. Nothing opens a file: callers store the PEMs (private keys
with mode 0600) and hand them back in.

Algorithm: ECDSA P-256 for the CA, the hub's server certificate and the keys
this module generates for devices. Ed25519 would be smaller and simpler, but
TLS client authentication with ed25519 needs TLS 1.3-era stacks (OpenSSL 1.1.1+,
recent mbedTLS, wolfSSL builds with it enabled), while P-256 works with every
TLS stack found on devices, including secure elements (ATECC608, most TPMs and
PKCS#11 tokens only do P-256). Devices that bring their own ed25519 key in a CSR
are accepted all the same.

Identity: a device certificate names its device in a SAN URI
``urn:skylift:device:<device_id>`` (authoritative) and in the subject CN. A
certificate issued here carries only what the hub decides: whatever subject or
extensions a CSR asks for is ignored.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeAlias, TypedDict

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skylift.device_identity import (
    DEVICE_ID,
    DEVICE_URI_PREFIX,
    MAX_CN_CHARS,
    CertificateError,
    DeviceIdError,
    DevicePrivateKey,
    device_subject,
    device_uri,
    generate_device_key,
    hash_for,
    make_csr,
    private_key_pem,
    validate_device_id,
)

__all__ = [
    "DEVICE_ID",
    "DEVICE_URI_PREFIX",
    "MAX_CSR_BYTES",
    "BadCertificateSignatureError",
    "CAInfo",
    "CSRError",
    "CertificateError",
    "CertificateExpiredError",
    "CertificateNotYetValidError",
    "DeviceIdError",
    "DeviceIdentity",
    "DevicePrivateKey",
    "MalformedCertificateError",
    "NotACAError",
    "NotAClientCertificateError",
    "UnknownIssuerError",
    "ca_info",
    "create_ca",
    "device_id_of",
    "fingerprint",
    "generate_device_key",
    "issue_device_cert",
    "issue_server_cert",
    "make_csr",
    "private_key_pem",
    "validate_device_id",
    "verify_device_cert",
]

"""A device certificate's SAN URI is this prefix followed by the device id."""

MAX_CSR_BYTES = 16 * 1024
"""Largest CSR accepted, checked before parsing: a P-256 CSR is under 1 KiB."""


# X.520 upper bound for a common name; longer device ids live only in the SAN.
# Certificates start a little in the past so that a device or peer whose clock
# lags the hub's by a few minutes does not see a fresh certificate as "not yet
# valid". Five minutes is what public CAs and cfssl use.
_BACKDATE = timedelta(minutes=5)

_DEFAULT_CA_LIFETIME = timedelta(days=20 * 365)
_DEFAULT_SERVER_LIFETIME = timedelta(days=397)
# Devices have no renewal path yet and may sit on a shelf for years before their
# first boot, so device certificates outlive typical hardware. Revocation is the
# hub's device registry, not expiry.
_DEFAULT_DEVICE_LIFETIME = timedelta(days=15 * 365)

_CAPrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


# --------------------------------------------------------------------------- errors


class MalformedCertificateError(CertificateError):
    """Bytes that should be a certificate or key do not parse as one."""


class CertificateExpiredError(CertificateError):
    """The certificate's validity ended before the time of the check."""


class CertificateNotYetValidError(CertificateError):
    """The certificate's validity starts after the time of the check."""

    hint = "check the clocks of the hub and the issuer"


class UnknownIssuerError(CertificateError):
    """No trusted CA has the certificate's issuer name."""


class BadCertificateSignatureError(CertificateError):
    """The certificate's signature does not verify with its issuer's key."""


class NotAClientCertificateError(CertificateError):
    """The certificate is not fit for TLS client authentication (a CA, or no clientAuth)."""


class NotACAError(CertificateError):
    """A certificate registered as a CA is not a CA certificate."""


class CSRError(CertificateError):
    """A CSR is oversized, malformed, badly self-signed, or holds a refused key type."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class DeviceIdentity:
    """Who a verified device certificate names, and which CA vouched for it.

    Fingerprints are lowercase SHA-256 hex of the DER encoding.
    """

    device_id: str
    fingerprint: str
    issuer_fingerprint: str
    not_after: datetime


class CAInfo(TypedDict):
    """What a listing of CAs shows about one of them."""

    subject: str
    fingerprint: str
    not_before: datetime
    not_after: datetime


# --------------------------------------------------------------------------- keys and CSRs


# --------------------------------------------------------------------------- issuing


def create_ca(
    common_name: str, *, now: datetime, valid_for: timedelta = _DEFAULT_CA_LIFETIME
) -> tuple[bytes, bytes]:
    """A new self-signed P-256 CA: ``(certificate PEM, unencrypted private key PEM)``.

    ``path_length=0``: this CA signs device and server certificates only, never
    another CA, so a leaked leaf key can never mint certificates.

    Raises:
        CertificateError: ``common_name`` is empty or longer than 64 characters.
        ValueError: ``now`` is not timezone-aware.
    """
    now = _aware(now)
    if not 1 <= len(common_name) <= MAX_CN_CHARS:
        raise CertificateError(f"CA common name must be 1-{MAX_CN_CHARS} characters")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)


def issue_server_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    *,
    hostnames: list[str],
    ips: list[str],
    now: datetime,
    valid_for: timedelta = _DEFAULT_SERVER_LIFETIME,
) -> tuple[bytes, bytes]:
    """A P-256 TLS server certificate for the hub's own endpoints: ``(cert PEM, key PEM)``.

    Raises:
        CertificateError: no names given, a name is not a DNS name or IP address,
            or the CA key does not match the CA certificate.
        MalformedCertificateError: the CA certificate or key does not parse.
        ValueError: ``now`` is not timezone-aware.
    """
    now = _aware(now)
    if not hostnames and not ips:
        raise CertificateError("a server certificate needs at least one hostname or IP address")
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            host.encode("ascii")
        except UnicodeEncodeError:
            raise CertificateError(
                f"hostname {host!r} is not ASCII: give its IDNA (xn--) form"
            ) from None
        names.append(x509.DNSName(host))
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertificateError(f"{ip!r} is not an IP address") from None
    ca_cert, ca_key = _load_ca(ca_cert_pem, ca_key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    cn = (hostnames or ips)[0][:MAX_CN_CHARS]
    builder = _leaf_builder(
        ca_cert,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
        public_key=key.public_key(),
        now=now,
        valid_for=valid_for,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
    ).add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hash_for(ca_key))
    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)


def issue_device_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    csr_pem: bytes,
    *,
    device_id: str,
    now: datetime,
    valid_for: timedelta = _DEFAULT_DEVICE_LIFETIME,
) -> bytes:
    """Sign the key in ``csr_pem`` as device ``device_id``'s TLS client certificate (PEM).

    The CSR only proves possession of the key. Subject, SAN, key usages and
    everything else come from here: CN and SAN URI name ``device_id``, EKU is
    clientAuth only, the serial is 159 random bits. ``not_after`` is capped at
    the CA's own.

    Raises:
        DeviceIdError: ``device_id`` is not of the allowed form.
        CSRError: the CSR is oversized, not a PEM CSR, its self-signature does
            not verify, or its key is not P-256 or ed25519.
        CertificateError: the CA key does not match the CA certificate, or the
            CA is not valid at ``now``.
        MalformedCertificateError: the CA certificate or key does not parse.
        ValueError: ``now`` is not timezone-aware.
    """
    now = _aware(now)
    # Size first: nothing untrusted is parsed before it is known to be small.
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CSRError(f"CSR is {len(csr_pem)} bytes; the limit is {MAX_CSR_BYTES}")
    validate_device_id(device_id)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CSRError("CSR is not a PEM certificate signing request") from None
    public_key = _device_public_key(csr)
    try:
        signature_ok = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):
        signature_ok = False
    if not signature_ok:
        raise CSRError("CSR self-signature does not verify: the request was altered or mis-signed")
    ca_cert, ca_key = _load_ca(ca_cert_pem, ca_key_pem)
    if not ca_cert.not_valid_before_utc <= now <= ca_cert.not_valid_after_utc:
        raise CertificateError("the device CA is not valid now; it cannot issue certificates")
    uri = x509.UniformResourceIdentifier(device_uri(device_id))
    cert = (
        _leaf_builder(
            ca_cert,
            subject=device_subject(device_id),
            public_key=public_key,
            now=now,
            valid_for=valid_for,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        # RFC 5280 4.1.2.6: with an empty subject (ids over 64 characters) the
        # SAN carries the identity and must be critical.
        .add_extension(
            x509.SubjectAlternativeName([uri]),
            critical=len(device_id) > MAX_CN_CHARS,
        )
        .sign(ca_key, hash_for(ca_key))
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- reading and checking


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """Lowercase SHA-256 hex of the certificate's DER encoding.

    ``cert`` is a certificate object or its DER bytes (hashed as given).
    """
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def device_id_of(cert: x509.Certificate | bytes) -> str:
    """The device id a certificate names: its SAN ``urn:skylift:device:`` URI, else its CN.

    ``cert`` is a certificate object or DER bytes.

    Raises:
        DeviceIdError: it names no device, several, SAN and CN disagree, or the
            id is not of the allowed form.
        MalformedCertificateError: ``cert`` bytes do not parse.
    """
    cert = _load_der(cert) if isinstance(cert, bytes) else cert
    from_san: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(DEVICE_URI_PREFIX):
                from_san.add(uri[len(DEVICE_URI_PREFIX) :])
    common_names = {
        str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    }
    if len(from_san) > 1:
        raise DeviceIdError("certificate names several devices in its SAN")
    if len(common_names) > 1:
        raise DeviceIdError("certificate has several common names")
    if from_san and common_names and from_san != common_names:
        raise DeviceIdError("certificate's SAN device URI and common name disagree")
    found = from_san or common_names
    if not found:
        raise DeviceIdError("certificate names no device (no SAN device URI and no common name)")
    return validate_device_id(found.pop())


def verify_device_cert(
    cert_der: bytes, trusted_cas: Sequence[bytes], *, now: datetime
) -> DeviceIdentity:
    """Check that ``cert_der`` is a device client certificate issued directly by a trusted CA.

    ``trusted_cas`` are PEM certificates (a PEM may hold several): the hub's
    device CA and registered signer CAs. Checks: issuer name and signature,
    the leaf is not a CA and has the clientAuth EKU (an absent EKU counts as
    absent: every certificate the hub or a factory issues for a device should
    say what it is for), both leaf and issuer are valid at ``now``, and the
    leaf names exactly one valid device id. Revocation is not checked here:
    that is the device registry's job.

    Raises:
        MalformedCertificateError: ``cert_der`` or a trusted CA does not parse.
        UnknownIssuerError: no trusted CA has the certificate's issuer name.
        BadCertificateSignatureError: no trusted CA of that name signed it.
        NotAClientCertificateError: it is a CA, or lacks the clientAuth EKU.
        CertificateNotYetValidError, CertificateExpiredError: outside its
            validity (or its issuer's) at ``now``.
        DeviceIdError: it names no single valid device id.
        ValueError: ``now`` is not timezone-aware.
    """
    now = _aware(now)
    leaf = _load_der(cert_der)
    cas = [ca for pem in trusted_cas for ca in _load_pems(pem)]
    same_name = [ca for ca in cas if ca.subject == leaf.issuer]
    if not same_name:
        raise UnknownIssuerError(
            f"certificate issuer {leaf.issuer.rfc4514_string()!r} is not a trusted CA"
        )
    issuer = next((ca for ca in same_name if _signed_by(leaf, ca)), None)
    if issuer is None:
        raise BadCertificateSignatureError(
            "certificate signature does not verify with any trusted CA of its issuer name"
        )
    if _is_ca(leaf):
        raise NotAClientCertificateError(
            "certificate is a CA certificate, not a device certificate"
        )
    if ExtendedKeyUsageOID.CLIENT_AUTH not in _ekus(leaf):
        raise NotAClientCertificateError(
            "certificate is not a TLS client certificate (no clientAuth extended key usage)"
        )
    if not _is_ca(issuer):
        raise UnknownIssuerError("certificate's issuer is not a CA certificate")
    for cert, what in ((leaf, "certificate"), (issuer, "issuing CA")):
        if now < cert.not_valid_before_utc:
            raise CertificateNotYetValidError(
                f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}"
            )
        if now > cert.not_valid_after_utc:
            raise CertificateExpiredError(
                f"{what} expired at {cert.not_valid_after_utc.isoformat()}"
            )
    return DeviceIdentity(
        device_id=device_id_of(leaf),
        fingerprint=fingerprint(cert_der),
        issuer_fingerprint=fingerprint(issuer),
        not_after=leaf.not_valid_after_utc,
    )


def ca_info(pem: bytes) -> CAInfo:
    """Subject, fingerprint and validity of a CA certificate; refuses anything that is not a CA.

    Use it to check and list a signer CA before registering it.

    Raises:
        MalformedCertificateError: ``pem`` is not exactly one PEM certificate.
        NotACAError: the certificate lacks BasicConstraints ``ca=True``, or has a
            KeyUsage without keyCertSign.
    """
    certs = _load_pems(pem)
    if len(certs) != 1:
        raise MalformedCertificateError(
            f"expected one CA certificate in the PEM, found {len(certs)}"
        )
    cert = certs[0]
    if not _is_ca(cert):
        subject = cert.subject.rfc4514_string()
        raise NotACAError(f"{subject!r} is not a CA certificate (no BasicConstraints ca=true)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if not usage.key_cert_sign:
            raise NotACAError(
                f"{cert.subject.rfc4514_string()!r} may not sign certificates (no keyCertSign)"
            )
    return CAInfo(
        subject=cert.subject.rfc4514_string(),
        fingerprint=fingerprint(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


# --------------------------------------------------------------------------- helpers


def _aware(now: datetime) -> datetime:
    # A naive datetime would be read as UTC by cryptography but as local time by
    # people; refuse it rather than guess.
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


def _device_public_key(
    csr: x509.CertificateSigningRequest,
) -> ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey:
    try:
        key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError):
        raise CSRError("CSR key is of an unsupported type: use a P-256 or ed25519 key") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return key
        raise CSRError(f"CSR key is on curve {key.curve.name}: use a P-256 or ed25519 key")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CSRError(
                f"CSR key is RSA-{key.key_size}, far too weak: use a P-256 or ed25519 key"
            )
        raise CSRError(f"CSR key is RSA-{key.key_size}; devices must use a P-256 or ed25519 key")
    raise CSRError(f"CSR key type {type(key).__name__} is refused: use a P-256 or ed25519 key")


def _load_ca(ca_cert_pem: bytes, ca_key_pem: bytes) -> tuple[x509.Certificate, _CAPrivateKey]:
    certs = _load_pems(ca_cert_pem)
    if len(certs) != 1:
        raise MalformedCertificateError("the CA certificate PEM must hold exactly one certificate")
    cert = certs[0]
    try:
        key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Never echo the key bytes: they are the CA's secret.
        raise MalformedCertificateError(
            "the CA private key is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise MalformedCertificateError("the CA private key must be an EC or ed25519 key")
    if key.public_key() != cert.public_key():
        raise CertificateError("the CA private key does not match the CA certificate")
    if not _is_ca(cert):
        raise NotACAError("the CA certificate is not a CA certificate (BasicConstraints)")
    return cert, key


def _leaf_builder(
    ca_cert: x509.Certificate,
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    now: datetime,
    valid_for: timedelta,
    eku: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    # A leaf never outlives its CA: verifiers would refuse the tail anyway.
    not_after = min(now + valid_for, ca_cert.not_valid_after_utc)
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()  # type: ignore[arg-type]
        )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())  # 159 random bits
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )


# cryptography parses extensions lazily; these are what a malformed or
# duplicated extension raises. Parsing them at load time keeps every later check
# free of surprises from untrusted bytes.
_PARSE_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def _load_der(der: bytes) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
        _ = cert.extensions
    except _PARSE_ERRORS:
        raise MalformedCertificateError(
            "certificate is not a well-formed DER X.509 certificate"
        ) from None
    return cert


def _load_pems(pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
        for cert in certs:
            _ = cert.extensions
    except _PARSE_ERRORS:
        raise MalformedCertificateError("not a well-formed PEM X.509 certificate") from None
    return certs


def _signed_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []
