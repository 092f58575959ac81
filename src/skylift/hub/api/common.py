"""What the management API's route modules share: callers, strict inputs, cursors, times.

- :func:`authorize` finds the caller (:class:`~skylift.hub.web.Principal`) and
  checks its role *before* the body is read, so that a stranger or a viewer
  learns nothing from validation errors and costs no body parsing.
- :class:`Body` and :class:`Query` read JSON bodies and query strings
  strictly: an unknown field is refused (400), because a misspelt filter
  (``?tags=lab``) that silently selected the whole fleet would be worse than
  an error.
- Cursors are keyset positions (the sort key of the last item of a page),
  opaque to clients and validated when they come back. A list never uses
  ``OFFSET``: page 1000 of 100k devices costs what page 1 costs.
- Times are RFC 3339 UTC strings on the wire (``2026-11-23T19:00:00Z``) and
  aware UTC datetimes inside.
- Tenancy: :func:`find_product` and :func:`find_device` look things up in
  the caller's organisation only; anything else is :class:`~skylift.hub.web.NotFound`,
  so that nobody can learn what another organisation has.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from skylift.device_identity import DEVICE_ID  # as certificates carry them
from skylift.errors import UserInputError
from skylift.hub import web
from skylift.hub.auth import Role
from skylift.hub.db.models import Device, DeviceTag, Product
from skylift.hub.web import Conflict, HubContext, NotFound, Principal

__all__ = [
    "DEFAULT_LIMIT",
    "DELETED_TAG",
    "DEVICE_ID",
    "MAX_BIGINT_ID",
    "MAX_INT_ID",
    "MAX_LIMIT",
    "MAX_TIME_KEY",
    "NAME",
    "PRODUCT_NAME",
    "TAG",
    "Body",
    "Query",
    "authorize",
    "conflict_on_duplicate",
    "decode_cursor",
    "device_visible",
    "encode_cursor",
    "find_device",
    "find_product",
    "next_cursor",
    "parse_time",
    "path_id",
    "rfc3339",
    "route",
    "time_from_key",
    "time_key",
]

#: Names of tokens, provisioning keys, signer CAs, deployments.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Product names are object-store keys (``image/<product>/``) and appear in
#: URLs and device configs: lower case, so two spellings never name one product.
PRODUCT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: Device tags: ``:`` and ``=`` allow ``site:lab``, ``ring=canary``.
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}")
#: Marks a deleted device. The row stays, so that its id can never enroll
#: again; this tag hides it. :data:`TAG` cannot match it (a tag starts with a
#: letter or digit), so no operator can set, clear or select it by accident.
DELETED_TAG = "~deleted"

DEFAULT_LIMIT = 100
MAX_LIMIT = 500
#: Largest id of an ``Integer`` primary key (tokens, keys, CAs, deployments)...
MAX_INT_ID = 2**31 - 1
#: ... and of a 64-bit one (device events, audit entries).
MAX_BIGINT_ID = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Largest :func:`time_key`: the last microsecond Python's datetime holds.
MAX_TIME_KEY = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)

# Bounds on what a client may send where the database has no limit of its own.
_MAX_TEXT_CHARS = 1024
_MAX_QUERY_PARAMS = 100
_MAX_CURSOR_CHARS = 200
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})")
# A printable line: no control characters, which would corrupt logs and tables.
_LINE = re.compile(r"[^\x00-\x1f\x7f]*")
# Several lines (a PEM): line breaks, but no other control character.
_TEXT = re.compile(r"[^\x00-\x09\x0b\x0c\x0e-\x1f\x7f]*")

T = TypeVar("T")


# -- callers --------------------------------------------------------------------------------------


async def authorize(ctx: HubContext, request: Request, role: Role, action: str) -> Principal:
    """The caller of ``request``, who must hold at least ``role`` to do ``action``.

    Raises:
        AuthError: no, malformed, unknown, revoked or expired token (401).
        Forbidden: the token's role is below ``role`` (403).
    """
    header = request.headers.get("authorization")

    def check() -> Principal:
        with ctx.transaction() as session:
            return web.authenticate(ctx, session, header)

    who = await web.run(check)
    who.require(role, action)
    return who


def route(path: str, endpoint: Callable[[Request], Awaitable[Response]], method: str) -> Route:
    """A route whose SkyliftErrors become one-line JSON errors (:func:`web.handle_errors`)."""
    return Route(path, web.handle_errors(endpoint), methods=[method])


@contextmanager
def conflict_on_duplicate(message: str, *, hint: str | None = None) -> Iterator[None]:
    """Turn a unique-constraint violation (also one raised at commit) into a 409.

    Wrap the whole ``with ctx.transaction()`` block: two requests racing to
    create the same name both pass the "exists?" check, and only the
    database's constraint tells the loser.
    """
    try:
        yield
    except IntegrityError as e:
        raise Conflict(message, hint=hint) from e


def path_id(request: Request, name: str, what: str, *, maximum: int = MAX_INT_ID) -> int:
    """An integer id from the path (a ``{name:int}`` route parameter).

    ``maximum`` is the largest value of the id's column: SQLAlchemy binds the
    value with the column's type, so PostgreSQL fails (500) on an ``integer``
    column given 2**31, where it should be a plain 404. Pass
    :data:`MAX_BIGINT_ID` for the 64-bit ids (events, audit entries).

    Raises:
        NotFound: larger than any row of that table can have.
    """
    value: int = request.path_params[name]
    if value > maximum:
        raise NotFound(f"no {what} {value}")
    return value


# -- tenancy --------------------------------------------------------------------------------------


def find_product(session: Session, who: Principal, name: str) -> Product:
    """The caller's product ``name``.

    Raises:
        NotFound: no such product in the caller's organisation (whether or
            not another organisation has one by that name).
    """
    product = None
    if PRODUCT_NAME.fullmatch(name):
        product = session.scalars(
            select(Product).where(Product.org_id == who.org_id, Product.name == name)
        ).one_or_none()
    if product is None:
        raise NotFound(f"no product {name[:80]!r}")
    return product


def device_visible(org_id: int) -> ColumnElement[bool]:
    """The devices an organisation sees: its own, except deleted ones.

    A ``NOT EXISTS`` on device_tags' primary key ``(device_id, tag)``: one
    index probe per device, on both databases.
    """
    deleted = (
        select(DeviceTag.device_id)
        .where(DeviceTag.device_id == Device.id, DeviceTag.tag == DELETED_TAG)
        .exists()
    )
    return and_(Device.org_id == org_id, ~deleted)


def find_device(session: Session, who: Principal, device_id: str) -> Device:
    """The caller's (not deleted) device ``device_id``.

    Raises:
        NotFound: no such device in the caller's organisation, or deleted.
    """
    device = None
    if DEVICE_ID.fullmatch(device_id):
        device = session.scalars(
            select(Device).where(Device.device_id == device_id, device_visible(who.org_id))
        ).one_or_none()
    if device is None:
        raise NotFound(f"no device {device_id[:128]!r}")
    return device


# -- times ----------------------------------------------------------------------------------------


def rfc3339(value: datetime | None) -> str | None:
    """``2026-11-23T19:00:00Z`` (whole seconds, UTC), or None."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object, what: str) -> datetime:
    """An RFC 3339 time with an explicit offset (``Z`` or ``+02:00``), as aware UTC.

    Raises:
        UserInputError: anything else, including a time without an offset,
            whose zone nobody could know.
    """
    if not isinstance(text, str) or not _RFC3339.fullmatch(text):
        raise UserInputError(
            f"{what} must be an RFC 3339 time with an offset, e.g. 2026-11-23T19:00:00Z"
        )
    try:
        return datetime.fromisoformat(text.upper().replace("Z", "+00:00")).astimezone(UTC)
    except (ValueError, OverflowError) as e:  # Overflow: 9999-12-31T23:00:00-02:00
        raise UserInputError(f"{what} is not a valid time: {text}") from e


def time_key(value: datetime) -> int:
    """A timestamp as integer microseconds since 1970, exact on both databases (for cursors)."""
    return (value.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)


def time_from_key(value: int) -> datetime:
    """The inverse of :func:`time_key`."""
    return _EPOCH + timedelta(microseconds=value)


# -- cursors --------------------------------------------------------------------------------------


def encode_cursor(kind: str, key: Sequence[int]) -> str:
    """An opaque cursor: the list it belongs to and the sort key of the last item sent.

    Opaque but not secret: the hub re-checks everything a cursor could name
    (organisation, filters), so a forged cursor only moves within the
    caller's own list.
    """
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str, kind: str, maxima: Sequence[int]) -> tuple[int, ...]:
    """The sort key inside a cursor of list ``kind``: one integer per entry of ``maxima``.

    Each integer must lie in ``0..maximum``: an id beyond its column's type
    would fail in PostgreSQL, a time beyond year 9999 in Python, both as a 500.

    Raises:
        UserInputError: not a cursor of this list (tampered, truncated, from
            another list, or out of range).
    """
    bad = UserInputError(
        "cursor is not valid for this list", hint="pass next_cursor from the previous page"
    )
    if len(value) > _MAX_CURSOR_CHARS or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise bad
    try:
        doc = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, ValueError) as e:
        raise bad from e
    if (
        not isinstance(doc, list)
        or len(doc) != len(maxima) + 1
        or doc[0] != kind
        or not all(type(v) is int and 0 <= v <= m for v, m in zip(doc[1:], maxima, strict=True))
    ):
        raise bad
    return tuple(doc[1:])


def next_cursor(
    rows: list[T], limit: int, kind: str, key: Callable[[T], Sequence[int]]
) -> tuple[list[T], str | None]:
    """Split ``limit + 1`` fetched rows into the page and the cursor of the next one.

    Fetching one row more than the page holds tells whether there is a next
    page, so that the last page says ``null`` instead of leading to an empty one.
    """
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, encode_cursor(kind, key(page[-1]))


# -- bodies and queries ---------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )


def _check_text(
    value: str,
    what: str,
    pattern: re.Pattern[str] | None,
    max_chars: int,
    *,
    multiline: bool = False,
) -> str:
    if len(value) > max_chars:
        raise UserInputError(f"{what} is longer than {max_chars} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise UserInputError(f"{what} {value[:80]!r} must match {pattern.pattern}")
    if not (_TEXT if multiline else _LINE).fullmatch(value):
        raise UserInputError(f"{what} must not contain control characters")
    return value


class Body:
    """A JSON request body, read field by field with its type and bounds.

    The constructor refuses unknown and missing fields; the getters check one
    field each. An optional field given as ``null`` counts as not given.
    """

    def __init__(
        self,
        doc: Mapping[str, Any],
        *,
        required: Collection[str] = (),
        optional: Collection[str] = (),
        where: str = "the request body",
    ) -> None:
        """Check the set of fields of ``doc``.

        Raises:
            UserInputError: a field is unknown, or a required one is missing.
        """
        unknown = sorted(set(doc) - set(required) - set(optional))
        if unknown:
            allowed = ", ".join(sorted({*required, *optional})) or "none"
            raise UserInputError(
                f"unknown field {unknown[0][:64]!r} in {where} (allowed: {allowed})"
            )
        for key in sorted(required):
            if doc.get(key) is None:
                raise UserInputError(f"{where} needs the field {key!r}")
        self._doc = doc
        self._where = where

    def __contains__(self, key: str) -> bool:
        return self._doc.get(key) is not None

    def _get(self, key: str, kind: type, expected: str) -> Any:
        value = self._doc.get(key)
        if value is None:
            raise UserInputError(f"{self._where} needs the field {key!r}")
        # bool is an int in Python, never in JSON.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise UserInputError(f"{key} must be {expected}, not {_type_name(value)}")
        return value

    def string(
        self,
        key: str,
        *,
        pattern: re.Pattern[str] | None = None,
        max_chars: int = _MAX_TEXT_CHARS,
        multiline: bool = False,
    ) -> str:
        """A string field, one printable line (or lines), matching ``pattern`` if given."""
        value: str = self._get(key, str, "a string")
        return _check_text(value, key, pattern, max_chars, multiline=multiline)

    def optional_string(
        self, key: str, *, pattern: re.Pattern[str] | None = None, max_chars: int = _MAX_TEXT_CHARS
    ) -> str | None:
        """:meth:`string`, or None if absent."""
        return self.string(key, pattern=pattern, max_chars=max_chars) if key in self else None

    def integer(self, key: str, *, lo: int, hi: int) -> int:
        """An integer field within ``lo..hi``."""
        value: int = self._get(key, int, "an integer")
        if not lo <= value <= hi:
            raise UserInputError(f"{key} must be between {lo} and {hi}")
        return value

    def optional_integer(self, key: str, *, lo: int, hi: int) -> int | None:
        """:meth:`integer`, or None if absent."""
        return self.integer(key, lo=lo, hi=hi) if key in self else None

    def boolean(self, key: str) -> bool:
        """A boolean field."""
        value: bool = self._get(key, bool, "true or false")
        return value

    def optional_time(self, key: str) -> datetime | None:
        """An RFC 3339 time field, or None if absent."""
        return parse_time(self._get(key, str, "a time"), key) if key in self else None

    def object(self, key: str) -> dict[str, Any]:
        """A JSON object field, unchecked inside (the caller parses it)."""
        value: dict[str, Any] = self._get(key, dict, "an object")
        return value

    def strings(self, key: str, *, pattern: re.Pattern[str], max_items: int) -> list[str]:
        """A list of distinct strings each matching ``pattern``, in the order given."""
        values: list[Any] = self._get(key, list, "a list of strings")
        if len(values) > max_items:
            raise UserInputError(f"{key} has {len(values)} items; at most {max_items}")
        out: list[str] = []
        for value in values:
            if not isinstance(value, str):
                raise UserInputError(f"{key} must hold strings, not {_type_name(value)}")
            _check_text(value, f"{key} item", pattern, _MAX_TEXT_CHARS)
            if value not in out:
                out.append(value)
        return out


class Query:
    """The query string of a request, strictly: unknown or repeated parameters are refused.

    An empty value (``?q=``) counts as not given, as clients build query
    strings from optional settings.
    """

    def __init__(
        self, request: Request, *, allowed: Collection[str], repeatable: Collection[str] = ()
    ) -> None:
        """Check the parameter names of ``request``.

        Raises:
            UserInputError: an unknown parameter, a repeated one that may not
                be, or more than 100 parameters.
        """
        items = request.query_params.multi_items()
        if len(items) > _MAX_QUERY_PARAMS:
            raise UserInputError(f"more than {_MAX_QUERY_PARAMS} query parameters")
        self._values: dict[str, list[str]] = {}
        for key, value in items:
            if key not in allowed:
                names = ", ".join(sorted(allowed)) or "none"
                raise UserInputError(f"unknown query parameter {key[:64]!r} (allowed: {names})")
            if value:
                self._values.setdefault(key, []).append(value)
        for key, values in self._values.items():
            if len(values) > 1 and key not in repeatable:
                raise UserInputError(f"query parameter {key!r} is given more than once")

    def string(
        self, key: str, *, pattern: re.Pattern[str] | None = None, max_chars: int = 128
    ) -> str | None:
        """One string parameter, or None."""
        values = self._values.get(key)
        return _check_text(values[0], key, pattern, max_chars) if values else None

    def strings(self, key: str, *, pattern: re.Pattern[str], max_items: int) -> list[str]:
        """A repeatable parameter's values, distinct, in order."""
        values = self._values.get(key, [])
        if len(values) > max_items:
            raise UserInputError(f"at most {max_items} {key} parameters")
        out: list[str] = []
        for value in values:
            _check_text(value, key, pattern, _MAX_TEXT_CHARS)
            if value not in out:
                out.append(value)
        return out

    def choice(self, key: str, choices: Collection[str]) -> str | None:
        """One parameter that must be one of ``choices``, or None."""
        value = self.string(key)
        if value is not None and value not in choices:
            raise UserInputError(f"{key} must be one of {', '.join(sorted(choices))}")
        return value

    def time(self, key: str) -> datetime | None:
        """One RFC 3339 time parameter, or None."""
        value = self.string(key, max_chars=64)
        return parse_time(value, key) if value is not None else None

    def limit(self) -> int:
        """``?limit=``: 1..500, default 100."""
        value = self.string("limit", max_chars=8)
        if value is None:
            return DEFAULT_LIMIT
        if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
            raise UserInputError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        return int(value)

    def cursor(self, kind: str, maxima: Sequence[int]) -> tuple[int, ...] | None:
        """``?cursor=``: the sort key it holds (see :func:`decode_cursor`), or None."""
        value = self.string("cursor", max_chars=_MAX_CURSOR_CHARS)
        return decode_cursor(value, kind, maxima) if value is not None else None
