"""``skylift hub``: create a hub directory and run it.

The hub's dependencies (the ``hub`` extra) are imported only when these
commands run, so a device install without them still has a working CLI.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from skylift.cli.common import err, out
from skylift.errors import UserInputError

if TYPE_CHECKING:
    from skylift.hub.web import HubContext

app = typer.Typer(no_args_is_help=True, help="Create and run a hub.")

_PASSWORD_ENV = "SKYLIFT_ADMIN_PASSWORD"  # noqa: S105 - the variable's name, not a secret


def _admin_password(ask: bool) -> str | None:
    env = os.environ.get(_PASSWORD_ENV)
    if env:
        return env
    if not ask:
        return None
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UserInputError(
            "no admin password", hint=f"set {_PASSWORD_ENV}, or pass --no-password"
        )
    first = getpass.getpass("Dashboard password for the admin: ")
    if not first or getpass.getpass("Same password again: ") != first:
        raise UserInputError("the passwords are empty or differ")
    return first


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="The new hub directory.")],
    organisation: Annotated[str, typer.Option("--org", help="Organisation name.")] = "default",
    admin_email: Annotated[str, typer.Option(help="The first admin's email.")] = (
        "admin@localhost"
    ),
    gateway_port: Annotated[int, typer.Option(help="Device gateway port.")] = 8443,
    api_port: Annotated[int, typer.Option(help="Management API port.")] = 8080,
    database: Annotated[str | None, typer.Option(help="postgresql://... (default SQLite).")] = (
        None
    ),
    storage: Annotated[
        str | None, typer.Option(help="s3://bucket?endpoint=... (default local).")
    ] = (None),
    no_password: Annotated[
        bool, typer.Option("--no-password", help="No dashboard password; API token only.")
    ] = False,
) -> None:
    """Create a hub: configuration, database, device CA, online keys, an admin and a token."""
    from skylift.hub.setup import init_hub

    result = init_hub(
        directory,
        organisation=organisation,
        admin_email=admin_email,
        admin_password=_admin_password(not no_password),
        gateway_port=gateway_port,
        api_port=api_port,
        database_url=database,
        storage_url=storage,
    )
    c = result.config
    err.print(f"hub created in {c.directory}")
    err.print(f"  database  {c.database_url}")
    err.print(f"  storage   {c.storage_url}")
    err.print(f"  gateway   https://{c.gateway.host}:{c.gateway.port}/device/v1")
    err.print(f"  API       https://{c.api.host}:{c.api.port}/api/v1")
    err.print(f"admin {result.admin_email}; API token (shown once, keep it safe):")
    out.print(result.admin_token)


@app.command()
def serve(
    directory: Annotated[Path, typer.Argument(help="The hub directory.")],
    database: Annotated[str | None, typer.Option(help="Override the configured database.")] = (
        None
    ),
    storage: Annotated[str | None, typer.Option(help="Override the configured storage.")] = (None),
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Run the device gateway and the management API until interrupted."""
    from skylift.hub.config import load_config
    from skylift.hub.db.engine import upgrade
    from skylift.hub.server import run_hub
    from skylift.hub.setup import open_hub

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load_config(directory).with_overrides(database_url=database, storage_url=storage)
    upgrade(config.database_url)  # idempotent: a new version migrates on start
    run_hub(open_hub(config))


# -- dashboard users ------------------------------------------------------------------------------

user_app = typer.Typer(
    no_args_is_help=True,
    help="Dashboard users of a hub (run on the hub's machine, against its database).",
)
app.add_typer(user_app, name="user")

_USER_PASSWORD_ENV = "SKYLIFT_USER_PASSWORD"  # noqa: S105 - the variable's name, not a secret
_HubDir = Annotated[Path, typer.Argument(help="The hub directory.")]
_Email = Annotated[str, typer.Argument(help="The user's email.")]
_Org = Annotated[
    str | None, typer.Option("--org", help="Organisation (needed when the hub has several).")
]


def _new_password() -> str:
    """From $SKYLIFT_USER_PASSWORD, else asked twice on the terminal; never an argument."""
    env = os.environ.get(_USER_PASSWORD_ENV)
    if env:
        return env
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UserInputError("no password", hint=f"set {_USER_PASSWORD_ENV}, or run in a terminal")
    first = getpass.getpass("New dashboard password: ")
    if getpass.getpass("Same password again: ") != first:
        raise UserInputError("the passwords differ")
    return first


def _hub_context(directory: Path) -> HubContext:
    from skylift.hub.config import load_config
    from skylift.hub.db.engine import upgrade
    from skylift.hub.setup import open_hub

    config = load_config(directory)
    upgrade(config.database_url)  # a hub made by an older version gets the sessions table
    return open_hub(config)


@user_app.command("add")
def user_add(
    directory: _HubDir,
    email: _Email,
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    organisation: _Org = None,
) -> None:
    """Create a dashboard user; the password comes from $SKYLIFT_USER_PASSWORD or a prompt."""
    from skylift.hub.dashboard.users import add_user

    password = _new_password()
    org = add_user(_hub_context(directory), email, password, role=role, organisation=organisation)
    err.print(f"user {email.strip().lower()} ({role}) added to {org}")


@user_app.command("passwd")
def user_passwd(directory: _HubDir, email: _Email, organisation: _Org = None) -> None:
    """Set a user's password; their dashboard sessions end."""
    from skylift.hub.dashboard.users import set_password

    ended = set_password(_hub_context(directory), email, _new_password(), organisation=organisation)
    err.print(f"password of {email.strip().lower()} changed; {ended} session(s) ended")


@user_app.command("disable")
def user_disable(directory: _HubDir, email: _Email, organisation: _Org = None) -> None:
    """Stop a user from logging in; their dashboard sessions end at once."""
    from skylift.hub.dashboard.users import set_disabled

    ended = set_disabled(_hub_context(directory), email, True, organisation=organisation)
    err.print(f"{email.strip().lower()} disabled; {ended} session(s) ended")


@user_app.command("enable")
def user_enable(directory: _HubDir, email: _Email, organisation: _Org = None) -> None:
    """Let a disabled user log in again."""
    from skylift.hub.dashboard.users import set_disabled

    set_disabled(_hub_context(directory), email, False, organisation=organisation)
    err.print(f"{email.strip().lower()} enabled")


@user_app.command("list")
def user_list(directory: _HubDir) -> None:
    """Every dashboard user: organisation, email, role, disabled, open sessions."""
    from skylift.hub.dashboard.users import list_users

    for u in list_users(_hub_context(directory)):
        state = "disabled" if u.disabled else "active"
        typer.echo(f"{u.organisation}\t{u.email}\t{u.role}\t{state}\t{u.sessions} session(s)")
