"""``skylift hub init``: a private, working hub directory on SQLite and PostgreSQL."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from skylift.errors import UserInputError
from skylift.hub.auth import AuthError, Role
from skylift.hub.db.models import ApiToken, AuditEntry, Organisation, User
from skylift.hub.setup import init_hub, open_hub
from skylift.hub.web import authenticate

from .conftest import MigratedDatabase


def test_init_makes_a_private_hub_that_opens(tmp_path: Path, db: MigratedDatabase) -> None:
    result = init_hub(
        tmp_path / "hub", organisation="acme", admin_email="Ops@Acme.Example",
        admin_password="pw", database_url=db.url, gateway_port=0, api_port=0,
    )  # fmt: skip
    hub = tmp_path / "hub"
    assert stat.S_IMODE(hub.stat().st_mode) == 0o700
    for key in ("ca/device-ca.key", "ca/server.key", "keys/online.key", "keys/director-root.key"):
        assert stat.S_IMODE((hub / key).stat().st_mode) == 0o600, key
    ctx = open_hub(result.config)
    assert len(ctx.director.roots()) == 1
    with ctx.sessions.begin() as session:
        who = authenticate(ctx, session, f"Bearer {result.admin_token}")
        assert who.role is Role.ADMIN
        assert session.scalar(select(func.count()).select_from(User)) == 1
        assert session.scalar(select(User.email)) == "ops@acme.example"
        assert session.scalar(select(Organisation.name)) == "acme"
        token_hash = session.scalar(select(ApiToken.token_hash))
        assert token_hash is not None and result.admin_token not in token_hash
        assert session.scalar(select(func.count()).select_from(AuditEntry)) == 0
        with pytest.raises(AuthError):
            authenticate(ctx, session, "Bearer sk_aaaaaaaa_" + "a" * 43)
        with pytest.raises(AuthError):
            authenticate(ctx, session, None)


def test_init_refuses_an_existing_hub_and_bad_emails(tmp_path: Path) -> None:
    init_hub(tmp_path / "hub", organisation="acme", admin_email="a@b")
    with pytest.raises(UserInputError, match="is a hub already"):
        init_hub(tmp_path / "hub", organisation="acme", admin_email="a@b")
    with pytest.raises(UserInputError, match="not an email"):
        init_hub(tmp_path / "other", organisation="acme", admin_email="nobody")


def test_cli_prints_the_token_alone_on_stdout(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "skylift.cli.main", "hub", "init", str(tmp_path / "h"),
         "--org", "acme", "--no-password"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith("sk_")
    assert len(p.stdout.strip().splitlines()) == 1
    assert "shown once" in p.stderr
    assert p.stdout.strip() not in p.stderr
