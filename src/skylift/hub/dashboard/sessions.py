"""Dashboard logins: password check, sessions in the database, CSRF tokens, cookies.

Why sessions are rows (:class:`~skylift.hub.db.models.WebSession`) and not
signed cookies: logging out, disabling a user or deleting one must end
their sessions at once in every hub process, and hub processes share
nothing but the database. A signed cookie would need a revocation list in
the database anyway, and would stay valid until it expires if that list
were ever skipped. The cost is one indexed primary-key read per page.

- The cookie holds 256 random bits; the row holds their SHA-256 (like API
  tokens), so a copy of the database logs nobody in. The cookie is
  ``HttpOnly`` and ``SameSite=Lax``; on HTTPS it is also ``Secure`` and named
  with the ``__Host-`` prefix (no ``Domain``, path ``/``), which browsers
  refuse to let another subdomain or plain HTTP overwrite.
- CSRF: every form of a session carries the session's synchronizer token
  (:attr:`WebSession.csrf_token`), compared in constant time. The login
  form, which has no session yet, uses a double-submit cookie. A request
  whose ``Origin`` header names another site is refused before either.
- A wrong email and a wrong password take the same time (a dummy scrypt
  check) and give the same message; failed logins per email are limited
  (:class:`LoginThrottle`) so that a password cannot be guessed online.
- Sessions end after :data:`IDLE` without use, and :data:`ABSOLUTE` after
  login in any case. ``last_seen`` is written at most once a minute.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from starlette.requests import Request

from skylift.errors import SkyliftError
from skylift.hub.auth import AuthError, Role, hash_password, verify_password
from skylift.hub.db.models import Organisation, User, WebSession
from skylift.hub.web import HubContext, Principal

__all__ = [
    "ABSOLUTE",
    "IDLE",
    "LOGIN_CSRF_COOKIE",
    "CsrfError",
    "LoginThrottle",
    "Visitor",
    "cookie_name",
    "csrf_matches",
    "end_session",
    "find_session",
    "is_secure",
    "log_in",
    "new_token",
    "same_origin",
]

#: A session unused this long has ended.
IDLE = timedelta(hours=12)
#: A session ends this long after login, used or not.
ABSOLUTE = timedelta(days=7)
_TOUCH_RESOLUTION = timedelta(minutes=1)
LOGIN_CSRF_COOKIE = "skylift_login"


@functools.cache
def _dummy_hash() -> str:
    # scrypt of something nobody knows: a check against it takes as long as a real one.
    return hash_password(secrets.token_urlsafe(16))


class CsrfError(SkyliftError):
    """A form without this session's CSRF token, or sent from another site (HTTP 403)."""


@dataclass(frozen=True)
class Visitor:
    """Who is looking at the dashboard: the user, their role, their session's CSRF token."""

    user_id: int
    org_id: int
    email: str
    role: Role
    csrf_token: str
    organisation: str

    @property
    def principal(self) -> Principal:
        """The same caller as the API knows callers, for the shared code and the audit log."""
        return Principal(self.org_id, self.role, self.email)

    def may(self, role: Role) -> bool:
        """Whether this visitor holds at least ``role`` (for showing controls)."""
        return self.role >= role


def new_token() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_secure(request: Request) -> bool:
    """Whether the browser reached us over HTTPS (the hub serves TLS itself)."""
    return request.url.scheme == "https"


def cookie_name(request: Request) -> str:
    """The session cookie's name: ``__Host-`` prefixed on HTTPS."""
    return "__Host-skylift_session" if is_secure(request) else "skylift_session"


def csrf_matches(sent: str | None, expected: str) -> bool:
    """Constant-time comparison of a form's token with the expected one."""
    return bool(sent) and hmac.compare_digest(str(sent).encode(), expected.encode())


def same_origin(request: Request) -> bool:
    """False when ``Origin`` (or, lacking it, ``Referer``) names a site other than this one.

    Browsers send ``Origin`` on every cross-site POST; a request without
    either header (curl, an old browser) is left to the CSRF token.
    """
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if referer is None:
            return True
        origin = "/".join(referer.split("/", 3)[:3])
    own = f"{request.url.scheme}://{request.url.netloc}"
    return origin == own


class LoginThrottle:
    """At most ``limit`` failed logins per email within ``window_s``, in this process.

    Per process, not shared: with N hub processes an attacker gets N times
    the attempts, still too few against scrypt and any real password. Bounded
    in memory: at most ``max_emails`` addresses are tracked; the oldest go first.
    """

    def __init__(self, *, limit: int = 10, window_s: float = 900.0, max_emails: int = 10_000):
        self.limit, self.window_s, self.max_emails = limit, window_s, max_emails
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, email: str, now: float) -> deque[float]:
        seen = self._failures.get(email, deque())
        while seen and seen[0] <= now - self.window_s:
            seen.popleft()
        return seen

    def check(self, email: str) -> None:
        """Raise AuthError if ``email`` has failed too often lately."""
        now = time.monotonic()
        with self._lock:
            seen = self._recent(email, now)
            if len(seen) >= self.limit:
                wait = int(seen[0] + self.window_s - now) // 60 + 1
                raise AuthError(f"too many failed logins for this email; try again in {wait} min")

    def failed(self, email: str) -> None:
        """Count one failed login for ``email``."""
        now = time.monotonic()
        with self._lock:
            seen = self._recent(email, now)
            seen.append(now)
            self._failures.pop(email, None)
            self._failures[email] = seen  # newest last: the dict's order is the age order
            while len(self._failures) > self.max_emails:
                del self._failures[next(iter(self._failures))]

    def succeeded(self, email: str) -> None:
        """Forget the failures of ``email``."""
        with self._lock:
            self._failures.pop(email, None)


def log_in(ctx: HubContext, email: str, password: str, *, now: datetime) -> tuple[str, str]:
    """Check a password and open a session; returns ``(cookie token, csrf token)``.

    Organisation-blind: emails are unique per organisation, so the same
    email in two organisations with the same password is ambiguous and is
    refused like a wrong password (one account per email is the rule that
    makes this safe; the CLI's ``user add`` warns about it).

    Raises:
        AuthError: unknown email, wrong password, disabled user (one message for all).
    """
    wrong = AuthError("wrong email or password")
    email = email.strip().lower()
    with ctx.transaction() as session:
        users = list(session.scalars(select(User).where(User.email == email).limit(2)))
        user = users[0] if len(users) == 1 else None
        # Always one scrypt check, so that unknown emails answer as slowly as known ones.
        ok = verify_password(password, user.password_hash if user else _dummy_hash())
        if user is None or not ok or user.disabled:
            raise wrong
        token, csrf = new_token(), new_token()
        session.add(
            WebSession(
                token_hash=_digest(token),
                org_id=user.org_id,
                user_id=user.id,
                csrf_token=csrf,
                created=now,
                last_seen=now,
                expires=now + IDLE,
            )
        )
        # Expired sessions go when someone logs in: no background sweep needed.
        session.execute(delete(WebSession).where(WebSession.expires <= now))
    return token, csrf


def find_session(ctx: HubContext, session: Session, token: str | None, *, now: datetime) -> Visitor:
    """The visitor behind a session cookie; extends its idle deadline.

    Raises:
        AuthError: no cookie, an unknown or expired session, a disabled user.
    """
    if not token or len(token) > 100:
        raise AuthError("log in to use the dashboard")
    row = session.execute(
        select(WebSession, User, Organisation.name)
        .join(User, (User.id == WebSession.user_id) & (User.org_id == WebSession.org_id))
        .join(Organisation, Organisation.id == WebSession.org_id)
        .where(WebSession.token_hash == _digest(token))
    ).one_or_none()
    if row is None:
        raise AuthError("your session has ended; log in again")
    web_session, user, organisation = row
    if web_session.expires <= now or user.disabled:
        session.delete(web_session)
        raise AuthError("your session has ended; log in again")
    if now - web_session.last_seen >= _TOUCH_RESOLUTION:
        web_session.last_seen = now
        web_session.expires = min(now + IDLE, web_session.created + ABSOLUTE)
    return Visitor(
        user_id=user.id,
        org_id=user.org_id,
        email=user.email,
        role=Role.parse(str(user.role)),
        csrf_token=web_session.csrf_token,
        organisation=organisation,
    )


def end_session(ctx: HubContext, token: str | None) -> None:
    """Delete the session behind ``token``, if any."""
    if not token or len(token) > 100:
        return
    with ctx.transaction() as session:
        session.execute(delete(WebSession).where(WebSession.token_hash == _digest(token)))
