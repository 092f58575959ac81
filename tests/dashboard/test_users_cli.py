"""``skylift hub user``: people who may log into the dashboard, made on the hub's machine.

Run as subprocesses, as an admin would type them; the password comes from
the environment (never an argument); errors are one line and change nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from skylift.hub.auth import verify_password
from skylift.hub.config import load_config
from skylift.hub.db import make_engine
from skylift.hub.db.models import AuditEntry, User, WebSession
from skylift.hub.setup import init_hub

PASSWORD = "a long enough password"


def _skylift(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLIFT_")}
    if password is not None:
        env["SKYLIFT_USER_PASSWORD"] = password
    return subprocess.run([sys.executable, "-m", "skylift.cli.main", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


def _one_line_error(p: subprocess.CompletedProcess[str], text: str) -> None:
    assert p.returncode == 1, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], p.stderr


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("users") / "hub"
    init_hub(directory, organisation="acme", admin_email="root@acme.example",
             gateway_port=0, api_port=0)  # fmt: skip
    return directory


def _users(directory: Path) -> dict[str, User]:
    engine = make_engine(load_config(directory).database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(User)).all()
            return {r.email: r for r in rows}  # type: ignore[misc]
    finally:
        engine.dispose()


def test_add_passwd_disable_enable_list(hub_dir: Path) -> None:
    p = _skylift("hub", "user", "add", str(hub_dir), "Night.Shift@acme.example", "--role",
                 "operator", password=PASSWORD)  # fmt: skip
    assert (
        p.returncode == 0 and "user night.shift@acme.example (operator) added to acme" in p.stderr
    )
    user = _users(hub_dir)["night.shift@acme.example"]
    assert str(user.role) == "operator" and verify_password(PASSWORD, user.password_hash)
    assert PASSWORD not in p.stdout + p.stderr and user.password_hash not in p.stdout + p.stderr

    engine = make_engine(load_config(hub_dir).database_url)
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(sa.insert(WebSession).values(token_hash="a" * 64, org_id=user.org_id,
                     user_id=user.id, csrf_token="c", created=now, last_seen=now,
                     expires=now + timedelta(hours=1)))  # fmt: skip
    p = _skylift("hub", "user", "passwd", str(hub_dir), "night.shift@acme.example",
                 password="another long password")  # fmt: skip
    assert p.returncode == 0 and "1 session(s) ended" in p.stderr
    assert verify_password(
        "another long password", _users(hub_dir)["night.shift@acme.example"].password_hash
    )
    p = _skylift("hub", "user", "disable", str(hub_dir), "night.shift@acme.example")
    assert p.returncode == 0 and _users(hub_dir)["night.shift@acme.example"].disabled
    listed = _skylift("hub", "user", "list", str(hub_dir))
    assert "acme\tnight.shift@acme.example\toperator\tdisabled\t0 session(s)" in listed.stdout
    assert (
        _skylift("hub", "user", "enable", str(hub_dir), "night.shift@acme.example").returncode == 0
    )
    assert not _users(hub_dir)["night.shift@acme.example"].disabled
    with engine.connect() as conn:
        actions = conn.execute(sa.select(AuditEntry.action).where(AuditEntry.target_id ==
                               "night.shift@acme.example").order_by(AuditEntry.id)).scalars().all()  # fmt: skip
    engine.dispose()
    assert actions == ["user.create", "user.password", "user.disable", "user.enable"]


@pytest.mark.parametrize(
    ("args", "password", "message"),
    [
        (
            ("add", "root@acme.example"),
            PASSWORD,
            "root@acme.example is a user of that organisation already",
        ),
        (("add", "x@acme.example", "--role", "god"), PASSWORD, "unknown role 'god'"),
        (("add", "not-an-email"), PASSWORD, "is not an email address"),
        (("add", "y@acme.example"), "short", "a password needs at least 12 characters"),
        (("add", "z@acme.example"), None, "no password"),
        (("add", "z@acme.example", "--org", "nosuch"), PASSWORD, "no organisation 'nosuch'"),
        (("passwd", "nobody@acme.example"), PASSWORD, "no user 'nobody@acme.example' in acme"),
    ],
    ids=["taken", "role", "email", "short", "no-password", "org", "unknown"],
)
def test_bad_input_is_one_line_and_changes_nothing(
    hub_dir: Path, args: tuple[str, ...], password: str | None, message: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from skylift.cli.main import main

    before = {e: (u.password_hash, u.role, u.disabled) for e, u in _users(hub_dir).items()}
    # In this process: the same main() the subprocesses above run, without their start-up.
    monkeypatch.delenv("SKYLIFT_USER_PASSWORD", raising=False)
    if password is not None:
        monkeypatch.setenv("SKYLIFT_USER_PASSWORD", password)
    code = main(["hub", "user", args[0], str(hub_dir), *args[1:]])
    captured = capsys.readouterr()
    _one_line_error(subprocess.CompletedProcess(args, code, captured.out, captured.err), message)
    assert {e: (u.password_hash, u.role, u.disabled) for e, u in _users(hub_dir).items()} == before
