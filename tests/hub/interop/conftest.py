"""Independent TUF clients against a real hub's gateway (over mutual TLS, on SQLite and PostgreSQL).

The hub is the gateway tests' (``tests/hub/gateway/conftest.py``: ``init_hub``, a
migrated database per backend, uvicorn over TLS on 127.0.0.1), started once
more for this package. Each test gets a :class:`Scenario` of its own: a new
product whose offline root key the test keeps (so it can rotate the image
root), release 1.0.0 published in its image repository, and a device of that
product, enrolled through ``POST /enroll``, whose director repository names
the release. Tampering and expiry stay within the scenario; rotating the
director root changes the root every device shares, so
:class:`DirectorRootKey` remembers its current key.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import TargetFile

from skylift.hub import ca
from skylift.hub.db.models import Product
from skylift.hub.gateway import invalidate
from skylift.trust.keys import generate_private_key, load_private_key, signer_for
from skylift.trust.repository import offline_metadata, sign_next_targets

from ..gateway.conftest import Enrolled, Hub, hub, hub_database  # noqa: F401 - fixtures

VERSION = "1.0.0"
TARGET = f"{VERSION}.head"


@dataclass
class Scenario:
    """One product with one release, and one enrolled device of it."""

    hub: Hub
    product: str
    root_signer: CryptoSigner
    head: bytes
    target: TargetFile
    device: Enrolled


@dataclass
class DirectorRootKey:
    """The director root key of the package's hub: the one ``hub init`` wrote, then rotations'."""

    signer: CryptoSigner


@pytest.fixture(scope="package")
def director_root_key(hub: Hub) -> DirectorRootKey:  # noqa: F811 - the imported fixture
    pem = (hub.ctx.config.keys_dir / "director-root.key").read_bytes()
    return DirectorRootKey(signer_for(load_private_key(pem, None)))


@pytest.fixture
def scenario(hub: Hub) -> Scenario:  # noqa: F811 - the imported fixture
    ctx = hub.ctx
    name = f"interop-{secrets.token_hex(4)}"
    now = datetime.now(UTC)
    root_signer = signer_for(generate_private_key())
    release = signer_for(generate_private_key())
    online = ctx.online_signers[0].public_key
    root, targets = offline_metadata(
        keys={"root": [root_signer.public_key], "targets": [release.public_key],
              "snapshot": [online], "timestamp": [online]},
        thresholds=None, signers=[root_signer, release], now=now,
    )  # fmt: skip
    ctx.images.create(name, root=root, targets=targets)
    head = secrets.token_bytes(64 * 1024)
    custom = {"product": name, "version": VERSION, "hardware_ids": ["hw1"]}
    next_targets = sign_next_targets(
        targets, path=TARGET, content=head, custom=custom,
        signers=[release], root=root, now=now,
    )  # fmt: skip
    target = ctx.images.add_release(name, targets=next_targets, head=head)
    with ctx.sessions.begin() as session:
        product = Product(org_id=hub.org_id, name=name)
        session.add(product)
        session.flush()
        product_id = product.id
    key = ca.generate_device_key()
    device_id = f"{name}-dev"
    body = hub.enroll_body(device_id, key, hub.provisioning_key(product_id=product_id))
    body["product"] = name
    answer = hub.client().post("/enroll", json=body)
    assert answer.status_code == 201, answer.text
    device = hub.write_identity(
        device_id, answer.json()["certificate"].encode(), key, answer.json()
    )
    ctx.director.assign(device_id, target)
    invalidate(device_id)
    return Scenario(hub, name, root_signer, head, target, device)
