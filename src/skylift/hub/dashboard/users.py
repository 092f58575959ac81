"""Dashboard users: add, change a password, disable, enable, list (``skylift hub user``).

Run on the hub's own machine against its database, like ``skylift hub
init``: creating the people who may log in is an operation on the server,
not something the API offers. Passwords are hashed with scrypt
(:func:`skylift.hub.auth.hash_password`); changing a password or disabling
a user ends their dashboard sessions at once. Each change is in the audit
log, with the actor ``skylift hub user (local)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from skylift.errors import UserInputError
from skylift.hub import web
from skylift.hub.auth import AuthError, Role, hash_password
from skylift.hub.db import models
from skylift.hub.db.models import Organisation, User, WebSession
from skylift.hub.web import HubContext, Principal

__all__ = ["UserInfo", "add_user", "list_users", "set_disabled", "set_password"]

_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,190}")
_ACTOR = "skylift hub user (local)"
_MIN_PASSWORD_CHARS = 12


@dataclass(frozen=True)
class UserInfo:
    """A user as ``skylift hub user list`` prints it (never the hash)."""

    email: str
    organisation: str
    role: str
    disabled: bool
    sessions: int


def _check_password(password: str) -> str:
    if len(password) < _MIN_PASSWORD_CHARS:
        raise UserInputError(f"a password needs at least {_MIN_PASSWORD_CHARS} characters")
    try:
        return hash_password(password)
    except AuthError as e:
        raise UserInputError(e.message) from e


def _org(session: Session, name: str | None) -> Organisation:
    orgs = list(session.scalars(select(Organisation).order_by(Organisation.name)))
    if name is None:
        if len(orgs) == 1:
            return orgs[0]
        names = ", ".join(o.name for o in orgs)
        raise UserInputError(f"this hub has several organisations ({names}): pass --org")
    for org in orgs:
        if org.name == name:
            return org
    raise UserInputError(f"no organisation {name!r} on this hub")


def _find(session: Session, org: Organisation, email: str) -> User:
    user = session.scalars(
        select(User).where(User.org_id == org.id, User.email == email.strip().lower())
    ).one_or_none()
    if user is None:
        raise UserInputError(f"no user {email!r} in {org.name}")
    return user


def _end_sessions(session: Session, user: User) -> int:
    where = (WebSession.org_id == user.org_id, WebSession.user_id == user.id)
    ended = session.scalar(select(func.count()).select_from(WebSession).where(*where)) or 0
    session.execute(delete(WebSession).where(*where))
    return ended


def add_user(
    ctx: HubContext, email: str, password: str, *, role: str, organisation: str | None
) -> str:
    """Create a user; returns the organisation's name.

    Raises:
        UserInputError: a bad email, role or password, an unknown organisation,
            or the email is taken in that organisation.
    """
    email = email.strip().lower()
    if not _EMAIL.fullmatch(email):
        raise UserInputError(f"{email[:80]!r} is not an email address")
    try:
        parsed = Role.parse(role)
    except AuthError as e:
        raise UserInputError(e.message) from e
    digest = _check_password(password)
    try:
        with ctx.transaction() as session:
            org = _org(session, organisation)
            session.add(
                User(
                    org_id=org.id, email=email, password_hash=digest, role=models.Role(str(parsed))
                )
            )
            session.flush()
            who = Principal(org.id, Role.ADMIN, _ACTOR)
            web.audit(session, who, "user.create", "user", email, {"role": str(parsed)})
            return org.name
    except IntegrityError as e:
        raise UserInputError(f"{email} is a user of that organisation already") from e


def set_password(ctx: HubContext, email: str, password: str, *, organisation: str | None) -> int:
    """Change a user's password and end their sessions; returns how many ended."""
    digest = _check_password(password)
    with ctx.transaction() as session:
        org = _org(session, organisation)
        user = _find(session, org, email)
        user.password_hash = digest
        ended = _end_sessions(session, user)
        who = Principal(org.id, Role.ADMIN, _ACTOR)
        web.audit(session, who, "user.password", "user", user.email, {"sessions_ended": ended})
        return ended


def set_disabled(ctx: HubContext, email: str, disabled: bool, *, organisation: str | None) -> int:
    """Disable (ending their sessions) or enable a user; returns the sessions ended."""
    with ctx.transaction() as session:
        org = _org(session, organisation)
        user = _find(session, org, email)
        user.disabled = disabled
        ended = 0
        if disabled:
            ended = _end_sessions(session, user)
        who = Principal(org.id, Role.ADMIN, _ACTOR)
        action = "user.disable" if disabled else "user.enable"
        web.audit(session, who, action, "user", user.email, {"sessions_ended": ended})
        return ended


def list_users(ctx: HubContext) -> list[UserInfo]:
    """Every user of the hub, by organisation and email."""
    with ctx.sessions() as session:
        counts = dict(
            session.execute(
                select(WebSession.user_id, func.count()).group_by(WebSession.user_id)
            ).all()
        )
        rows = session.execute(
            select(User, Organisation.name)
            .join(Organisation, Organisation.id == User.org_id)
            .order_by(Organisation.name, User.email)
        ).all()
        return [
            UserInfo(u.email, org, str(u.role), u.disabled, counts.get(u.id, 0)) for u, org in rows
        ]
