"""The hub itself, API tokens, the audit log and the API's own OpenAPI document.

- ``GET /hub``: what a client needs before it can create a product: the
  hub's online keys (for the snapshot and timestamp roles of an image
  root), the director root devices pin, and where devices connect.
- ``/tokens``: bearer tokens of the caller's organisation. A token is shown
  once, at creation; the hub keeps its SHA-256. Nobody can mint a token with
  a role above their own.
- ``/audit``: every change made through the API, newest first.
- ``/openapi.json``: served without a token. It is the same public contract
  for every organisation (no tenant data in it), and tools fetch it before
  anyone has handed them a token (code generators, schemathesis).
"""

from __future__ import annotations

import functools
import ipaddress
import json
from typing import Any

from sqlalchemy import and_, or_, select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from skylift.errors import UserInputError
from skylift.hub import openapi, web
from skylift.hub.api.common import (
    MAX_BIGINT_ID,
    MAX_TIME_KEY,
    NAME,
    Body,
    Query,
    authorize,
    next_cursor,
    path_id,
    rfc3339,
    route,
    time_from_key,
    time_key,
)
from skylift.hub.auth import Forbidden, Role, issue_secret
from skylift.hub.db import models
from skylift.hub.db.models import ApiToken, AuditEntry, Organisation
from skylift.hub.web import HubContext, NotFound

__all__ = ["routes"]

_ROLES = ("viewer", "operator", "admin")
# Listening on every address says nothing about the name devices should use.
_WILDCARDS = {"", "0.0.0.0", "::"}  # noqa: S104 - compared against, not bound to


def _key_dict(ctx: HubContext) -> dict[str, Any]:
    key = ctx.online_signers[0].public_key
    return {"keyid": key.keyid, **key.to_dict()}


def _gateway_url(ctx: HubContext, request: Request) -> str:
    host = ctx.config.gateway.host
    if host in _WILDCARDS:
        # The name this client used to reach the API is the best guess.
        host = request.url.hostname or "localhost"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"https://{host}:{ctx.config.gateway.port}"


def _token_json(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "role": str(token.role),
        "prefix": token.prefix,
        "created": rfc3339(token.created),
        "last_used": rfc3339(token.last_used),
        "expires": rfc3339(token.expires),
        "revoked": token.revoked,
    }


def _audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "actor": entry.actor,
        "action": entry.action,
        "target_type": entry.target_type,
        "target_id": entry.target_id,
        "details": entry.details,
        "created": rfc3339(entry.created),
    }


def routes(ctx: HubContext) -> list[BaseRoute]:
    """``GET /hub``, ``/tokens``, ``GET /audit``, ``GET /openapi.json``."""

    async def hub(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "reading the hub's description")
        Query(request, allowed=())

        def work() -> dict[str, Any]:
            director_root = ctx.director.roots()[0]
            with ctx.transaction() as session:
                org = session.get_one(Organisation, who.org_id)
                organisation = org.name
            key = _key_dict(ctx)
            return {
                "name": ctx.config.name,
                "organisation": organisation,
                "role": str(who.role),
                "online_keys": {"snapshot": key, "timestamp": key},
                "director_root": json.loads(director_root),
                "gateway_url": _gateway_url(ctx, request),
            }

        return JSONResponse(await web.run(work))

    async def create_token(request: Request) -> Response:
        who = await authorize(ctx, request, Role.ADMIN, "creating an API token")
        Query(request, allowed=())
        body = Body(await web.read_json(request), required=("name", "role"), optional=("expires",))
        name = body.string("name", pattern=NAME)
        role_name = body.string("role", max_chars=16)
        if role_name not in _ROLES:
            raise UserInputError(f"role must be one of {', '.join(_ROLES)}")
        role = Role[role_name.upper()]
        if role > who.role:
            # Today only admins reach this line; the rule holds if that changes.
            raise Forbidden(f"a {who.role} token cannot create an {role} token")
        expires = body.optional_time("expires")
        if expires is not None and expires <= ctx.clock():
            raise UserInputError("expires is in the past")
        secret = issue_secret("sk")

        def work() -> dict[str, Any]:
            with ctx.transaction() as session:
                token = ApiToken(
                    org_id=who.org_id,
                    user_id=None,  # the organisation's token, as for CI
                    name=name,
                    role=models.Role(role_name),
                    token_hash=secret.digest,
                    prefix=secret.prefix,
                    expires=expires,
                )
                session.add(token)
                session.flush()
                web.audit(
                    session,
                    who,
                    "token.create",
                    "token",
                    token.id,
                    {"name": name, "role": role_name, "expires": rfc3339(expires)},
                )
                return {**_token_json(token), "token": secret.value}

        return JSONResponse(await web.run(work), 201)

    async def list_tokens(request: Request) -> Response:
        who = await authorize(ctx, request, Role.ADMIN, "listing API tokens")
        Query(request, allowed=())

        def work() -> list[dict[str, Any]]:
            with ctx.transaction() as session:
                tokens = session.scalars(
                    select(ApiToken).where(ApiToken.org_id == who.org_id).order_by(ApiToken.id)
                )
                return [_token_json(t) for t in tokens]

        return JSONResponse({"items": await web.run(work)})

    async def revoke_token(request: Request) -> Response:
        who = await authorize(ctx, request, Role.ADMIN, "revoking an API token")
        Query(request, allowed=())
        token_id = path_id(request, "token_id", "token")

        def work() -> None:
            with ctx.transaction() as session:
                token = session.scalars(
                    select(ApiToken).where(ApiToken.org_id == who.org_id, ApiToken.id == token_id)
                ).one_or_none()
                if token is None:
                    raise NotFound(f"no token {token_id}")
                if token.revoked:
                    return  # already so: nothing changes, nothing to record
                token.revoked = True
                web.audit(session, who, "token.revoke", "token", token.id, {"name": token.name})

        await web.run(work)
        return Response(status_code=204)

    async def audit_log(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "reading the audit log")
        query = Query(request, allowed=("action", "actor", "since", "limit", "cursor"))
        action = query.string("action", max_chars=64)
        actor = query.string("actor", max_chars=255)
        since = query.time("since")
        limit = query.limit()
        after = query.cursor("audit", (MAX_TIME_KEY, MAX_BIGINT_ID))

        def work() -> tuple[list[dict[str, Any]], str | None]:
            # Newest first by the hub's clock, the id breaking ties: the
            # (org_id, created) index serves it; the cursor is that pair.
            stmt = select(AuditEntry).where(AuditEntry.org_id == who.org_id)
            if action is not None:
                stmt = stmt.where(AuditEntry.action == action)
            if actor is not None:
                stmt = stmt.where(AuditEntry.actor == actor)
            if since is not None:
                stmt = stmt.where(AuditEntry.created >= since)
            if after is not None:
                created = time_from_key(after[0])
                stmt = stmt.where(
                    or_(
                        AuditEntry.created < created,
                        and_(AuditEntry.created == created, AuditEntry.id < after[1]),
                    )
                )
            stmt = stmt.order_by(AuditEntry.created.desc(), AuditEntry.id.desc()).limit(limit + 1)
            with ctx.transaction() as session:
                rows = list(session.scalars(stmt))
            page, cursor = next_cursor(rows, limit, "audit", lambda e: (time_key(e.created), e.id))
            return [_audit_json(e) for e in page], cursor

        items, cursor = await web.run(work)
        return JSONResponse({"items": items, "next_cursor": cursor})

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(_openapi_document())

    return [
        route("/hub", hub, "GET"),
        route("/tokens", create_token, "POST"),
        route("/tokens", list_tokens, "GET"),
        route("/tokens/{token_id:int}", revoke_token, "DELETE"),
        route("/audit", audit_log, "GET"),
        route("/openapi.json", openapi_json, "GET"),
    ]


@functools.cache
def _openapi_document() -> dict[str, Any]:
    return openapi.document()
