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

from sqlalchemy import select

from skylift.hub.app import make_api_app, make_gateway_app
from skylift.hub.db.models import SignerCA
from skylift.hub.tls import make_server, server_context
from skylift.hub.web import HubContext

__all__ = ["client_cas", "gateway_ssl_context", "serve_hub"]

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


async def serve_hub(ctx: HubContext) -> None:
    """Serve both endpoints until interrupted."""
    api_ssl = server_context(
        ctx.config.ca_dir / "server.pem",
        ctx.config.ca_dir / "server.key",
        client_cas_pem=None,
        require_client_cert=False,
    )
    gateway = make_server(
        make_gateway_app(ctx),
        host=ctx.config.gateway.host,
        port=ctx.config.gateway.port,
        ssl_context=gateway_ssl_context(ctx),
    )
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
