"""``skylift hub serve``: the device gateway and the management API in one process.

Both endpoints are TLS with the hub's server certificate. The gateway asks
for client certificates chaining to the device CA or a registered signer CA
(optional at the TLS layer, because enrollment has none yet; every other
gateway route requires one). The management API asks for none: it uses
bearer tokens. Hub processes keep no state of their own beyond caches, so
several can serve one database and object store (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn
from sqlalchemy import select

from skylift.hub.app import make_api_app, make_gateway_app
from skylift.hub.db.models import SignerCA
from skylift.hub.tls import make_server, server_context
from skylift.hub.web import HubContext

__all__ = [
    "client_cas",
    "gateway_server",
    "gateway_ssl_context",
    "run",
    "run_hub",
    "run_server",
    "serve_hub",
]

log = logging.getLogger("skylift.hub")


def client_cas(ctx: HubContext) -> bytes:
    """The device CA and every registered, non-revoked signer CA, as PEM."""
    with ctx.sessions() as session:
        signers = session.scalars(select(SignerCA.cert_pem).where(SignerCA.revoked.is_(False)))
        return ctx.device_ca_pem + b"".join(p.encode() for p in signers)


def gateway_ssl_context(ctx: HubContext) -> ssl.SSLContext:
    """The gateway's TLS context; kept in ``ctx.extra`` so new signer CAs can be added live."""
    context = server_context(
        ctx.config.ca_dir / "server.pem",
        ctx.config.ca_dir / "server.key",
        client_cas_pem=client_cas(ctx),
        require_client_cert=False,
    )
    ctx.extra["gateway_ssl"] = context
    return context


def gateway_server(ctx: HubContext) -> uvicorn.Server:
    """The device gateway's server, as :func:`serve_hub` runs it (``bench/poll.py`` too).

    No access log: every device polls every few minutes, and a line per poll
    cost about a tenth of the gateway's time (``bench/poll.py``). Refusals
    and errors are still logged by the gateway itself.
    """
    return make_server(
        make_gateway_app(ctx),
        host=ctx.config.gateway.host,
        port=ctx.config.gateway.port,
        ssl_context=gateway_ssl_context(ctx),
        access_log=False,
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on the hub's event loop: uvloop when installed, else asyncio's.

    uvloop's TLS and socket transports are compiled; asyncio's TLS layer is
    Python, and with it the gateway spent most of its time there.
    """
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main)


def run_server(server: uvicorn.Server) -> None:
    """Run one server in this thread until SIGINT or SIGTERM, as :func:`run_hub` would."""
    run(server.serve())


def run_hub(ctx: HubContext) -> None:
    """``skylift hub serve``: :func:`serve_hub` on the hub's event loop (see :func:`run`)."""
    run(serve_hub(ctx))


async def serve_hub(ctx: HubContext) -> None:
    """Serve both endpoints until interrupted."""
    api_ssl = server_context(
        ctx.config.ca_dir / "server.pem",
        ctx.config.ca_dir / "server.key",
        client_cas_pem=None,
        require_client_cert=False,
    )
    gateway = gateway_server(ctx)
    api = make_server(
        make_api_app(ctx),
        host=ctx.config.api.host,
        port=ctx.config.api.port,
        ssl_context=api_ssl,
    )
    log.info(
        "gateway on https://%s:%d, API on https://%s:%d",
        ctx.config.gateway.host,
        ctx.config.gateway.port,
        ctx.config.api.host,
        ctx.config.api.port,
    )
    await asyncio.gather(gateway.serve(), api.serve())
