"""Secrets the hub hands out and checks: API tokens, provisioning keys, passwords, roles.

Tokens and provisioning keys are random secrets shown once; the hub stores
only their SHA-256 (they carry 256 bits of entropy, so a fast hash is
enough) and a short prefix for people to tell them apart. Passwords are
chosen by people and low in entropy: they get scrypt with a per-user salt.
Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import IntEnum

from skylift.errors import SkyliftError

__all__ = [
    "AuthError",
    "Forbidden",
    "IssuedSecret",
    "Role",
    "hash_password",
    "hash_secret",
    "issue_secret",
    "secret_matches",
    "secret_prefix",
    "verify_password",
]

_SECRET = re.compile(r"(sk|pk)_([A-Za-z0-9]{8})_([A-Za-z0-9_-]{43})")
#: scrypt work factors: about 50 ms and 16 MiB per check on this class of machine.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_MAX_PASSWORD_BYTES = 1024


class AuthError(SkyliftError):
    """Missing, malformed, unknown, expired or revoked credentials (HTTP 401)."""


class Forbidden(SkyliftError):
    """Valid credentials without the right to do this (HTTP 403)."""


class Role(IntEnum):
    """What a user or token may do; each role includes the ones below it."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        """``"operator"`` -> ``Role.OPERATOR``; raises AuthError on anything else."""
        try:
            return cls[name.upper()]
        except (KeyError, AttributeError) as e:
            raise AuthError(f"unknown role {name!r}; use viewer, operator or admin") from e

    def require(self, needed: Role, action: str) -> None:
        """Raise Forbidden unless this role may do what ``needed`` allows."""
        if self < needed:
            raise Forbidden(f"{action} needs the {needed.name.lower()} role")

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class IssuedSecret:
    """A new secret: ``value`` is shown once; ``prefix`` and ``digest`` are stored."""

    value: str
    prefix: str
    digest: str


def issue_secret(kind: str = "sk") -> IssuedSecret:
    """A new API token (``sk_``) or provisioning key (``pk_``)."""
    if kind not in ("sk", "pk"):
        raise ValueError("kind is sk or pk")
    prefix = "".join(secrets.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(8))
    body = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    value = f"{kind}_{prefix}_{body}"
    return IssuedSecret(value, prefix, hash_secret(value))


def secret_prefix(value: str) -> str:
    """The prefix of a well-formed secret, to find its record.

    Raises:
        AuthError: not a well-formed token or provisioning key.
    """
    m = _SECRET.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise AuthError("malformed credentials")
    return m.group(2)


def hash_secret(value: str) -> str:
    """The stored form of a token or provisioning key."""
    return hashlib.sha256(value.encode()).hexdigest()


def secret_matches(value: str, digest: str) -> bool:
    """Constant-time check of a presented secret against its stored digest."""
    return hmac.compare_digest(hash_secret(value), digest)


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash``, for storing.

    Raises:
        AuthError: empty or longer than 1024 bytes.
    """
    raw = password.encode()
    if not raw or len(raw) > _MAX_PASSWORD_BYTES:
        raise AuthError("a password must be 1 to 1024 bytes")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(raw, salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return "$".join(
        ["scrypt", str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P), salt.hex(), digest.hex()]
    )


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a :func:`hash_password` result (constant time)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        raw = password.encode()
        if not raw or len(raw) > _MAX_PASSWORD_BYTES:
            return False
        got = hashlib.scrypt(
            raw, salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), maxmem=64 * 1024 * 1024
        )
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)
