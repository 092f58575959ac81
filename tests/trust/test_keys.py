"""Ed25519 key files: round trips, every way a key file can be wrong, and key ids."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from securesystemslib.signer import SSlibKey

from skylift.trust.errors import (
    KeyFileError,
    PassphraseRequiredError,
    TrustError,
    WrongPassphraseError,
)
from skylift.trust.keys import (
    MAX_KEY_FILE_BYTES,
    generate_private_key,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
    signer_for,
    tuf_key,
    tuf_key_id,
)

PASSPHRASE = b"correct horse battery staple"


def _raw_public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pem_body(pem: bytes) -> str:
    """The base64 lines of a PEM block, which must never appear in a message."""
    return "".join(line for line in pem.decode().splitlines() if not line.startswith("-----"))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize("passphrase", [PASSPHRASE, None], ids=["encrypted", "plain"])
def test_private_key_pem_round_trip(passphrase):
    key = generate_private_key()
    pem = private_key_pem(key, passphrase)
    assert (b"ENCRYPTED" in pem) == (passphrase is not None)
    loaded = load_private_key(pem, passphrase)
    assert _raw_public(loaded.public_key()) == _raw_public(key.public_key())


def test_public_key_pem_round_trip():
    key = generate_private_key().public_key()
    loaded = load_public_key(public_key_pem(key))
    assert loaded == tuf_key(key)


def test_wrong_passphrase_is_refused_without_leaking():
    pem = private_key_pem(generate_private_key(), PASSPHRASE)
    with pytest.raises(WrongPassphraseError) as info:
        load_private_key(pem, b"not the passphrase")
    text = f"{info.value} {info.value.diagnostics()}"
    assert _pem_body(pem) not in text
    assert "not the passphrase" not in text
    assert PASSPHRASE.decode() not in text


def test_encrypted_key_without_passphrase_needs_one():
    pem = private_key_pem(generate_private_key(), PASSPHRASE)
    with pytest.raises(PassphraseRequiredError) as info:
        load_private_key(pem, None)
    assert info.value.hint
    assert _pem_body(pem) not in info.value.diagnostics()


def test_empty_passphrase_is_refused():
    with pytest.raises(KeyFileError):
        private_key_pem(generate_private_key(), b"")


def _rsa_private_pem(rsa_key):
    return rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _rsa_public_pem(rsa_key):
    return rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ecdsa_public_json(_rsa_key):
    key = SSlibKey.from_crypto(ec.generate_private_key(ec.SECP256R1()).public_key())
    return json.dumps({"keyid": key.keyid, **key.to_dict()}).encode()


def _ed25519_private_pem(_rsa_key):
    return private_key_pem(generate_private_key(), None)


def _oversize_public(_rsa_key):
    pem = public_key_pem(generate_private_key().public_key())
    return pem + b"\n" * (MAX_KEY_FILE_BYTES + 1 - len(pem))


def _oversize_private(_rsa_key):
    pem = private_key_pem(generate_private_key(), None)
    return pem + b"\n" * (MAX_KEY_FILE_BYTES + 1 - len(pem))


@pytest.mark.parametrize(
    ("loader", "make"),
    [
        (load_private_key, lambda _: b"this is not a key"),
        (load_private_key, lambda _: b""),
        (load_private_key, _rsa_private_pem),
        (load_private_key, _oversize_private),
        (load_public_key, lambda _: b"this is not a key"),
        (load_public_key, lambda _: b"{not json"),
        (load_public_key, lambda _: b'{"keyid": "ab"}'),
        (load_public_key, _rsa_public_pem),
        (load_public_key, _ecdsa_public_json),
        (load_public_key, _ed25519_private_pem),
        (load_public_key, _oversize_public),
    ],
    ids=[
        "private-garbage",
        "private-empty",
        "private-rsa",
        "private-oversize",
        "public-garbage",
        "public-broken-json",
        "public-json-without-key",
        "public-rsa",
        "public-json-ecdsa",
        "public-given-a-private-key",
        "public-oversize",
    ],
)
def test_unusable_key_files_are_refused(loader, make, rsa_key):
    data = make(rsa_key)
    args = (data, None) if loader is load_private_key else (data,)
    with pytest.raises(KeyFileError) as info:
        loader(*args)
    assert type(info.value) is KeyFileError
    # No PEM body of what was given may be echoed back.
    if b"-----BEGIN" in data:
        assert _pem_body(data.rstrip(b"\n")) not in info.value.diagnostics()


def test_private_key_given_as_public_does_not_echo_it():
    pem = private_key_pem(generate_private_key(), None)
    with pytest.raises(KeyFileError) as info:
        load_public_key(pem)
    assert "private" in str(info.value)
    assert _pem_body(pem) not in str(info.value)


def test_key_ids_are_tuf_key_ids():
    private = generate_private_key()
    public = private.public_key()
    expected = SSlibKey.from_crypto(public).keyid
    assert len(expected) == 64
    assert tuf_key(public).keyid == expected
    assert tuf_key_id(tuf_key(public)) == expected
    assert load_public_key(public_key_pem(public)).keyid == expected
    assert signer_for(private).public_key.keyid == expected


def test_tuf_key_document_round_trip():
    key = tuf_key(generate_private_key().public_key())
    document = json.dumps({"keyid": key.keyid, **key.to_dict()}).encode()
    assert load_public_key(document) == key


def test_tuf_key_document_with_a_lying_key_id_is_refused():
    key = tuf_key(generate_private_key().public_key())
    other = tuf_key(generate_private_key().public_key())
    document = json.dumps({"keyid": other.keyid, **key.to_dict()}).encode()
    with pytest.raises(KeyFileError, match="key id"):
        load_public_key(document)


def test_signer_signature_verifies_with_loaded_public_key():
    private = generate_private_key()
    signature = signer_for(private).sign(b"payload")
    public = load_public_key(public_key_pem(private.public_key()))
    public.verify_signature(signature, b"payload")


def test_key_errors_are_trust_errors():
    assert issubclass(KeyFileError, TrustError)
    assert issubclass(WrongPassphraseError, KeyFileError)
    assert issubclass(PassphraseRequiredError, KeyFileError)
