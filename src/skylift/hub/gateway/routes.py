"""The device gateway's routes (docs/api.md, "Device gateway"), mounted under ``/device/v1``.

Every route but ``POST /enroll`` needs a client certificate, checked on
every request by :mod:`skylift.hub.gateway.identity` (the TLS handshake
alone is not enough: resumed sessions are never re-verified). Handlers do
their blocking work (database, object store, signing) through
:func:`skylift.hub.web.run`, and every refusal is one JSON line.

``GET /poll`` is the one route every device calls every few minutes, so it
is a bare ASGI endpoint (:class:`_Poll`): no Starlette ``Request`` or
``Response`` objects, headers read straight from the scope, and a 304 sent
as two ASGI messages. Its refusals go through the same error mapping as the
other routes (:func:`_refusal`, as :func:`skylift.hub.web.handle_errors`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from skylift.errors import SkyliftError
from skylift.hub import web
from skylift.hub.auth import Forbidden
from skylift.hub.gateway.content import (
    parse_release_file,
    release_key,
    repository_file_response,
    serve_object,
)
from skylift.hub.gateway.enroll import MAX_ENROLL_BYTES, enroll, parse_enroll
from skylift.hub.gateway.identity import HARDWARE_HEADER, PRODUCT_HEADER, DeviceRef
from skylift.hub.gateway.poll import PollAnswer, compute_answer, etag_matches, parse_state
from skylift.hub.gateway.reports import parse_reports, store_reports
from skylift.hub.gateway.state import GatewayState, state_for
from skylift.hub.web import HubContext, NotFound
from skylift.trust.errors import RepositoryError

__all__ = ["background", "routes"]

log = logging.getLogger("skylift.hub.gateway")


async def _device_of(state: GatewayState, scope: Scope) -> DeviceRef:
    """The verified device behind a request: from memory, or checked in full in a thread.

    Raises:
        AuthError: no client certificate (401).
        Forbidden: an unusable certificate, an unknown or revoked device (403).
    """
    der = state.identities.certificate(scope)
    ref = state.identities.lookup(der)
    if ref is None:
        headers = Headers(scope=scope)
        ref = await web.run(
            state.identities.resolve,
            der,
            hardware=headers.get(HARDWARE_HEADER),
            product=headers.get(PRODUCT_HEADER),
        )
    return ref


async def _device(state: GatewayState, request: Request) -> DeviceRef:
    """:func:`_device_of` for a Starlette request."""
    return await _device_of(state, request.scope)


def _refusal(error: SkyliftError) -> Response:
    """The JSON error for ``error``, as :func:`skylift.hub.web.handle_errors` makes it."""
    status = web.status_for(error)
    extra = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return web.error_response(status, error.diagnostics(), **extra)


_CACHE_CONTROL = (b"cache-control", b"private, no-cache")
_JSON = (b"content-type", b"application/json")


class _DirectorUnavailable(Exception):
    """The director repository of the polling device does not verify (503)."""


class _Poll:
    """``GET /poll`` as a bare ASGI app (docs/api.md): 304 while the ETag matches, else 200.

    Everything on the common path is in memory: the identity
    (:meth:`Identities.lookup`), the answer (:class:`PollCache`) and the
    last-seen time (:class:`LastSeenBuffer`). Only a miss goes to a thread.
    """

    def __init__(self, ctx: HubContext, state: GatewayState) -> None:
        self._ctx = ctx
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            answer, if_none_match = await self._answer(scope)
        except _DirectorUnavailable:
            # The hub's own metadata is broken: not the device's fault (no 400).
            error = web.error_response(503, "the hub cannot serve this device's director now")
            await error(scope, receive, send)
            return
        except SkyliftError as e:
            await _refusal(e)(scope, receive, send)
            return
        etag = b'"' + answer.etag.encode("ascii") + b'"'
        if if_none_match is not None and (
            if_none_match == etag or etag_matches(if_none_match.decode("latin-1"), answer.etag)
        ):
            await send(
                {
                    "type": "http.response.start",
                    "status": 304,
                    "headers": [(b"etag", etag), _CACHE_CONTROL],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [
            (b"etag", etag),
            _CACHE_CONTROL,
            _JSON,
            (b"content-length", str(len(answer.body)).encode("ascii")),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})

    async def _answer(self, scope: Scope) -> tuple[PollAnswer, bytes | None]:
        state = self._state
        device = await _device_of(state, scope)
        announced: bytes | None = None
        if_none_match: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-skylift-state":
                announced = value
            elif name == b"if-none-match":
                if_none_match = value
        new_state = parse_state(None if announced is None else announced.decode("latin-1"))
        # Memory only: the flush loop writes it with everyone else's.
        state.last_seen.record(device.pk, self._ctx.clock(), new_state)
        answer = state.polls.get(device.device_id)
        if answer is None:
            started = state.polls.begin()
            try:
                answer = await web.run(compute_answer, self._ctx, device.device_id)
            except RepositoryError as e:
                log.error("director repository of %s: %s", device.device_id, e.message)
                raise _DirectorUnavailable from e
            state.polls.put(device.device_id, answer, started)
        return answer, if_none_match


def poll_endpoint(ctx: HubContext) -> ASGIApp:
    """``GET /poll`` for ``ctx`` as a bare ASGI app (the app may route to it directly)."""
    return _Poll(ctx, state_for(ctx))


def routes(ctx: HubContext) -> list[BaseRoute]:
    """The gateway's routes for ``ctx`` (relative to ``/device/v1``)."""
    state = state_for(ctx)

    @web.handle_errors
    async def post_enroll(request: Request) -> Response:
        req = parse_enroll(await web.read_json(request, MAX_ENROLL_BYTES))
        body = await web.run(enroll, ctx, req)
        return JSONResponse(body, status_code=201)

    @web.handle_errors
    async def get_image(request: Request) -> Response:
        device = await _device(state, request)
        rel = request.path_params["file"]
        data = await web.run(ctx.images.read, device.product, rel)
        return repository_file_response(data, rel, private=False)

    @web.handle_errors
    async def get_director(request: Request) -> Response:
        device = await _device(state, request)
        asked = request.path_params["device_id"]
        if asked != device.device_id:
            raise Forbidden(f"device {device.device_id} may read only its own director metadata")
        rel = request.path_params["file"]
        data = await web.run(ctx.director.read, device.device_id, rel)
        return repository_file_response(data, rel, private=True)

    @web.handle_errors
    async def get_release_file(request: Request) -> Response:
        device = await _device(state, request)
        version, name = parse_release_file(
            request.path_params["version"], request.path_params["file"]
        )
        if not await web.run(state.release_exists, device.product_id, version):
            raise NotFound(f"{device.product} has no release {version}")
        return await serve_object(request, ctx.store, release_key(device.product, version, name))

    @web.handle_errors
    async def post_reports(request: Request) -> Response:
        device = await _device(state, request)
        reports = parse_reports(await web.read_json(request))
        stored, duplicates = await web.run(store_reports, ctx, device.pk, reports)
        return Response(
            json.dumps({"stored": stored, "duplicates": duplicates}),
            media_type="application/json",
        )

    return [
        Route("/enroll", post_enroll, methods=["POST"]),
        Route("/poll", poll_endpoint(ctx), methods=["GET"]),
        Route("/image/{file:path}", get_image, methods=["GET"]),
        Route("/director/{device_id}/{file:path}", get_director, methods=["GET"]),
        Route("/releases/{version}/{file}", get_release_file, methods=["GET"]),
        Route("/reports", post_reports, methods=["POST"]),
    ]


def background(ctx: HubContext) -> list[Callable[[], Awaitable[None]]]:
    """The gateway's loops: cross-process sync (about 1 s) and batched last-seen writes."""
    return state_for(ctx).loops()
