"""The agent's hub client against a real hub gateway over mutual TLS on 127.0.0.1.

The hub is the gateway tests' (``tests/hub/gateway/conftest.py``): ``init_hub``,
product ``acme-gw`` with release 1.0.0 (head, index, offsets, pack), uvicorn
over TLS, started once for this package. Only on SQLite: the client sees
HTTP, and the gateway's own tests run it on both databases.

Devices enroll through :func:`skylift.agent.enroll.ensure_identity` (the
real endpoint) with an ``agent.toml`` of their own. :class:`FakeHub` is a
tiny TLS server that misbehaves on purpose: endless answers, 500s, the whole
pack for a range request.
"""

from __future__ import annotations

import http.server
import ipaddress
import secrets
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hub.conftest import _sqlite_template  # noqa: F401 - fixture
from hub.gateway.conftest import PRODUCT, VERSION, Hub, hub  # noqa: F401 - fixtures
from skylift.agent.config import AgentConfig, parse_config
from skylift.agent.enroll import Identity, ensure_identity
from skylift.agent.hubclient import HubClient
from skylift.agent.ports import Offer
from skylift.hub.gateway import invalidate

__all__ = ["PRODUCT", "VERSION", "Agent", "FakeHub", "make_config"]


@pytest.fixture(scope="package")
def hub_database(tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path) -> str:  # noqa: F811
    path = tmp_path_factory.mktemp("agent-hub-db") / "hub.db"
    shutil.copyfile(_sqlite_template, path)
    return f"sqlite:///{path}"


def make_config(
    base: Path,
    url: str,
    ca_pem: bytes,
    *,
    device_id: str,
    hardware_id: str = "hw1",
    product: str = PRODUCT,
    provisioning_key: str | None = None,
    request_timeout_s: int = 5,
    max_metadata_bytes: int = 2 * 1024 * 1024,
    max_ranges_per_request: int = 16,
) -> AgentConfig:
    """An agent.toml for one device under ``base``, parsed."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "hub-ca.pem").write_bytes(ca_pem)
    provisioning = ""
    if provisioning_key is not None:
        (base / "provisioning.key").write_text(provisioning_key + "\n")
        provisioning = 'provisioning_key_file = "provisioning.key"'
    text = f"""
[hub]
url = "{url}"
ca_file = "hub-ca.pem"
request_timeout_s = {request_timeout_s}

[identity]
device_id = "{device_id}"
product = "{product}"
hardware_id = "{hardware_id}"
cert_file = "identity/device.pem"
key_file = "identity/device.key"
{provisioning}

[[slot]]
class = "rootfs"
name = "A"
type = "file"
path = "slots/a.img"
size_bytes = 1048576

[[slot]]
class = "rootfs"
name = "B"
type = "file"
path = "slots/b.img"
size_bytes = 1048576

[bootloader]
kind = "file"

[storage]
state_dir = "state"
max_metadata_bytes = {max_metadata_bytes}

[download]
max_ranges_per_request = {max_ranges_per_request}
"""
    return parse_config(text, source=str(base / "agent.toml"), base_dir=base)


@dataclass
class Agent:
    """One device of the real hub: its config, its identity, and a client."""

    hub: Hub
    config: AgentConfig
    identity: Identity
    client: HubClient

    @property
    def device_id(self) -> str:
        return self.config.identity.device_id

    def assign(self, target: Any) -> None:
        """Make the director name ``target`` (a TargetFile, or None) for this device."""
        self.hub.ctx.director.assign(self.device_id, target)
        invalidate(self.device_id)

    def assign_release(self) -> None:
        self.assign(release_target(self.hub))

    def offer(self, **kwargs: Any) -> Offer:
        offer = self.client.check(installed_version=kwargs.get("installed"), allow_downgrade=False)
        assert offer is not None
        return offer


def release_target(gateway: Hub, product: str = PRODUCT, version: str = VERSION) -> Any:
    return gateway.ctx.images.load(product).target_files[f"{version}.head"]


def hub_url(gateway: Hub) -> str:
    return f"https://127.0.0.1:{gateway.thread.port}"


def new_agent(gateway: Hub, tmp_path: Path, *, hardware_id: str = "hw1", **kwargs: Any) -> Agent:
    device_id = f"agent-{secrets.token_hex(4)}"
    config = make_config(
        tmp_path / device_id, hub_url(gateway), gateway.ca_pem, device_id=device_id,
        hardware_id=hardware_id, provisioning_key=gateway.provisioning_key(), **kwargs,
    )  # fmt: skip
    identity = ensure_identity(config, now=datetime.now(UTC))
    return Agent(gateway, config, identity, HubClient(config))


@pytest.fixture
def agent(hub: Hub, tmp_path: Path) -> Iterator[Agent]:  # noqa: F811
    """A freshly enrolled device (hardware hw1) with nothing assigned."""
    made = new_agent(hub, tmp_path)
    try:
        yield made
    finally:
        made.client.close()


# -- a hub that misbehaves ------------------------------------------------------------------------

ENDLESS_CAP_BYTES = 256 * 1024 * 1024  # a bound on the "endless" stream, far above any cap


def _server_cert(tmp: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake hub")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp / "fake.pem").write_bytes(pem)
    (tmp / "fake.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tmp / "fake.pem", tmp / "fake.key", pem


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        self.server.paths.append(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        mode = self.server.mode
        if mode == "500":
            body = b'{"error": "the hub is having a bad day"}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif mode == "endless":
            self.send_response(206 if self.headers.get("Range") else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            piece = b"x" * 65536
            try:
                for _ in range(ENDLESS_CAP_BYTES // len(piece)):
                    self.wfile.write(piece)
            except OSError:
                pass  # the client cut it: what the test wants
            self.close_connection = True
        elif mode == "whole":  # ignores Range: the whole "pack"
            body = b"p" * 4096
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            raise AssertionError(f"unknown mode {mode}")

    do_GET = _answer
    do_POST = _answer


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    mode = "500"
    paths: list[str]


@dataclass
class FakeHub:
    """A TLS server on 127.0.0.1 that answers every request the way ``mode`` says."""

    server: _Server
    ca_pem: bytes

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.server_address[1]}"

    def set_mode(self, mode: str) -> None:
        self.server.mode = mode

    @property
    def paths(self) -> list[str]:
        return self.server.paths


@pytest.fixture
def fake_hub(tmp_path: Path) -> Iterator[FakeHub]:
    cert, key, pem = _server_cert(tmp_path)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.paths = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FakeHub(server, pem)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
