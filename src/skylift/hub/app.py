"""The hub's two ASGI applications, assembled from route modules.

Each module named below exposes ``routes(ctx) -> list[BaseRoute]`` and may
expose ``background(ctx) -> list[Callable[[], Awaitable[None]]]``: loops
that run for the life of the process (batched last-seen writes, rollout
ticks, timestamp re-signing, per-pair deltas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from types import ModuleType
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from skylift.hub import dashboard, deltas, rollouts
from skylift.hub.api import core, deployments, devices, products, releases
from skylift.hub.gateway import routes as gateway_routes
from skylift.hub.web import HubContext, error_response

__all__ = [
    "API_MODULES",
    "DASHBOARD_MODULES",
    "GATEWAY_MODULES",
    "make_api_app",
    "make_gateway_app",
]

log = logging.getLogger("skylift.hub")

#: Management API route modules, mounted under /api/v1.
API_MODULES: tuple[ModuleType, ...] = (core, products, devices, releases, deployments)
#: Device gateway route modules, mounted under /device/v1.
GATEWAY_MODULES: tuple[ModuleType, ...] = (gateway_routes,)
#: Dashboard route modules, mounted at / on the management port.
DASHBOARD_MODULES: tuple[ModuleType, ...] = (dashboard,)
#: Modules with background loops that are not route modules (run by the API app).
BACKGROUND_MODULES: tuple[ModuleType, ...] = (rollouts, deltas)


async def _not_found(request: Request, exc: Exception) -> Response:
    # People's browsers get the dashboard's page; programs get JSON, as before.
    if not request.url.path.startswith(("/api/", "/device/")) and "text/html" in (
        request.headers.get("accept", "")
    ):
        return dashboard.not_found(request)
    return error_response(404, f"no such endpoint: {request.method} {request.url.path}")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, f"{request.method} is not allowed on {request.url.path}")


async def _server_error(request: Request, exc: Exception) -> Response:
    # Never a traceback to the client; the log has it.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal error; the hub log has the details"}, 500)


def _app(
    ctx: HubContext,
    prefix: str,
    modules: tuple[ModuleType, ...],
    root_modules: tuple[ModuleType, ...] = (),
) -> Starlette:
    routes: list[BaseRoute] = []
    root_routes: list[BaseRoute] = []
    loops: list[Callable[[], Coroutine[Any, Any, None]]] = []
    for m in modules:
        routes.extend(m.routes(ctx))
        if hasattr(m, "background"):
            loops.extend(m.background(ctx))
    for m in root_modules:
        root_routes.extend(m.routes(ctx))
        if hasattr(m, "background"):
            loops.extend(m.background(ctx))
    for m in BACKGROUND_MODULES if prefix == "/api/v1" else ():
        loops.extend(m.background(ctx))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(loop()) for loop in loops]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    return Starlette(
        routes=[Mount(prefix, routes=routes), *root_routes],
        exception_handlers={404: _not_found, 405: _method_not_allowed, 500: _server_error},
        lifespan=lifespan,
    )


def make_api_app(ctx: HubContext) -> Starlette:
    """The management API at /api/v1 and the web dashboard at /."""
    return _app(ctx, "/api/v1", API_MODULES, DASHBOARD_MODULES)


class _Gateway:
    """The gateway app, with ``GET /device/v1/poll`` handed straight to its endpoint.

    The poll is the hot path: every device, every few minutes. Starlette's
    middleware and routing cost about a fifth of a kept-alive poll
    (bench/poll.py's profile), and the endpoint needs neither: it parses its
    own headers and answers refusals itself. Everything else goes through the
    Starlette app as usual. An unexpected exception on the fast path is left
    to the server, which logs it and answers 500.
    """

    def __init__(self, app: Starlette, poll: ASGIApp) -> None:
        self.app = app
        self._poll = poll

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == _POLL_PATH
            and scope["method"] in ("GET", "HEAD")
        ):
            await self._poll(scope, receive, send)
            return
        await self.app(scope, receive, send)


_POLL_PATH = "/device/v1/poll"


def make_gateway_app(ctx: HubContext) -> ASGIApp:
    """The device gateway."""
    return _Gateway(_app(ctx, "/device/v1", GATEWAY_MODULES), gateway_routes.poll_endpoint(ctx))
