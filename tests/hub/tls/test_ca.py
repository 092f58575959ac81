"""The hub CA: issuing, reading and checking device certificates, with a fixed clock."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skylift.hub import ca

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
DEVICE = "dev-0001"


@dataclass(frozen=True)
class PKI:
    ca_cert: bytes
    ca_key: bytes
    other_ca_cert: bytes
    other_ca_key: bytes
    # Same subject name as the device CA, different key: an impostor.
    twin_ca_cert: bytes
    twin_ca_key: bytes
    device_key: ec.EllipticCurvePrivateKey
    device_cert: bytes  # PEM

    def issue(self, device_id: str = DEVICE, **kwargs: object) -> bytes:
        """A device certificate (DER) for a fresh key."""
        key = ca.generate_device_key()
        args: dict[str, object] = {"device_id": device_id, "now": NOW, **kwargs}
        pem = ca.issue_device_cert(self.ca_cert, self.ca_key, ca.make_csr(key, device_id), **args)  # type: ignore[arg-type]
        return der(pem)


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki() -> PKI:
    # The CAs are a year old at NOW, so certificates can be issued in the past.
    then = NOW - timedelta(days=365)
    ca_cert, ca_key = ca.create_ca("Skylift Test Device CA", now=then)
    other_cert, other_key = ca.create_ca("Other Fleet CA", now=then)
    twin_cert, twin_key = ca.create_ca("Skylift Test Device CA", now=then)
    key = ca.generate_device_key()
    cert = ca.issue_device_cert(
        ca_cert, ca_key, ca.make_csr(key, DEVICE), device_id=DEVICE, now=NOW
    )
    return PKI(ca_cert, ca_key, other_cert, other_key, twin_cert, twin_key, key, cert)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


# --------------------------------------------------------------------------- the CA


def test_create_ca_is_a_p256_ca_that_signs_certificates_only(pki: PKI) -> None:
    cert = x509.load_pem_x509_certificate(pki.ca_cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.subject == cert.issuer
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > timedelta(days=19 * 365)
    key = serialization.load_pem_private_key(pki.ca_key, password=None)
    assert key.public_key() == cert.public_key()


def test_ca_info_lists_a_ca(pki: PKI) -> None:
    info = ca.ca_info(pki.ca_cert)
    cert = x509.load_pem_x509_certificate(pki.ca_cert)
    assert info == {
        "subject": "CN=Skylift Test Device CA",
        "fingerprint": ca.fingerprint(cert),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
    }


@pytest.mark.parametrize(
    ("make_pem", "error", "fragment"),
    [
        (lambda p: p.device_cert, ca.NotACAError, "not a CA certificate"),
        (lambda p: b"garbage", ca.MalformedCertificateError, "not a well-formed PEM"),
        (lambda p: p.ca_cert + p.other_ca_cert, ca.MalformedCertificateError, "found 2"),
    ],
    ids=["device-cert", "garbage", "two-certs"],
)
def test_ca_info_refuses_what_is_not_one_ca(
    pki: PKI, make_pem: Callable[[PKI], bytes], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error) as exc_info:
        ca.ca_info(make_pem(pki))
    assert fragment in one_line(exc_info.value)


def test_server_cert_names_hosts_and_ips_for_server_auth(pki: PKI) -> None:
    pem, key_pem = ca.issue_server_cert(
        pki.ca_cert,
        pki.ca_key,
        hostnames=["hub.example", "localhost"],
        ips=["127.0.0.1", "::1"],
        now=NOW,
        valid_for=timedelta(days=30),
    )
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.example", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_cert))
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == cert.public_key()


@pytest.mark.parametrize(
    ("hostnames", "ips", "fragment"),
    [
        ([], [], "at least one"),
        (["hub"], ["not-an-ip"], "not an IP address"),
        (["hüb"], [], "IDNA"),
    ],
    ids=["no-names", "bad-ip", "unicode-host"],
)
def test_server_cert_refuses_bad_names(
    pki: PKI, hostnames: list[str], ips: list[str], fragment: str
) -> None:
    with pytest.raises(ca.CertificateError) as exc_info:
        ca.issue_server_cert(pki.ca_cert, pki.ca_key, hostnames=hostnames, ips=ips, now=NOW)
    assert fragment in one_line(exc_info.value)


# --------------------------------------------------------------------------- issuing device certificates


def test_issued_cert_ignores_what_the_csr_asks_for(pki: PKI) -> None:
    key = ca.generate_device_key()
    greedy_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("hub.example"),
                    x509.UniformResourceIdentifier("urn:skylift:device:someone-else"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    pem = ca.issue_device_cert(pki.ca_cert, pki.ca_key, greedy_csr, device_id=DEVICE, now=NOW)
    cert = x509.load_pem_x509_certificate(pem)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert)

    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    assert cert.issuer == ca_cert.subject
    assert cert.public_key() == key.public_key()
    exts = {type(e.value): e for e in cert.extensions}
    assert set(exts) == {
        x509.BasicConstraints,
        x509.KeyUsage,
        x509.ExtendedKeyUsage,
        x509.SubjectKeyIdentifier,
        x509.AuthorityKeyIdentifier,
        x509.SubjectAlternativeName,
    }
    san = exts[x509.SubjectAlternativeName].value
    assert list(san) == [x509.UniformResourceIdentifier(f"urn:skylift:device:{DEVICE}")]
    assert list(exts[x509.ExtendedKeyUsage].value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert exts[x509.BasicConstraints].critical
    assert exts[x509.BasicConstraints].value.ca is False
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert exts[x509.AuthorityKeyIdentifier].value.key_identifier == ca_ski.digest
    assert 0 < cert.serial_number < 2**159
    assert cert.not_valid_before_utc <= NOW < cert.not_valid_after_utc


def test_serials_are_random(pki: PKI) -> None:
    serials = {x509.load_der_x509_certificate(pki.issue()).serial_number for _ in range(4)}
    assert len(serials) == 4


def test_ed25519_device_key_is_accepted(pki: PKI) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = ca.issue_device_cert(
        pki.ca_cert, pki.ca_key, ca.make_csr(key, DEVICE), device_id=DEVICE, now=NOW
    )
    identity = ca.verify_device_cert(der(pem), [pki.ca_cert], now=NOW)
    assert identity.device_id == DEVICE


def test_longest_device_id_lives_in_a_critical_san(pki: PKI) -> None:
    long_id = "d" * 128
    cert_der = pki.issue(long_id)
    cert = x509.load_der_x509_certificate(cert_der)
    assert cert.subject == x509.Name([])  # a CN is at most 64 characters
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    assert ca.verify_device_cert(cert_der, [pki.ca_cert], now=NOW).device_id == long_id


def test_device_cert_never_outlives_its_ca(pki: PKI) -> None:
    cert = x509.load_der_x509_certificate(pki.issue(valid_for=timedelta(days=100 * 365)))
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def _tampered_csr(pki: PKI) -> bytes:
    csr = x509.load_pem_x509_csr(ca.make_csr(ca.generate_device_key(), DEVICE))
    raw = bytearray(csr.public_bytes(serialization.Encoding.DER))
    raw[-1] ^= 0x01  # last byte of the signature
    return x509.load_der_x509_csr(bytes(raw)).public_bytes(serialization.Encoding.PEM)


def _csr_for(key: object) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
        .public_bytes(serialization.Encoding.PEM)
    )


def _oversized_csr(pki: PKI) -> bytes:
    return ca.make_csr(ca.generate_device_key(), DEVICE) + b"\n" * ca.MAX_CSR_BYTES


BAD_CSRS: list[tuple[str, Callable[[PKI], bytes], str]] = [
    ("bad-self-signature", _tampered_csr, "self-signature does not verify"),
    (
        "rsa-1024",
        # A weak key on purpose: the point is that it is refused.
        lambda p: _csr_for(rsa.generate_private_key(public_exponent=65537, key_size=1024)),  # noqa: S505
        "RSA-1024, far too weak",
    ),
    (
        "rsa-2048",
        lambda p: _csr_for(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "RSA-2048; devices must use a P-256 or ed25519 key",
    ),
    (
        "p-384",
        lambda p: _csr_for(ec.generate_private_key(ec.SECP384R1())),
        "curve secp384r1",
    ),
    ("oversized", _oversized_csr, "the limit is 16384"),
    ("garbage", lambda p: b"not a CSR at all", "not a PEM certificate signing request"),
    ("empty", lambda p: b"", "not a PEM certificate signing request"),
    (
        "der-not-pem",
        lambda p: x509.load_pem_x509_csr(
            ca.make_csr(ca.generate_device_key(), DEVICE)
        ).public_bytes(serialization.Encoding.DER),
        "not a PEM certificate signing request",
    ),
    ("certificate-not-csr", lambda p: p.device_cert, "not a PEM certificate signing request"),
]


@pytest.mark.parametrize(
    ("make_csr", "fragment"), [c[1:] for c in BAD_CSRS], ids=[c[0] for c in BAD_CSRS]
)
def test_bad_csr_is_refused(pki: PKI, make_csr: Callable[[PKI], bytes], fragment: str) -> None:
    with pytest.raises(ca.CSRError) as exc_info:
        ca.issue_device_cert(pki.ca_cert, pki.ca_key, make_csr(pki), device_id=DEVICE, now=NOW)
    assert fragment in one_line(exc_info.value)


BAD_IDS = [
    "../x",
    "",
    "a" * 200,
    "has space",
    "-leading-dash",
    ".hidden",
    "dev/1",
    "dév",
    "dev\n1",
    "acme:sensor",
]


@pytest.mark.parametrize("device_id", BAD_IDS, ids=repr)
def test_bad_device_id_is_refused(pki: PKI, device_id: str) -> None:
    csr = ca.make_csr(ca.generate_device_key(), DEVICE)
    with pytest.raises(ca.DeviceIdError) as exc_info:
        ca.issue_device_cert(pki.ca_cert, pki.ca_key, csr, device_id=device_id, now=NOW)
    assert "invalid device id" in one_line(exc_info.value)
    with pytest.raises(ca.DeviceIdError):
        ca.make_csr(ca.generate_device_key(), device_id)


@pytest.mark.parametrize("device_id", ["a", "A1", "dev-0001", "acme.sensor-v2_1", "9" * 128])
def test_good_device_ids(device_id: str) -> None:
    assert ca.validate_device_id(device_id) == device_id


def test_ca_key_must_match_ca_cert(pki: PKI) -> None:
    csr = ca.make_csr(ca.generate_device_key(), DEVICE)
    with pytest.raises(ca.CertificateError) as exc_info:
        ca.issue_device_cert(pki.ca_cert, pki.other_ca_key, csr, device_id=DEVICE, now=NOW)
    assert "does not match" in one_line(exc_info.value)


def test_unreadable_ca_key_is_not_echoed(pki: PKI) -> None:
    broken = pki.ca_key[:-40]
    csr = ca.make_csr(ca.generate_device_key(), DEVICE)
    with pytest.raises(ca.MalformedCertificateError) as exc_info:
        ca.issue_device_cert(pki.ca_cert, broken, csr, device_id=DEVICE, now=NOW)
    text = one_line(exc_info.value)
    assert "PRIVATE KEY-----" not in text and broken[30:60].decode() not in text


def test_expired_ca_issues_nothing(pki: PKI) -> None:
    csr = ca.make_csr(ca.generate_device_key(), DEVICE)
    with pytest.raises(ca.CertificateError, match="not valid now"):
        ca.issue_device_cert(
            pki.ca_cert, pki.ca_key, csr, device_id=DEVICE, now=NOW + timedelta(days=21 * 365)
        )


def test_naive_datetimes_are_refused(pki: PKI) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ca.create_ca("x", now=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        ca.verify_device_cert(der(pki.device_cert), [pki.ca_cert], now=datetime(2030, 1, 1))


# --------------------------------------------------------------------------- reading certificates


def test_device_id_of_and_fingerprint(pki: PKI) -> None:
    cert_der = der(pki.device_cert)
    cert = x509.load_der_x509_certificate(cert_der)
    assert ca.device_id_of(cert) == ca.device_id_of(cert_der) == DEVICE
    assert ca.fingerprint(cert) == ca.fingerprint(cert_der) == hashlib.sha256(cert_der).hexdigest()


def _factory_cert(
    pki: PKI, cn: str | None, uris: list[str], not_after: datetime = NOW + timedelta(days=1)
) -> bytes:
    """A certificate as a factory line might make it, signed by the other CA."""
    issuer = x509.load_pem_x509_certificate(pki.other_ca_cert)
    issuer_key = serialization.load_pem_private_key(pki.other_ca_key, password=None)
    key = ca.generate_device_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=not cn,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.DER)


URN = "urn:skylift:device:"


@pytest.mark.parametrize(
    ("cn", "uris", "expected"),
    [
        ("ACME-000123", [], "ACME-000123"),
        (None, [URN + "acme-7"], "acme-7"),
        ("acme-7", [URN + "acme-7", "https://acme.example/"], "acme-7"),
        ("acme-7", [URN + "acme-8"], "disagree"),
        (None, [URN + "a", URN + "b"], "several devices"),
        (None, ["https://acme.example/"], "names no device"),
        ("Acme Sensor 7", [], "invalid device id"),
    ],
    ids=["cn-only", "san-only", "both-agree", "disagree", "two-uris", "neither", "cn-not-an-id"],
)
def test_device_id_of_factory_certs(
    pki: PKI, cn: str | None, uris: list[str], expected: str
) -> None:
    cert_der = _factory_cert(pki, cn, uris)
    if expected in {"acme-7", "ACME-000123"}:
        assert ca.device_id_of(cert_der) == expected
        return
    with pytest.raises(ca.DeviceIdError) as exc_info:
        ca.device_id_of(cert_der)
    assert expected in one_line(exc_info.value)


# --------------------------------------------------------------------------- verifying device certificates


def test_verify_accepts_a_device_cert(pki: PKI) -> None:
    cert_der = der(pki.device_cert)
    identity = ca.verify_device_cert(cert_der, [pki.other_ca_cert, pki.ca_cert], now=NOW)
    assert identity == ca.DeviceIdentity(
        device_id=DEVICE,
        fingerprint=ca.fingerprint(cert_der),
        issuer_fingerprint=ca.fingerprint(x509.load_pem_x509_certificate(pki.ca_cert)),
        not_after=x509.load_der_x509_certificate(cert_der).not_valid_after_utc,
    )


def test_verify_accepts_a_factory_cert_from_a_signer_ca(pki: PKI) -> None:
    cert_der = _factory_cert(pki, "ACME-000123", [])
    # Both CAs in one PEM bundle, as a signer CA list might be stored.
    identity = ca.verify_device_cert(cert_der, [pki.ca_cert + pki.other_ca_cert], now=NOW)
    assert identity.device_id == "ACME-000123"


def _flip_last_byte(cert_der: bytes) -> bytes:
    return cert_der[:-1] + bytes([cert_der[-1] ^ 0x01])


def _server_cert(pki: PKI) -> bytes:
    pem, _ = ca.issue_server_cert(pki.ca_cert, pki.ca_key, hostnames=["hub"], ips=[], now=NOW)
    return der(pem)


def _twin_signed(pki: PKI) -> bytes:
    key = ca.generate_device_key()
    pem = ca.issue_device_cert(
        pki.twin_ca_cert, pki.twin_ca_key, ca.make_csr(key, DEVICE), device_id=DEVICE, now=NOW
    )
    return der(pem)


REFUSALS: list[
    tuple[str, Callable[[PKI], bytes], Callable[[PKI], list[bytes]], type[Exception], str]
] = [
    (
        "expired",
        lambda p: p.issue(now=NOW - timedelta(days=10), valid_for=timedelta(days=1)),
        lambda p: [p.ca_cert],
        ca.CertificateExpiredError,
        "certificate expired at",
    ),
    (
        "not-yet-valid",
        lambda p: p.issue(now=NOW + timedelta(days=10)),
        lambda p: [p.ca_cert],
        ca.CertificateNotYetValidError,
        "certificate is not valid before",
    ),
    (
        "other-ca",
        lambda p: der(p.device_cert),
        lambda p: [p.other_ca_cert],
        ca.UnknownIssuerError,
        "is not a trusted CA",
    ),
    (
        "no-cas",
        lambda p: der(p.device_cert),
        lambda p: [],
        ca.UnknownIssuerError,
        "is not a trusted CA",
    ),
    (
        "same-name-other-key",
        _twin_signed,
        lambda p: [p.ca_cert],
        ca.BadCertificateSignatureError,
        "does not verify",
    ),
    (
        "tampered-signature",
        lambda p: _flip_last_byte(der(p.device_cert)),
        lambda p: [p.ca_cert],
        ca.BadCertificateSignatureError,
        "does not verify",
    ),
    (
        "tampered-subject",
        lambda p: der(p.device_cert).replace(DEVICE.encode(), b"dev-0002"),
        lambda p: [p.ca_cert],
        ca.BadCertificateSignatureError,
        "does not verify",
    ),
    (
        "ca-as-client",
        lambda p: der(p.ca_cert),
        lambda p: [p.ca_cert],
        ca.NotAClientCertificateError,
        "is a CA certificate",
    ),
    (
        "server-cert-as-client",
        _server_cert,
        lambda p: [p.ca_cert],
        ca.NotAClientCertificateError,
        "no clientAuth",
    ),
    (
        "garbage",
        lambda p: b"\x30\x03\x02\x01\x00",
        lambda p: [p.ca_cert],
        ca.MalformedCertificateError,
        "not a well-formed DER",
    ),
    (
        "pem-not-der",
        lambda p: p.device_cert,
        lambda p: [p.ca_cert],
        ca.MalformedCertificateError,
        "not a well-formed DER",
    ),
    (
        "garbage-ca",
        lambda p: der(p.device_cert),
        lambda p: [b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
        ca.MalformedCertificateError,
        "not a well-formed PEM",
    ),
]


@pytest.mark.parametrize(
    ("make_cert", "make_cas", "error", "fragment"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_verify_refuses(
    pki: PKI,
    make_cert: Callable[[PKI], bytes],
    make_cas: Callable[[PKI], list[bytes]],
    error: type[Exception],
    fragment: str,
) -> None:
    with pytest.raises(error) as exc_info:
        ca.verify_device_cert(make_cert(pki), make_cas(pki), now=NOW)
    assert type(exc_info.value) is error
    assert fragment in one_line(exc_info.value)


def test_verify_refuses_a_cert_whose_ca_expired(pki: PKI) -> None:
    ca_expiry = x509.load_pem_x509_certificate(pki.other_ca_cert).not_valid_after_utc
    # A factory line may issue past its CA's end; the hub caps its own leaves.
    cert_der = _factory_cert(pki, "acme-7", [], not_after=ca_expiry + timedelta(days=365))
    later = ca_expiry + timedelta(days=1)
    with pytest.raises(ca.CertificateExpiredError) as exc_info:
        ca.verify_device_cert(cert_der, [pki.other_ca_cert], now=later)
    assert one_line(exc_info.value).startswith("issuing CA expired at")
