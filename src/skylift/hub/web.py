"""What every hub endpoint shares: the hub context, errors as HTTP, bounded bodies, auth, audit.

Route modules (``skylift.hub.api.*`` for the management API,
``skylift.hub.gateway.*`` for devices) take a :class:`HubContext` and keep
to these rules:

- every input from the network is bounded in size before it is read
  (:func:`read_body`, :func:`read_json`) and validated before it is used;
- a :class:`~skylift.errors.SkyliftError` becomes one JSON error with the
  status :func:`status_for` gives it, never a traceback;
- a change made through the API writes an audit entry in the same
  transaction (:func:`audit`);
- blocking work (database, object store, signing) runs in a thread
  (:func:`run`), never on the event loop.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from securesystemslib.signer import Signer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from skylift.errors import SkyliftError, UserInputError
from skylift.hub.auth import (
    AuthError,
    Forbidden,
    Role,
    hash_secret,
    secret_matches,
    secret_prefix,
)
from skylift.hub.config import HubConfig
from skylift.hub.content import ContentError, ReleaseContent
from skylift.hub.db.engine import SQLITE_BEGIN_IMMEDIATE
from skylift.hub.db.models import ApiToken, AuditEntry
from skylift.hub.repositories import (
    Director,
    ImageRepositories,
    ReleaseRejectedError,
    UnknownRepositoryError,
)
from skylift.hub.storage import ObjectNotFoundError, ObjectStore, StorageError

__all__ = [
    "MAX_JSON_BYTES",
    "Conflict",
    "HubContext",
    "NotFound",
    "PayloadTooLarge",
    "Principal",
    "audit",
    "authenticate",
    "error_response",
    "handle_errors",
    "read_body",
    "read_json",
    "run",
    "status_for",
]

#: JSON request bodies of the management API; uploads have their own limits.
MAX_JSON_BYTES = 1024 * 1024

P = ParamSpec("P")
T = TypeVar("T")


class NotFound(SkyliftError):
    """No such thing, or not visible to the caller (HTTP 404)."""


class Conflict(SkyliftError):
    """The request contradicts the current state (HTTP 409)."""


class PayloadTooLarge(SkyliftError):
    """The body is over the endpoint's limit (HTTP 413)."""


_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (AuthError, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (UnknownRepositoryError, 404),
    (ObjectNotFoundError, 404),
    (Conflict, 409),
    (ReleaseRejectedError, 409),
    (PayloadTooLarge, 413),
    (ContentError, 400),
    (UserInputError, 400),
    (StorageError, 503),
)


def status_for(error: SkyliftError) -> int:
    """The HTTP status for an error; unknown SkyliftErrors are the client's (400)."""
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 400


def error_response(status: int, message: str, **headers: str) -> JSONResponse:
    """``{"error": message}`` with ``status``; one line, as the CLI prints it."""
    return JSONResponse({"error": message.splitlines()[0][:500]}, status, headers=headers or None)


def handle_errors(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Turn SkyliftErrors raised by ``endpoint`` into JSON errors with their status."""

    @functools.wraps(endpoint)
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except SkyliftError as e:
            status = status_for(e)
            extra = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
            return error_response(status, e.diagnostics(), **extra)

    return wrapped


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run blocking ``fn`` in the thread pool."""
    return await run_in_threadpool(fn, *args, **kwargs)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all.

    Raises:
        PayloadTooLarge: Content-Length or the bytes received exceed ``limit``.
        UserInputError: Content-Length is not a number.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise UserInputError("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes is over the {limit} limit")
    parts: list[bytes] = []
    received = 0
    async for part in request.stream():
        received += len(part)
        if received > limit:
            raise PayloadTooLarge(f"request body is over the {limit} byte limit")
        parts.append(part)
    return b"".join(parts)


async def read_json(request: Request, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The body as a JSON object.

    Raises:
        PayloadTooLarge: over ``limit``.
        UserInputError: not a JSON object.
    """
    body = await read_body(request, limit)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        # RecursionError: a megabyte of "[" nests deeper than the parser goes.
        raise UserInputError("the request body is not valid JSON") from e
    if not isinstance(doc, dict):
        raise UserInputError("the request body must be a JSON object")
    return doc


@dataclass(frozen=True)
class Principal:
    """Who is calling the management API: an organisation, a role, a name for the audit log."""

    org_id: int
    role: Role
    actor: str
    token_id: int | None = None

    def require(self, role: Role, action: str) -> None:
        """Raise Forbidden unless this principal's role allows ``action``."""
        self.role.require(role, action)


@dataclass
class HubContext:
    """Everything a request handler needs; built once per hub process."""

    config: HubConfig
    sessions: sessionmaker[Session]
    store: ObjectStore
    images: ImageRepositories
    director: Director
    content: ReleaseContent
    online_signers: list[Signer]
    device_ca_pem: bytes
    device_ca_key_pem: bytes
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    extra: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception.

        On SQLite it holds the write lock from the start (BEGIN IMMEDIATE):
        concurrent read-then-write transactions wait their turn instead of
        failing. PostgreSQL ignores the option.
        """
        with self.sessions.begin() as session:
            session.connection(execution_options={SQLITE_BEGIN_IMMEDIATE: True})
            yield session


#: ``api_tokens.last_used`` is written at most this often per token.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def authenticate(ctx: HubContext, session: Session, authorization: str | None) -> Principal:
    """The principal behind an ``Authorization: Bearer sk_...`` header.

    Raises:
        AuthError: missing, malformed, unknown, revoked or expired token.
    """
    if not authorization or not authorization.startswith("Bearer "):
        raise AuthError("send an API token: Authorization: Bearer sk_...")
    value = authorization.removeprefix("Bearer ").strip()
    secret_prefix(value)  # shape check before any database work
    token = session.scalars(
        select(ApiToken).where(ApiToken.token_hash == hash_secret(value))
    ).one_or_none()
    if token is None or not secret_matches(value, token.token_hash) or token.revoked:
        raise AuthError("the API token is unknown or revoked")
    now = ctx.clock()
    if token.expires is not None and token.expires <= now:
        raise AuthError("the API token has expired")
    # When a token was last used is what tells an admin which are dead; to the
    # minute is enough, and spares a write per request.
    if token.last_used is None or now - token.last_used >= LAST_USED_RESOLUTION:
        token.last_used = now
    return Principal(token.org_id, Role.parse(str(token.role)), token.name, token.id)


def audit(
    session: Session,
    who: Principal,
    action: str,
    target_type: str,
    target_id: str | int | None,
    details: dict[str, Any] | None = None,
) -> None:
    """Record a change in the audit log, in the caller's transaction."""
    session.add(
        AuditEntry(
            org_id=who.org_id,
            actor=who.actor,
            action=action,
            target_type=target_type,
            target_id=None if target_id is None else str(target_id),
            details=details,
        )
    )
