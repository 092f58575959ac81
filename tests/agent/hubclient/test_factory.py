"""A factory-certified device (file key) whose signer CA serves every product of its organisation.

Such a CA does not say which product a device is: the agent names its
product and hardware id in headers, and the hub registers the device with
them on its first connection.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from skylift.agent.enroll import ensure_identity
from skylift.agent.hubclient import HubClient, pinned_files
from skylift.device_identity import generate_device_key, make_csr, private_key_pem
from skylift.hub import ca
from skylift.hub.db.models import EnrollmentMethod, SignerCA

from .conftest import Hub, hub_url, make_config


def test_a_device_of_a_signer_ca_for_every_product_names_its_product_and_hardware(
    hub: Hub, tmp_path: Path
) -> None:
    line_cert, line_key = ca.create_ca("every-product line CA", now=datetime.now(UTC))
    row = SignerCA(
        org_id=hub.org_id, product_id=None, name="every-product-line",
        cert_pem=line_cert.decode(), fingerprint=ca.ca_info(line_cert)["fingerprint"],
    )  # fmt: skip
    with hub.ctx.sessions.begin() as session:
        session.add(row)
    hub.state.sync()  # what the sync loop does within a second; also loads it into TLS
    answer = hub.enroll().answer  # the roots a factory image ships

    device_id = f"fac-{secrets.token_hex(4)}"
    config = make_config(
        tmp_path / device_id, hub_url(hub), hub.ca_pem, device_id=device_id, hardware_id="rev-c"
    )
    key = generate_device_key()
    identity = config.identity
    assert identity.key_file is not None
    identity.cert_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(identity.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))
    csr = make_csr(key, device_id)
    identity.cert_file.write_bytes(
        ca.issue_device_cert(line_cert, line_key, csr, device_id=device_id, now=datetime.now(UTC))
    )
    pinned = pinned_files(config)
    pinned.directory.mkdir(parents=True, exist_ok=True)
    pinned.director_root.write_text(json.dumps(answer["director_root"]))
    pinned.image_root.write_text(json.dumps(answer["image_root"]))

    assert not ensure_identity(config, now=datetime.now(UTC)).enrolled
    with HubClient(config) as client:
        assert client.poll(state="idle", progress=None).changed
        assert client.check(installed_version=None, allow_downgrade=False) is None
    device = hub.device_row(device_id)
    assert device.enrolled_via == EnrollmentMethod.SIGNER_CA
    assert device.product_id == hub.product_id
    assert device.hardware_id == "rev-c"
