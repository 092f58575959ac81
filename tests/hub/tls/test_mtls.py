"""Mutual TLS end to end: real certificates, a real uvicorn server on 127.0.0.1, real clients.

Clients use ``ssl`` + ``http.client`` on a socket we wrap ourselves, because
that is the only stdlib way to pass ``session=`` for resumption and to keep a
handle on the connection (httpx cannot resume sessions; one case uses httpx to
show the plain path works with it too).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skylift.hub import ca, tls

TIMEOUT_S = 5.0
HOST = "localhost"
PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca_cert: bytes
    server: Identity
    devices: dict[str, Identity]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    # OpenSSL checks validity against the real clock, so these use it too.
    now = datetime.now(UTC)
    base = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = ca.create_ca("Test Device CA", now=now - timedelta(days=365))
    other_cert, other_key = ca.create_ca("Stranger CA", now=now - timedelta(days=365))

    def store(name: str, cert: bytes, key: bytes) -> Identity:
        (base / f"{name}.pem").write_bytes(cert)
        (base / f"{name}.key").write_bytes(key)
        (base / f"{name}.key").chmod(0o600)
        return Identity(base / f"{name}.pem", base / f"{name}.key")

    def device(name: str, issuer: tuple[bytes, bytes], when: datetime, days: int) -> Identity:
        key = ca.generate_device_key()
        cert = ca.issue_device_cert(
            *issuer,
            ca.make_csr(key, name),
            device_id=name,
            now=when,
            valid_for=timedelta(days=days),
        )
        return store(name, cert, ca.private_key_pem(key))

    server = store(
        "server",
        *ca.issue_server_cert(ca_cert, ca_key, hostnames=[HOST], ips=["127.0.0.1"], now=now),
    )
    devices = {
        "dev-a": device("dev-a", (ca_cert, ca_key), now, 30),
        "dev-b": device("dev-b", (ca_cert, ca_key), now, 30),
        "stranger": device("stranger", (other_cert, other_key), now, 30),
        "expired": device("expired", (ca_cert, ca_key), now - timedelta(days=10), 1),
        "server-cert": server,
    }
    return PKI(ca_cert, server, devices)


async def whoami(request: Request) -> JSONResponse:
    """The app decides: a verified client certificate names a device, no certificate is anonymous."""
    der = tls.client_cert_der(request.scope)
    return JSONResponse(_describe(request, der))


async def whoami_via_proxy(request: Request) -> JSONResponse:
    der = tls.client_cert_from_proxy(request.scope, PROXIES)
    return JSONResponse(_describe(request, der))


def _describe(request: Request, der: bytes | None) -> dict[str, Any]:
    tls_ext = request.scope.get("extensions", {}).get("tls", {})
    return {
        "device": ca.device_id_of(der) if der else "anonymous",
        "client_port": request.scope["client"][1],
        "tls_version": tls_ext.get("tls_version"),
        "cipher_suite": tls_ext.get("cipher_suite"),
    }


APP = Starlette(routes=[Route("/", whoami), Route("/proxied", whoami_via_proxy)])


def _run(pki: PKI, *, require_client_cert: bool) -> Iterator[tls.ServerThread]:
    ctx = tls.server_context(
        pki.server.cert,
        pki.server.key,
        client_cas_pem=pki.ca_cert,
        require_client_cert=require_client_cert,
    )
    server = tls.make_server(APP, host="127.0.0.1", port=0, ssl_context=ctx)
    with tls.ServerThread(server, startup_timeout_s=10, shutdown_timeout_s=5) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(pki: PKI) -> Iterator[tls.ServerThread]:
    yield from _run(pki, require_client_cert=False)


@pytest.fixture(scope="module")
def strict_gateway(pki: PKI) -> Iterator[tls.ServerThread]:
    yield from _run(pki, require_client_cert=True)


class Client:
    """One TLS connection carrying HTTP/1.1 keep-alive requests."""

    def __init__(
        self,
        ctx: ssl.SSLContext,
        port: int,
        *,
        session: ssl.SSLSession | None = None,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.sock = ctx.wrap_socket(raw, server_hostname=HOST, session=session)
        self.http = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT_S)
        self.http.sock = self.sock  # so http.client never opens a plain socket of its own

    def get(self, path: str = "/", headers: dict[str, str] | None = None) -> dict[str, Any]:
        self.http.request("GET", path, headers=headers or {})
        response = self.http.getresponse()
        body = response.read()
        assert response.status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ctx_for(pki: PKI, who: str | None, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ident = pki.devices[who] if who else None
    ctx = tls.client_context(
        pki.ca_cert, ident.cert if ident else None, ident.key if ident else None
    )
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def whoami_once(pki: PKI, who: str | None, port: int) -> str:
    with Client(ctx_for(pki, who), port) as client:
        return str(client.get()["device"])


# --------------------------------------------------------------------------- contexts


@pytest.mark.parametrize(
    ("with_cas", "required", "mode"),
    [
        (True, False, ssl.CERT_OPTIONAL),
        (True, True, ssl.CERT_REQUIRED),
        (False, False, ssl.CERT_NONE),
    ],
    ids=["optional", "required", "no-client-certs"],
)
def test_server_context_settings(
    pki: PKI, with_cas: bool, required: bool, mode: ssl.VerifyMode
) -> None:
    ctx = tls.server_context(
        pki.server.cert,
        pki.server.key,
        client_cas_pem=pki.ca_cert if with_cas else None,
        require_client_cert=required,
    )
    assert ctx.verify_mode == mode
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not ctx.options & ssl.OP_NO_TICKET
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.num_tickets == 1
    assert len(ctx.get_ca_certs()) == (1 if with_cas else 0)


def test_required_client_cert_needs_cas(pki: PKI) -> None:
    with pytest.raises(ValueError, match="client_cas_pem"):
        tls.server_context(
            pki.server.cert, pki.server.key, client_cas_pem=None, require_client_cert=True
        )


# --------------------------------------------------------------------------- who is on the connection


def test_valid_device_cert_names_the_device(pki: PKI, gateway: tls.ServerThread) -> None:
    with httpx.Client(verify=ctx_for(pki, "dev-a"), timeout=TIMEOUT_S) as client:
        body = client.get(f"https://{HOST}:{gateway.port}/").json()
    assert body["device"] == "dev-a"
    assert body["tls_version"] == 0x0304
    assert body["cipher_suite"] in {0x1301, 0x1302, 0x1303}


def test_no_client_cert_is_anonymous(pki: PKI, gateway: tls.ServerThread) -> None:
    assert whoami_once(pki, None, gateway.port) == "anonymous"


@pytest.mark.parametrize("who", ["stranger", "expired", "server-cert"])
def test_untrusted_client_cert_fails_the_handshake(
    pki: PKI, gateway: tls.ServerThread, who: str
) -> None:
    # CERT_OPTIONAL lets a client present nothing, never something bad. In TLS
    # 1.3 the client finishes its side of the handshake before the server
    # judges its certificate, so the refusal shows on the first read. The
    # client sees the connection cut, not the alert naming the reason: asyncio
    # drops the alert OpenSSL wrote (CPython gh-98078, unfixed in 3.11).
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        Client(ctx_for(pki, who), gateway.port) as client,
    ):
        client.get()
    # The server is unharmed and still serves good clients.
    assert whoami_once(pki, "dev-a", gateway.port) == "dev-a"


def test_required_client_cert_refuses_anonymous(pki: PKI, strict_gateway: tls.ServerThread) -> None:
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        Client(ctx_for(pki, None), strict_gateway.port) as client,
    ):
        client.get()
    assert whoami_once(pki, "dev-b", strict_gateway.port) == "dev-b"


def test_sequential_connections_each_see_their_own_identity(
    pki: PKI, gateway: tls.ServerThread
) -> None:
    order = ["dev-a", "dev-b", None, "dev-a", None, "dev-b"]
    seen = [whoami_once(pki, who, gateway.port) for who in order]
    assert seen == [who or "anonymous" for who in order]


def test_keep_alive_requests_all_see_the_cert(pki: PKI, gateway: tls.ServerThread) -> None:
    with Client(ctx_for(pki, "dev-a"), gateway.port) as client:
        bodies = [client.get() for _ in range(5)]
    assert {b["device"] for b in bodies} == {"dev-a"}
    assert len({b["client_port"] for b in bodies}) == 1, "all on one connection"


def test_interleaved_connections_do_not_bleed(pki: PKI, gateway: tls.ServerThread) -> None:
    with (
        Client(ctx_for(pki, "dev-a"), gateway.port) as a,
        Client(ctx_for(pki, "dev-b"), gateway.port) as b,
        Client(ctx_for(pki, None), gateway.port) as anon,
    ):
        for _ in range(3):
            assert a.get()["device"] == "dev-a"
            assert anon.get()["device"] == "anonymous"
            assert b.get()["device"] == "dev-b"


# --------------------------------------------------------------------------- session resumption


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=lambda v: v.name
)
@pytest.mark.parametrize("who", ["dev-a", None], ids=["device", "anonymous"])
def test_resumed_session_keeps_the_identity_of_its_full_handshake(
    pki: PKI, gateway: tls.ServerThread, version: ssl.TLSVersion, who: str | None
) -> None:
    ctx = ctx_for(pki, who, max_version=version)
    with Client(ctx, gateway.port) as first:
        assert first.get()["device"] == (who or "anonymous")
        assert not first.sock.session_reused
        session = first.sock.session  # in TLS 1.3 the ticket arrives with the first response
    assert session is not None and session.has_ticket
    for _ in range(2):
        with Client(ctx, gateway.port, session=session) as again:
            body = again.get()
            assert again.sock.session_reused, "the server should resume the session"
            assert again.sock.version() == version.name.replace("_", ".")
            # The certificate is in the session: a resumed connection is the
            # same device, never anonymous and never another device.
            assert body["device"] == (who or "anonymous")
            session = again.sock.session or session


def test_tls13_ticket_lifetime_and_renewal(pki: PKI, gateway: tls.ServerThread) -> None:
    # OpenSSL's default lifetime, not settable from Python 3.11: 2 h, which
    # outlasts a 15-minute poll interval several times over.
    ctx = ctx_for(pki, "dev-a", max_version=ssl.TLSVersion.TLSv1_3)
    with Client(ctx, gateway.port) as first:
        first.get()
        session = first.sock.session
    assert session is not None
    assert session.ticket_lifetime_hint == 7200
    time.sleep(1.1)  # session times have a resolution of one second
    with Client(ctx, gateway.port, session=session) as again:
        again.get()
        assert again.sock.session_reused
        renewed = again.sock.session
    # Each TLS 1.3 resumption brings a fresh ticket whose lifetime starts anew:
    # a device that keeps polling resumes indefinitely and its certificate is
    # never checked again by TLS. The app must check expiry and revocation.
    assert renewed is not None and renewed.id != session.id
    assert renewed.time > session.time


# --------------------------------------------------------------------------- client certificates forwarded by a proxy


@pytest.fixture(scope="module")
def dev_a_der(pki: PKI) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pki.devices["dev-a"].cert.read_text())


def _scope(peer: tuple[str, int] | None, *headers: tuple[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "client": peer,
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }


def _escaped(pem: str) -> str:
    return quote(pem, safe="")  # what nginx's $ssl_client_escaped_cert sends


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        (("10.1.2.3", 4433), "cert", "cert"),
        (("fd00::7", 4433), "cert", "cert"),
        (("::ffff:10.1.2.3", 4433), "cert", "cert"),
        (("192.0.2.9", 4433), "cert", None),
        (("127.0.0.1", 4433), "cert", None),
        (("::ffff:192.0.2.9", 4433), "cert", None),
        (("10.1.2.3", 4433), None, None),
        (("10.1.2.3", 4433), "", None),
        (None, "cert", None),
        (("/run/hub.sock", 0), "cert", None),
    ],
    ids=[
        "trusted-v4",
        "trusted-v6",
        "trusted-v4-mapped",
        "untrusted-peer",
        "loopback-not-listed",
        "untrusted-v4-mapped",
        "no-header",
        "empty-header",
        "no-peer",
        "unix-socket",
    ],
)
def test_client_cert_from_proxy(
    pki: PKI,
    dev_a_der: bytes,
    peer: tuple[str, int] | None,
    header: str | None,
    expected: str | None,
) -> None:
    headers = []
    if header is not None:
        value = _escaped(pki.devices["dev-a"].cert.read_text()) if header == "cert" else header
        headers.append(("X-Client-Cert", value))
    got = tls.client_cert_from_proxy(_scope(peer, *headers), PROXIES)
    assert got == (dev_a_der if expected == "cert" else None)


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ([("x-client-cert", "a"), ("x-client-cert", "b")], "2 x-client-cert headers"),
        ([("x-client-cert", "not%20a%20cert")], "not a PEM certificate"),
    ],
    ids=["twice", "garbage"],
)
def test_client_cert_from_proxy_refuses_bad_headers(
    headers: list[tuple[str, str]], fragment: str
) -> None:
    with pytest.raises(tls.ForwardedCertificateError) as exc_info:
        tls.client_cert_from_proxy(_scope(("10.0.0.1", 1), *headers), PROXIES)
    assert fragment in str(exc_info.value) and "\n" not in str(exc_info.value)


def test_client_cert_der_without_tls_extension_is_none() -> None:
    assert tls.client_cert_der({"type": "http"}) is None
    assert (
        tls.client_cert_der({"type": "http", "extensions": {"tls": {"client_cert_chain": []}}})
        is None
    )


def test_forged_proxy_header_from_a_direct_client_is_ignored(
    pki: PKI, gateway: tls.ServerThread
) -> None:
    # An anonymous client on 127.0.0.1 (not a trusted proxy) claims dev-a's certificate.
    forged = {"X-Client-Cert": _escaped(pki.devices["dev-a"].cert.read_text())}
    with Client(ctx_for(pki, None), gateway.port) as client:
        assert client.get("/proxied", headers=forged)["device"] == "anonymous"
