"""Tokens, provisioning keys, passwords and roles."""

from __future__ import annotations

import pytest

from skylift.hub.auth import (
    AuthError,
    Forbidden,
    Role,
    hash_password,
    issue_secret,
    secret_matches,
    secret_prefix,
    verify_password,
)


@pytest.mark.parametrize("kind", ["sk", "pk"])
def test_secrets_are_random_and_stored_hashed(kind: str) -> None:
    a, b = issue_secret(kind), issue_secret(kind)
    assert a.value != b.value
    assert a.value.startswith(f"{kind}_{a.prefix}_")
    assert secret_prefix(a.value) == a.prefix
    assert secret_matches(a.value, a.digest)
    assert not secret_matches(b.value, a.digest)
    assert a.value not in a.digest


@pytest.mark.parametrize(
    "bad",
    ["", "sk_", "sk_abc_def", "Bearer sk_x", "xx_abcdefgh_" + "a" * 43, "sk_abcdefgh_" + "a" * 42],
)
def test_malformed_secrets(bad: str) -> None:
    with pytest.raises(AuthError, match="malformed"):
        secret_prefix(bad)


def test_passwords() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$")
    assert "correct horse" not in stored
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert not verify_password("", stored)
    assert not verify_password("x", "garbage")
    assert not verify_password("x", "scrypt$1$2$3$zz$zz")
    assert hash_password("same") != hash_password("same")  # salted
    with pytest.raises(AuthError):
        hash_password("")
    with pytest.raises(AuthError):
        hash_password("x" * 2000)


def test_roles_include_the_ones_below() -> None:
    assert Role.parse("Operator") is Role.OPERATOR
    Role.ADMIN.require(Role.OPERATOR, "pausing")
    Role.OPERATOR.require(Role.OPERATOR, "pausing")
    with pytest.raises(Forbidden, match="pausing needs the operator role"):
        Role.VIEWER.require(Role.OPERATOR, "pausing")
    with pytest.raises(AuthError, match="unknown role"):
        Role.parse("root")
    assert str(Role.VIEWER) == "viewer"
