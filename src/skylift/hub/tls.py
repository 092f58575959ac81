"""TLS for the hub: SSL contexts, and a uvicorn server that shows the app who the client is.

uvicorn does not pass the TLS client certificate to the ASGI app. Here a
subclass of its HTTP protocol (httptools when installed, else h11) reads the
peer certificate once per connection, right after the handshake, and puts it
in every request scope of that connection as the ASGI TLS extension
(``scope["extensions"]["tls"]``, see
https://asgi.readthedocs.io/en/latest/specs/tls.html). Apps read it with
:func:`client_cert_der`. Behind a TLS-terminating proxy, :func:`client_cert_from_proxy`
reads the certificate the proxy forwards in a header, trusted only from the
proxy's own addresses.

TLS 1.3 resumption and client certificates (checked by ``tests/hub/tls``, with
CPython 3.11 and OpenSSL 3.0):

- A resumed connection carries the client certificate of the handshake that
  created the session: OpenSSL stores the peer certificate in the session, and
  the server's stateless ticket serialises the session, so
  ``getpeercert(binary_form=True)`` returns the original device's certificate
  on the resumed connection. No cache of ours is needed, and a resumed session
  can only ever name the device that did the full handshake.
- The chain is *not* re-verified on resumption, and in TLS 1.3 OpenSSL gives
  every resumed connection a fresh ticket whose lifetime starts anew, with no
  cap on the whole chain (RFC 8446 4.6.1 recommends one; Python cannot set
  it). A device that polls more often than the ticket lifetime resumes for as
  long as the process lives, on a certificate checked once. A certificate
  that expired, a signer CA removed, or a device revoked since then still
  resumes. The app must therefore check revocation, and expiry (with
  :func:`skylift.hub.ca.verify_device_cert` at the current time, cached by
  fingerprint), on the identity it gets here; the handshake alone is not
  enough.
- A session made without a client certificate (enrollment) resumes without
  one: TLS 1.3 forbids a certificate request in a resumed handshake. Agents
  must not reuse an anonymous session after they get their certificate.

A refused client certificate fails the handshake, but on CPython 3.11 the
client sees only the connection closing, not the TLS alert naming the reason:
asyncio drops the alert OpenSSL wrote (CPython gh-98078, fixed upstream later).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # uvicorn[standard]: C parser; h11 (pure Python) is the fallback
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - depends on what is installed
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from skylift.hub.ca import CertificateError

__all__ = [
    "DEFAULT_CLIENT_CERT_HEADER",
    "ForwardedCertificateError",
    "ServerThread",
    "TLSExtensionH11Protocol",
    "TLSExtensionHttpToolsProtocol",
    "client_cert_der",
    "client_cert_from_proxy",
    "client_context",
    "make_server",
    "serve",
    "server_context",
    "tls_extension",
]

DEFAULT_CLIENT_CERT_HEADER = "x-client-cert"
"""Header a TLS proxy puts the verified client certificate in (URL-encoded PEM,
as nginx's ``$ssl_client_escaped_cert``)."""

# Forward secrecy and AEAD only, for TLS 1.2 peers; TLS 1.3 suites are all fine
# and are configured separately by OpenSSL. Both of these are what mbedTLS,
# wolfSSL and OpenSSL on devices offer for ECDSA P-256 certificates.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

# One ticket per full handshake: agents poll one connection at a time and keep
# only the newest ticket (Python's SSLSocket.session does too); OpenSSL's
# default of two only helps clients that open parallel connections.
_TICKETS_PER_HANDSHAKE = 1

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class ForwardedCertificateError(CertificateError):
    """A trusted proxy forwarded a client certificate header that cannot be used."""

    hint = "check the proxy's client certificate header configuration"


# --------------------------------------------------------------------------- contexts


def server_context(
    cert_pem_path: str | os.PathLike[str],
    key_pem_path: str | os.PathLike[str],
    *,
    client_cas_pem: bytes | None,
    require_client_cert: bool,
) -> ssl.SSLContext:
    """The hub's TLS server context: TLS 1.2 or 1.3 (1.3 preferred), ECDHE + AEAD only.

    ``client_cas_pem`` holds the CAs a client certificate may chain to (the
    device CA and the registered signer CAs, concatenated PEM). With
    ``require_client_cert`` the handshake fails without one (CERT_REQUIRED);
    otherwise a client may present none and the app decides (CERT_OPTIONAL,
    as enrollment needs), but a certificate that is presented and fails
    verification always fails the handshake. ``client_cas_pem=None`` asks for
    no client certificate at all (management API, dashboard).

    Renegotiation is refused, so the certificate a connection starts with is
    the one it keeps. The CAs are trust anchors even if they are intermediates
    (``VERIFY_X509_PARTIAL_CHAIN``), so an operator can register a factory CA
    that sits under a corporate root without trusting the whole root.
    ``VERIFY_X509_STRICT`` refuses malformed certificates outright.

    Session resumption: tickets are on (one per full handshake). What Python
    3.11's ``ssl`` lets us set and what it does not:

    - ``num_tickets`` (TLS 1.3 only) is exposed and set to 1.
    - The ticket and session lifetime (``SSL_CTX_set_timeout``) is *not*
      exposed. OpenSSL's default for TLS is 7200 s, sent to clients as the
      ticket lifetime hint. That covers an agent polling every 15 minutes
      several times over, and with TLS 1.3 each resumed connection gets a
      fresh ticket, so a steadily polling device keeps resuming.
    - The ticket encryption keys (``SSL_CTX_set_tlsext_ticket_keys``) are not
      exposed either: each context makes random keys and never rotates them.
      Tickets die with the context (a process restart), and another hub
      process cannot resume them. Behind a load balancer, route a device to
      the same process, or terminate TLS at a proxy that shares ticket keys
      (nginx ``ssl_session_ticket_key``). Rebuilding the context (a restart)
      is also how keys are rotated.
    - Loading more CAs into a live context (``load_verify_locations``) takes
      effect on the next full handshake; removing one needs a new context.

    Raises:
        ValueError: ``require_client_cert`` without ``client_cas_pem``.
        ssl.SSLError, OSError: the certificate or key file cannot be loaded.
    """
    if require_client_cert and not client_cas_pem:
        raise ValueError("require_client_cert needs client_cas_pem")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.load_cert_chain(cert_pem_path, key_pem_path)
    ctx.options &= ~ssl.OP_NO_TICKET
    # The app learns the client certificate once per connection, after the
    # first handshake. A TLS 1.2 renegotiation could change it mid-connection,
    # so refuse renegotiation (TLS 1.3 has none; post-handshake auth is never
    # requested).
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.num_tickets = _TICKETS_PER_HANDSHAKE
    if client_cas_pem:
        ctx.load_verify_locations(cadata=client_cas_pem.decode("ascii"))
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(
    ca_pem: bytes,
    cert_path: str | os.PathLike[str] | None = None,
    key_path: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A TLS client context that trusts only ``ca_pem`` and presents ``cert_path`` if given.

    Hostnames are checked. Without ``cert_path`` the client is anonymous (for
    enrollment). To resume a session, pass ``session=`` from an earlier
    connection's ``SSLSocket.session`` to ``wrap_socket``; Python does not
    cache client sessions by itself, and httpx cannot pass one.

    Raises:
        ValueError: ``key_path`` without ``cert_path``.
        ssl.SSLError, OSError: a file cannot be loaded.
    """
    if key_path is not None and cert_path is None:
        raise ValueError("key_path needs cert_path")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if cert_path is not None:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


# --------------------------------------------------------------------------- the ASGI TLS extension


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> dict[str, Any] | None:
    """The ASGI TLS extension dict for a connection after its handshake; ``None`` if not TLS.

    ``client_cert_chain`` holds the client's certificate only (PEM): Python
    3.11 cannot read the rest of the chain the client sent. ``client_cert_error``
    is always ``None`` because a certificate that fails verification fails
    the handshake. ``server_cert`` is not reported.
    """
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name: str | None = None
    if der:
        pem, name = _describe_certificate(der)
        chain.append(pem)
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_suite_ids().get(cipher[0]) if cipher else None,
    }


# A device comes back with the same certificate on every connection (resumed
# or not): parsing it once, not once per connection, matters when every poll
# opens a new connection. Bounded: a certificate is about 1 KiB here.
@functools.lru_cache(maxsize=4096)
def _describe_certificate(der: bytes) -> tuple[str, str | None]:
    try:
        name: str | None = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        # OpenSSL verified it, so this is unreachable in practice; the name
        # is informational and the DER is what apps use.
        name = None
    return ssl.DER_cert_to_PEM_cert(der), name


def client_cert_der(scope: Scope) -> bytes | None:
    """The verified client certificate (DER) of the connection a request came on, or ``None``.

    ``None`` means no TLS extension in the scope (plain HTTP, or a server
    other than :func:`make_server`) or no client certificate.
    """
    tls = scope.get("extensions", {}).get("tls")
    if not tls or not tls.get("client_cert_chain"):
        return None
    return _pem_to_der(tls["client_cert_chain"][0])


# Every request of a connection carries the same PEM string object, whose hash
# Python keeps: decoding it again on every poll was measurable (bench/poll.py).
@functools.lru_cache(maxsize=4096)
def _pem_to_der(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)


def client_cert_from_proxy(
    scope: Scope,
    trusted_proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
    *,
    header: str = DEFAULT_CLIENT_CERT_HEADER,
) -> bytes | None:
    """The client certificate (DER) a trusted TLS proxy forwarded in ``header``, or ``None``.

    The header is read only when the TCP peer (``scope["client"]``) is in
    ``trusted_proxies``; from anyone else it is ignored, since any client can
    send it. :func:`make_server` keeps ``scope["client"]`` the TCP peer
    (uvicorn's X-Forwarded-For rewriting is off). The value is URL-encoded PEM
    as nginx's ``$ssl_client_escaped_cert``; an empty value means the proxy
    saw no client certificate. The proxy must verify the certificate and
    overwrite the header on every request; check the result with
    :func:`skylift.hub.ca.verify_device_cert` all the same.

    Raises:
        ForwardedCertificateError: a trusted proxy sent the header more than
            once, or a value that is not a PEM certificate.
    """
    client = scope.get("client")
    if not client:
        return None
    try:
        peer = ipaddress.ip_address(client[0])
    except ValueError:
        return None  # a Unix socket path or the like: not a network peer we can trust
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
    if not any(peer in net for net in trusted_proxies):
        return None
    name = header.lower().encode("latin-1")
    values = [value for key, value in scope.get("headers", ()) if key.lower() == name]
    if not values:
        return None
    if len(values) > 1:
        raise ForwardedCertificateError(f"proxy sent {len(values)} {header} headers; expected one")
    text = unquote(values[0].decode("latin-1")).strip()
    if not text:
        return None
    try:
        certs = x509.load_pem_x509_certificates(text.encode("latin-1"))
    except ValueError:
        raise ForwardedCertificateError(
            f"proxy's {header} header is not a PEM certificate"
        ) from None
    # The first certificate is the client's; any that follow are its chain.
    return certs[0].public_bytes(serialization.Encoding.DER)


@functools.cache
def _cipher_suite_ids() -> dict[str, int]:
    # OpenSSL names to IANA code points, which the ASGI spec reports. OpenSSL's
    # cipher id is 0x0300XXXX with the code point in the low 16 bits.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("ALL")
    return {c["name"]: c["id"] & 0xFFFF for c in ctx.get_ciphers()}


class _WithTLSExtension:
    """Wraps one connection's app so each of its requests carries that connection's TLS facts."""

    def __init__(self, app: ASGIApp, tls: dict[str, Any]) -> None:
        self._app = app
        self._tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            # A fresh copy per request: an app that edits its scope must not
            # change what the next request on this connection sees.
            tls = {**self._tls, "client_cert_chain": list(self._tls["client_cert_chain"])}
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
        await self._app(scope, receive, send)


def _connection_app(app: ASGIApp, transport: asyncio.BaseTransport) -> ASGIApp:
    tls = tls_extension(transport.get_extra_info("ssl_object"))
    return app if tls is None else _WithTLSExtension(app, tls)


class TLSExtensionH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, adding the ASGI TLS extension to every request scope.

    A protocol instance serves exactly one connection, so the certificate is
    read once, after the handshake (asyncio and uvloop call ``connection_made``
    only then), and wrapped around this instance's app only: connections
    cannot see each other's identity. WebSocket upgrades build their own
    protocol from the config and would not get the extension. The access log
    follows ``config.access_log`` (see :func:`make_server`).
    """

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.access_log = self.access_log and config.access_log

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        self.app = _connection_app(self.app, transport)


if HttpToolsProtocol is not None:

    class TLSExtensionHttpToolsProtocol(HttpToolsProtocol):
        """:class:`TLSExtensionH11Protocol` on uvicorn's httptools (C) parser.

        The same override; used by :func:`make_server` when httptools is
        installed. On the poll path it answers several times faster than h11.
        """

        def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            self.access_log = self.access_log and config.access_log

        def connection_made(  # type: ignore[override]
            self, transport: asyncio.Transport
        ) -> None:
            super().connection_made(transport)
            self.app = _connection_app(self.app, transport)

    _DEFAULT_PROTOCOL: type[asyncio.Protocol] = TLSExtensionHttpToolsProtocol
else:  # pragma: no cover - depends on what is installed
    TLSExtensionHttpToolsProtocol = None  # type: ignore[assignment,misc]
    _DEFAULT_PROTOCOL = TLSExtensionH11Protocol


# --------------------------------------------------------------------------- servers


def make_server(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    timeout_keep_alive_s: int = 5,
    log_level: str | None = None,
    access_log: bool = True,
    http: type[asyncio.Protocol] | None = None,
) -> uvicorn.Server:
    """A uvicorn server for ``app`` whose requests carry the ASGI TLS extension.

    ``ssl_context`` (from :func:`server_context`) is used as is, through
    uvicorn's ``ssl_context_factory``; ``None`` serves plain HTTP (behind a
    TLS proxy). uvicorn's proxy header rewriting is off so that
    ``scope["client"]`` stays the TCP peer, which :func:`client_cert_from_proxy`
    relies on. Logging is left to the caller's configuration; ``access_log``
    False keeps this server's requests out of the ``uvicorn.access`` log
    (uvicorn's own switch would empty that logger for the whole process).
    ``http`` is the protocol class: by default httptools' when installed,
    else h11's (:class:`TLSExtensionH11Protocol`).
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http or _DEFAULT_PROTOCOL,
        ssl_context_factory=None
        if ssl_context is None
        else (lambda _config, _default: ssl_context),
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=timeout_keep_alive_s,
        log_config=None,
        log_level=log_level,
    )
    # Set after construction: read by our protocols only, per server.
    config.access_log = access_log
    return uvicorn.Server(config)


def serve(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    timeout_keep_alive_s: int = 5,
    log_level: str | None = None,
) -> None:
    """Run :func:`make_server` in this thread until it is told to stop (SIGINT, SIGTERM)."""
    make_server(
        app,
        host=host,
        port=port,
        ssl_context=ssl_context,
        timeout_keep_alive_s=timeout_keep_alive_s,
        log_level=log_level,
    ).run()


class ServerThread:
    """Runs a :class:`uvicorn.Server` in a background thread; for tests and demos.

    The listening socket is bound here, before the thread starts, so port 0
    gives a free port known at once (:attr:`port`) with no race. Start and
    stop are bounded in time. Use as a context manager.
    """

    def __init__(
        self,
        server: uvicorn.Server,
        *,
        startup_timeout_s: float = 10.0,
        shutdown_timeout_s: float = 10.0,
    ) -> None:
        self.server = server
        self._startup_timeout_s = startup_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return str(self.server.config.host)

    @property
    def port(self) -> int:
        """The port the server listens on (the real one when the config asked for 0)."""
        if self._sock is None:
            raise RuntimeError("server not started")
        return int(self._sock.getsockname()[1])

    def start(self) -> ServerThread:
        """Bind, start the thread, and wait until the server accepts connections.

        Raises:
            RuntimeError: the server stopped during startup.
            TimeoutError: it did not start within ``startup_timeout_s``.
        """
        config = self.server.config
        self._sock = socket.create_server((config.host, config.port))
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                self._close_socket()
                raise RuntimeError(f"server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server did not start within {self._startup_timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask the server to exit and wait for it; force it after ``shutdown_timeout_s``."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(self._shutdown_timeout_s)
            if self._thread.is_alive():
                # Graceful shutdown waits for open requests; stop waiting.
                self.server.force_exit = True
                self._thread.join(self._shutdown_timeout_s)
        self._close_socket()

    def _run(self) -> None:
        assert self._sock is not None
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # SystemExit from a failed lifespan included
            self._error = exc

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
