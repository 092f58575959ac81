"""A device whose key lives in a PKCS#11 token, against the real gateway over mutual TLS.

The token is SoftHSM2 (``tests/agent/softhsm.py``); its keys were generated
in it and cannot leave it, so every handshake below is signed inside the
token. The factory case goes through a signer CA registered for the product;
the enrollment case sends a CSR signed in the token.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from skylift.agent.config import AgentConfig
from skylift.agent.enroll import IdentityError, ensure_identity
from skylift.agent.hubclient import HubClient, pinned_files
from skylift.agent.pkcs11 import load_key
from skylift.hub import ca
from skylift.hub.db.models import EnrollmentMethod, SignerCA
from skylift.hub.gateway import invalidate

from ..softhsm import Token, softhsm_token
from .conftest import VERSION, Hub, closed_port, hub_url, make_config, release_target


@pytest.fixture
def token(tmp_path_factory: pytest.TempPathFactory) -> Token:
    return softhsm_token(tmp_path_factory)


@pytest.fixture(scope="module")
def signer(hub: Hub) -> tuple[bytes, bytes]:
    """A factory line's CA, registered at the hub for the product (as ``signer-ca add`` does)."""
    cert, key = ca.create_ca("token line CA", now=datetime.now(UTC))
    row = SignerCA(
        org_id=hub.org_id, product_id=hub.product_id, name="token-line",
        cert_pem=cert.decode(), fingerprint=ca.ca_info(cert)["fingerprint"],
    )  # fmt: skip
    with hub.ctx.sessions.begin() as session:
        session.add(row)
    hub.state.sync()  # what the sync loop does within a second; also loads it into TLS
    return cert, key


@pytest.fixture(scope="module")
def roots(hub: Hub) -> dict[str, object]:
    """The two TUF roots a factory image ships (taken from one enrollment answer)."""
    answer = hub.enroll().answer
    return {"director": answer["director_root"], "image": answer["image_root"]}


def _config(hub: Hub, tmp_path: Path, token: Token, uri: str, **kwargs: object) -> AgentConfig:
    device_id = f"tok-{secrets.token_hex(4)}"
    config = make_config(
        tmp_path / device_id, str(kwargs.pop("url", hub_url(hub))), hub.ca_pem,
        device_id=device_id, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    identity = replace(config.identity, key_file=None, pkcs11_uri=uri, pkcs11_module=token.module)
    return replace(config, identity=identity)


def _factory_image(
    config: AgentConfig, roots: dict[str, object], cert_pem: bytes
) -> dict[str, bytes]:
    """Write what the factory line puts on the device; return every file under it."""
    config.identity.cert_file.parent.mkdir(parents=True, exist_ok=True)
    config.identity.cert_file.write_bytes(cert_pem)
    pinned = pinned_files(config)
    pinned.directory.mkdir(parents=True, exist_ok=True)
    pinned.director_root.write_text(json.dumps(roots["director"]))
    pinned.image_root.write_text(json.dumps(roots["image"]))
    return _files(config)


def _files(config: AgentConfig) -> dict[str, bytes]:
    base = config.identity.cert_file.parents[1]
    return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def _issue(signer: tuple[bytes, bytes], token: Token, key: str, device_id: str) -> bytes:
    """The factory line: the token signs a CSR, the signer CA certifies its key."""
    with load_key(token.uri(key), module=token.module) as token_key:
        csr = token_key.make_csr(device_id)
    return ca.issue_device_cert(*signer, csr, device_id=device_id, now=datetime.now(UTC))


def _spki(cert_pem: bytes) -> bytes:
    return (
        x509.load_pem_x509_certificate(cert_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_factory_certificate_and_token_key_talk_mutual_tls(
    hub: Hub, tmp_path: Path, token: Token, signer: tuple[bytes, bytes], roots: dict[str, object]
) -> None:
    config = _config(hub, tmp_path, token, token.uri("factory"))
    device_id = config.identity.device_id
    _factory_image(config, roots, _issue(signer, token, "factory", device_id))
    identity = ensure_identity(config, now=datetime.now(UTC))
    assert (identity.enrolled, identity.key_file) == (False, None)
    with HubClient(config) as client:
        assert client.poll(state="idle", progress=None).changed
        assert client.check(installed_version=None, allow_downgrade=False) is None
        row = hub.device_row(device_id)
        assert (row.enrolled_via, row.product_id) == (EnrollmentMethod.SIGNER_CA, hub.product_id)
        hub.ctx.director.assign(device_id, release_target(hub))
        invalidate(device_id)
        offer = client.check(installed_version=None, allow_downgrade=False)
        assert offer is not None and offer.version == VERSION
        assert client.fetch_head(offer) == hub.head
    assert not any(b"PRIVATE KEY" in data for data in _files(config).values())


def test_enrolls_with_a_csr_signed_in_the_token(hub: Hub, tmp_path: Path, token: Token) -> None:
    config = _config(
        hub, tmp_path, token, token.uri("enroll"), provisioning_key=hub.provisioning_key()
    )
    identity = ensure_identity(config, now=datetime.now(UTC))
    assert (identity.enrolled, identity.key_file) == (True, None)
    with load_key(token.uri("enroll"), module=token.module) as key:
        assert _spki(config.identity.cert_file.read_bytes()) == key.public_key_der
    assert hub.device_row(config.identity.device_id).enrolled_via == EnrollmentMethod.PROVISIONING
    with HubClient(config) as client:
        assert client.poll(state="idle", progress=None).changed
        assert client.check(installed_version=None, allow_downgrade=False) is None
    # Enrolled: the next start uses the certificate and asks the hub nothing.
    offline = replace(config, hub=replace(config.hub, url=f"https://127.0.0.1:{closed_port()}"))
    assert not ensure_identity(offline, now=datetime.now(UTC)).enrolled
    assert not any(b"PRIVATE KEY" in data for data in _files(config).values())


def _another_key_cert(signer: tuple[bytes, bytes], device_id: str) -> bytes:
    csr = ca.make_csr(ca.generate_device_key(), device_id)
    return ca.issue_device_cert(*signer, csr, device_id=device_id, now=datetime.now(UTC))


REFUSALS = [
    ("wrong PIN", "locked", "the token refused the PIN for pkcs11:token=locked"),
    ("missing object", "nope", "no private key matches pkcs11:token=skylift;object=nope"),
    ("missing module", "factory", "the PKCS#11 module .*no-such-module.so does not exist"),
    ("certificate for another key", "factory", "is not for the (device|token) key"),
]


@pytest.mark.parametrize(("case", "key", "said"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_one_line_and_change_nothing(
    hub: Hub,
    tmp_path: Path,
    token: Token,
    signer: tuple[bytes, bytes],
    roots: dict[str, object],
    case: str,
    key: str,
    said: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    uri = token.locked_uri("wrong-pin-456") if key == "locked" else token.uri(key)
    config = _config(hub, tmp_path, token, uri, provisioning_key=hub.provisioning_key())
    device_id = config.identity.device_id
    if case == "missing module":
        missing = tmp_path / "no-such-module.so"
        config = replace(config, identity=replace(config.identity, pkcs11_module=missing))
    if case == "certificate for another key":
        cert = _another_key_cert(signer, device_id)
    else:
        cert = _issue(signer, token, "factory", device_id)
    before = _factory_image(config, roots, cert)
    for attempt in (
        lambda: ensure_identity(config, now=datetime.now(UTC)),
        lambda: HubClient(config),
    ):
        with pytest.raises(IdentityError, match=said) as refused:
            attempt()
        line = refused.value.diagnostics()
        assert "\n" not in line and refused.value.hint, line
        assert _files(config) == before
    out, err = capfd.readouterr()
    for secret in (token.pin, token.locked_pin, "wrong-pin-456"):
        assert secret not in caplog.text + out + err + line
    # No certificate at all: enrollment is not tried with a token that cannot sign.
    config.identity.cert_file.unlink()
    before = _files(config)
    if case != "certificate for another key":
        with pytest.raises(IdentityError, match=said):
            ensure_identity(config, now=datetime.now(UTC))
        assert _files(config) == before
