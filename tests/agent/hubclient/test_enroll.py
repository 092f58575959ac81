"""Enrollment against the real gateway: once, durably, with one-line refusals and no leaked secret."""

from __future__ import annotations

import json
import logging
import secrets
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from skylift.agent.config import AgentConfig
from skylift.agent.enroll import EnrollmentError, IdentityError, ensure_identity
from skylift.agent.hubclient import HubClient, pinned_files
from skylift.agent.ports import HubUnreachableError
from skylift.device_identity import generate_device_key, private_key_pem
from skylift.fsutil import atomic_write

from .conftest import Hub, closed_port, hub_url, make_config


def _config(hub: Hub, tmp_path: Path, key: str | None, **kwargs: object) -> AgentConfig:
    device_id = str(kwargs.pop("device_id", f"enr-{secrets.token_hex(4)}"))
    url = str(kwargs.pop("url", hub_url(hub)))
    return make_config(
        tmp_path / device_id, url, hub.ca_pem, device_id=device_id, provisioning_key=key,
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def _public(path: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_public(path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_enrolls_then_talks_mutual_tls(hub: Hub, tmp_path: Path) -> None:
    config = _config(hub, tmp_path, hub.provisioning_key())
    identity = ensure_identity(config, now=datetime.now(UTC))
    assert identity.enrolled
    assert identity.poll_interval_s == hub.ctx.config.poll_interval_s
    key_file = config.identity.key_file
    assert key_file is not None
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert _public(config.identity.cert_file) == _key_public(key_file)
    pinned = pinned_files(config)
    image_root = json.loads(pinned.image_root.read_bytes())
    assert image_root["signed"]["_type"] == "root"
    assert image_root == json.loads(hub.image_root)
    assert json.loads(pinned.director_root.read_bytes())["signed"]["_type"] == "root"
    assert pinned.hub_ca.read_bytes() == hub.ca_pem
    with HubClient(config) as client:
        assert client.poll(state="idle", progress=None).changed
        assert client.check(installed_version=None, allow_downgrade=False) is None
    row = hub.device_row(config.identity.device_id)
    assert row.hardware_id == "hw1"
    # Enrolled: the next start uses the files and does not ask the hub again.
    before = config.identity.cert_file.read_bytes()
    again = ensure_identity(config, now=datetime.now(UTC))
    assert not again.enrolled
    assert config.identity.cert_file.read_bytes() == before


def test_reuses_a_key_written_before_a_crash(hub: Hub, tmp_path: Path) -> None:
    config = _config(hub, tmp_path, hub.provisioning_key())
    key_file = config.identity.key_file
    assert key_file is not None
    key_file.parent.mkdir(parents=True)
    atomic_write(key_file, private_key_pem(generate_device_key()), mode=0o600)
    original = key_file.read_bytes()
    identity = ensure_identity(config, now=datetime.now(UTC))
    assert identity.enrolled
    assert key_file.read_bytes() == original
    assert _public(config.identity.cert_file) == _key_public(key_file)


def test_finishes_from_the_saved_answer_after_a_crash(hub: Hub, tmp_path: Path) -> None:
    config = _config(hub, tmp_path, hub.provisioning_key())
    ensure_identity(config, now=datetime.now(UTC))
    cert = config.identity.cert_file.read_bytes()
    # Killed after the answer was saved, before the certificate was written.
    config.identity.cert_file.unlink()
    pinned_files(config).image_root.unlink()
    # The hub would answer 409 now (ids are never reused): no request may be sent.
    offline = _config(
        hub,
        tmp_path,
        "pk_unused",
        device_id=config.identity.device_id,
        url=f"https://127.0.0.1:{closed_port()}",
    )
    identity = ensure_identity(offline, now=datetime.now(UTC))
    assert identity.enrolled
    assert offline.identity.cert_file.read_bytes() == cert
    assert pinned_files(offline).image_root.is_file()


def test_factory_certificate_needs_no_enrollment(hub: Hub, tmp_path: Path) -> None:
    device = hub.enroll()  # the "factory line": certificate and key made elsewhere
    config = _config(hub, tmp_path, None, url=f"https://127.0.0.1:{closed_port()}",
                     device_id=device.device_id)  # fmt: skip
    with pytest.raises(IdentityError, match="no device certificate .* no provisioning key"):
        ensure_identity(config, now=datetime.now(UTC))
    key_file = config.identity.key_file
    assert key_file is not None
    key_file.unlink()  # the failed start made a key; the factory's replaces it
    config.identity.cert_file.parent.mkdir(parents=True, exist_ok=True)
    config.identity.cert_file.write_bytes(device.cert.read_bytes())
    key_file.write_bytes(device.key.read_bytes())
    with pytest.raises(IdentityError, match="pinned TUF root .* is missing"):
        ensure_identity(config, now=datetime.now(UTC))
    pinned = pinned_files(config)
    pinned.directory.mkdir(parents=True, exist_ok=True)
    pinned.image_root.write_text(json.dumps(device.answer["image_root"]))
    pinned.director_root.write_text(json.dumps(device.answer["director_root"]))
    identity = ensure_identity(config, now=datetime.now(UTC))
    assert not identity.enrolled
    with pytest.raises(IdentityError, match="expired"):
        ensure_identity(config, now=datetime.now(UTC) + timedelta(days=20 * 365))


def test_certificate_for_another_device_is_refused(hub: Hub, tmp_path: Path) -> None:
    device = hub.enroll()
    config = _config(hub, tmp_path, None)
    config.identity.cert_file.parent.mkdir(parents=True)
    config.identity.cert_file.write_bytes(device.cert.read_bytes())
    key_file = config.identity.key_file
    assert key_file is not None
    key_file.write_bytes(device.key.read_bytes())
    with pytest.raises(IdentityError, match=f"names {device.device_id}, not"):
        ensure_identity(config, now=datetime.now(UTC))


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("unknown key", r"refused the provisioning key in .*provisioning.key: HTTP 401"),
        ("revoked key", r"refused the provisioning key .* HTTP 401: .*revoked"),
        ("other product", r"does not enroll devices of acme-gw: HTTP 403"),
        ("id taken", r"device id .* is taken on the hub: HTTP 409"),
    ],
)
def test_refusals_are_one_line_without_secrets(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str, error: str
) -> None:
    caplog.set_level(logging.DEBUG)
    device_id = f"enr-{secrets.token_hex(4)}"
    if case == "unknown key":
        secret = "pk_" + secrets.token_hex(16)
    elif case == "revoked key":
        secret = hub.provisioning_key(revoked=True)
    elif case == "other product":
        secret = hub.provisioning_key(product_id=hub.other_product_id)
    else:
        secret = hub.provisioning_key()
        device_id = hub.enroll().device_id
    config = _config(hub, tmp_path, secret, device_id=device_id)
    with pytest.raises(EnrollmentError, match=error) as raised:
        ensure_identity(config, now=datetime.now(UTC))
    line = raised.value.diagnostics()
    assert "\n" not in line
    assert secret not in line
    key_file = config.identity.key_file
    assert key_file is not None
    pem = key_file.read_text()
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert pem.splitlines()[1] not in record.getMessage()
    assert not config.identity.cert_file.exists()


def test_hub_down_is_unreachable(hub: Hub, tmp_path: Path) -> None:
    config = _config(hub, tmp_path, "pk_whatever", url=f"https://127.0.0.1:{closed_port()}")
    with pytest.raises(HubUnreachableError, match="enrollment: cannot reach the hub"):
        ensure_identity(config, now=datetime.now(UTC))
    key_file = config.identity.key_file
    assert key_file is not None and key_file.exists()  # kept for the next try
