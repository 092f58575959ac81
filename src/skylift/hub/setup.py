"""``skylift hub init``: a working hub directory in one step, and loading it back.

A hub directory holds:

    hub.toml                configuration (see skylift.hub.config)
    hub.db                  the embedded SQLite database (unless PostgreSQL is configured)
    objects/                the embedded object store (unless S3 is configured)
    ca/device-ca.pem, .key  the CA that issues device certificates (key 0600)
    ca/server.pem, .key     the certificate of the hub's two TLS endpoints (key 0600)
    keys/online.key         the online key: image snapshot/timestamp, director roles (0600)
    keys/director-root.key  the director's root key (0600; move it offline after init)

Online keys must be usable unattended, so they are stored unencrypted with
mode 0600: whoever reads them can sign timestamps and director metadata, but
never a release (release keys are never on the hub, ADR 0003).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from securesystemslib.signer import CryptoSigner

from skylift.errors import UserInputError
from skylift.fsutil import atomic_write, read_bounded
from skylift.hub import ca
from skylift.hub.auth import hash_password, issue_secret
from skylift.hub.config import CONFIG_NAME, HubConfig, load_config, write_config
from skylift.hub.content import ReleaseContent
from skylift.hub.db.engine import make_engine, session_factory, upgrade
from skylift.hub.db.models import ApiToken, Organisation, Role, User
from skylift.hub.repositories import Director, ImageRepositories
from skylift.hub.storage import open_store
from skylift.hub.web import HubContext
from skylift.trust.keys import (
    MAX_KEY_FILE_BYTES,
    generate_private_key,
    load_private_key,
    private_key_pem,
    signer_for,
)
from skylift.trust.repository import offline_metadata

__all__ = ["InitResult", "init_hub", "open_hub"]

_ONLINE_KEY = "online.key"
_DIRECTOR_ROOT_KEY = "director-root.key"
_PEM_LIMIT = 64 * 1024


@dataclass(frozen=True)
class InitResult:
    """What ``hub init`` made; the token is shown once and never stored."""

    config: HubConfig
    admin_email: str
    admin_password: str | None
    admin_token: str


def _write_key(path: Path) -> CryptoSigner:
    key = generate_private_key()
    atomic_write(path, private_key_pem(key, None), mode=0o600)
    return signer_for(key)


def _load_key(path: Path) -> CryptoSigner:
    return signer_for(load_private_key(read_bounded(path, MAX_KEY_FILE_BYTES, "key"), None))


def init_hub(
    directory: Path,
    *,
    organisation: str,
    admin_email: str,
    admin_password: str | None = None,
    gateway_port: int = 8443,
    api_port: int = 8080,
    hostnames: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1", "::1"),
    database_url: str | None = None,
    storage_url: str | None = None,
    now: datetime | None = None,
) -> InitResult:
    """Create a hub in ``directory`` (which must not be a hub already).

    Raises:
        UserInputError: ``directory`` is a hub already, or an argument is unusable.
    """
    now = now or datetime.now(UTC)
    directory = Path(directory)
    if (directory / CONFIG_NAME).exists():
        raise UserInputError(f"{directory} is a hub already", hint="use another directory")
    if "@" not in admin_email or len(admin_email) > 200:
        raise UserInputError(f"{admin_email!r} is not an email address")
    # Private as a whole: the database holds password and token hashes, keys/ the online keys.
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for sub in ("ca", "keys", "objects"):
        (directory / sub).mkdir(exist_ok=True, mode=0o700)
    write_config(directory, name=organisation, gateway_port=gateway_port, api_port=api_port)
    config = load_config(directory).with_overrides(
        database_url=database_url, storage_url=storage_url
    )

    cert, key = ca.create_ca(f"{organisation} device CA", now=now)
    atomic_write(config.ca_dir / "device-ca.pem", cert)
    atomic_write(config.ca_dir / "device-ca.key", key, mode=0o600)
    server_cert, server_key = ca.issue_server_cert(
        cert, key, hostnames=list(hostnames), ips=list(ips), now=now
    )
    atomic_write(config.ca_dir / "server.pem", server_cert)
    atomic_write(config.ca_dir / "server.key", server_key, mode=0o600)

    online = _write_key(config.keys_dir / _ONLINE_KEY)
    director_root = _write_key(config.keys_dir / _DIRECTOR_ROOT_KEY)
    root, _ = offline_metadata(
        keys={
            "root": [director_root.public_key],
            "targets": [online.public_key],
            "snapshot": [online.public_key],
            "timestamp": [online.public_key],
        },
        thresholds=None,
        signers=[director_root, online],
        now=now,
    )
    ctx = open_hub(config)
    ctx.director.publish_root([root])

    upgrade(config.database_url)
    token = issue_secret("sk")
    with ctx.transaction() as session:
        org = Organisation(name=organisation)
        session.add(org)
        session.flush()
        user = User(
            org_id=org.id,
            email=admin_email.lower(),
            password_hash=hash_password(admin_password) if admin_password else "!",
            role=Role.ADMIN,
        )
        session.add(user)
        session.flush()
        session.add(
            ApiToken(
                org_id=org.id,
                user_id=user.id,
                name=f"{admin_email.lower()} (hub init)",
                role=Role.ADMIN,
                token_hash=token.digest,
                prefix=token.prefix,
            )
        )
    return InitResult(config, admin_email.lower(), admin_password, token.value)


def open_hub(config: HubConfig, *, clock: Callable[[], datetime] | None = None) -> HubContext:
    """The context of an initialised hub directory: database, store, keys, repositories.

    ``clock`` is for tests that move time; the default is the system's UTC clock.
    """
    store = open_store(config.storage_url)
    online = _load_key(config.keys_dir / _ONLINE_KEY)
    clock = clock or (lambda: datetime.now(UTC))

    return HubContext(
        config=config,
        sessions=session_factory(make_engine(config.database_url)),
        store=store,
        images=ImageRepositories(store, online=[online], clock=clock),
        director=Director(store, online=[online], clock=clock),
        content=ReleaseContent(store),
        online_signers=[online],
        device_ca_pem=read_bounded(config.ca_dir / "device-ca.pem", _PEM_LIMIT, "CA"),
        device_ca_key_pem=read_bounded(config.ca_dir / "device-ca.key", _PEM_LIMIT, "CA key"),
        clock=clock,
    )
